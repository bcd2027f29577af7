//! A headless Chromium driven over W3C WebDriver (Debian's `chromium` and
//! `chromium-driver`, which `make test` installs): just the commands the
//! playground test needs, as plain HTTP calls with reqwest. Nothing is
//! downloaded; the browser runs with a fresh profile and with its background
//! networking off, so it talks to nothing but the server under test.

#![allow(dead_code)] // Each test binary uses a different part.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

/// Where Debian installs them.
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// W3C WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The browser and its driver; both stop when this is dropped.
pub struct Browser {
    http: reqwest::Client,
    /// `http://127.0.0.1:<port>/session/<id>`.
    session: String,
    driver: Child,
}

/// A free TCP port on 127.0.0.1 (bound once, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// Fails with what to do when the browser is missing: these tests never skip.
pub fn require_installed() {
    for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: the browser tests need Debian's `{package}`; run `make test` (it installs chromium and chromium-driver)"
        );
    }
}

fn spawn_driver(port: u16, log: &Path) -> Child {
    let mut cmd = Command::new(CHROMEDRIVER);
    cmd.arg(format!("--port={port}")).arg(format!("--log-path={}", log.display())).stdout(Stdio::null()).stderr(Stdio::null());
    // Its own process group, so that dropping the browser can end the driver and every Chromium process it started.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.spawn().unwrap_or_else(|e| panic!("starting {CHROMEDRIVER}: {e}"))
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile under `dir`.
    pub async fn start(dir: &Path, width: u32, height: u32) -> Self {
        require_installed();
        let port = free_port();
        let driver = spawn_driver(port, &dir.join("chromedriver.log"));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http.get(format!("{base}/status")).send().await.ok().map(|r| r.status().is_success()).unwrap_or(false);
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start; see {}", dir.join("chromedriver.log").display());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = dir.join("profile");
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            format!("--user-data-dir={}", profile.display()),
            format!("--window-size={width},{height}"),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}});
        let mut browser = Self { http, session: String::new(), driver };
        let created = browser.call(reqwest::Method::POST, &format!("{base}/session"), Some(caps)).await;
        let id = created["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {created}"));
        browser.session = format!("{base}/session/{id}");
        browser
    }

    async fn call(&self, method: reqwest::Method, url: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method.clone(), url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = response.status();
        let reply: Value = response.json().await.unwrap_or_else(|e| panic!("{method} {url}: not JSON: {e}"));
        assert!(status.is_success(), "{method} {url}: {status} {reply}");
        reply["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, &format!("{}{path}", self.session), Some(body)).await
    }

    async fn get(&self, path: &str) -> Value {
        self.call(reqwest::Method::GET, &format!("{}{path}", self.session), None).await
    }

    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    pub async fn refresh(&self) {
        self.post("/refresh", json!({})).await;
    }

    pub async fn resize(&self, width: u32, height: u32) {
        self.post("/window/rect", json!({ "width": width, "height": height })).await;
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page.
    pub async fn js(&self, script: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({ "script": script, "args": args })).await
    }

    /// Polls `script` until it returns something truthy (not false, null, 0 or
    /// ""), and returns that; panics with `what` after `timeout`.
    pub async fn wait_for(&self, what: &str, script: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.js(script, json!([])).await;
            let truthy = !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn element(&self, css: &str) -> String {
        let found = self.post("/element", json!({ "using": "css selector", "value": css })).await;
        found[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {found}")).to_owned()
    }

    /// Types `text` into the element `css` selects, as a user would (WebDriver
    /// key codes such as [`CTRL`] and [`ENTER`] included).
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.post(&format!("/element/{id}/value"), json!({ "text": text })).await;
    }

    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.post(&format!("/element/{id}/click"), json!({})).await;
    }

    /// The viewport as a PNG, written to `path`.
    pub async fn screenshot(&self, path: &Path) -> PathBuf {
        let b64 = self.get("/screenshot").await;
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().expect("screenshot is base64")).unwrap();
        std::fs::write(path, png).unwrap();
        path.to_owned()
    }
}

/// WebDriver key codes: Control (held until [`NULL_KEY`]), Enter, release all.
pub const CTRL: &str = "\u{E009}";
pub const ENTER: &str = "\u{E007}";
pub const NULL_KEY: &str = "\u{E000}";

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: the driver and the Chromium processes it started.
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let _ = self.driver.wait();
    }
}
