//! The playground in a real headless Chromium (WebDriver, see `browser/`)
//! against a real `diffusiond serve` on the tiny fixture cascade, on a free
//! port of 127.0.0.1: the page loads its form from `/info`, a prompt typed and
//! submitted with Ctrl+Enter becomes a job whose progress bars move and whose
//! images appear, the gallery survives a reload and its "reuse" fills the form,
//! a queued job shows its place and can be canceled, a full queue's 429 is
//! shown and retried after its Retry-After, out-of-range values come back with
//! the server's message on the field it names, the page fits a phone's width,
//! and a server that has gone is reported as such.
//!
//! Screenshots are left in `target/tmp/ui_browser/` (the paths are printed);
//! the one of the page generating is also copied to `docs/playground.png` for
//! the README.

mod browser;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use browser::{Browser, CTRL, ENTER, NULL_KEY};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(120);

/// A `diffusiond serve` child process, killed when dropped.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fixture_cascade() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cascade")
}

/// One job running and one waiting fill the queue: the third request gets 429.
fn serve(port: u16, dir: &Path, extra: &[&str]) -> Serve {
    let log = std::fs::File::create(dir.join(format!("server-{port}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_diffusiond"))
        .args(["serve", "--device", "cpu", "--no-warmup", "--max-active-jobs", "1", "--max-queue", "1"])
        .args(extra)
        .arg("--bind")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--model")
        .arg(fixture_cascade())
        .arg("--data-dir")
        .arg(dir.join(format!("data-{port}")))
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Serve(child)
}

async fn wait_ready(http: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while http.get(format!("{base}/ready")).send().await.map(|r| r.status() != 200).unwrap_or(true) {
        assert!(Instant::now() < deadline, "server not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Records every value the progress bars take, as `[stage, value, max]`.
const RECORD_PROGRESS: &str = r##"
    window.__progress = [];
    new MutationObserver((changes) => {
        for (const c of changes) {
            const bars = c.type === "attributes" ? [c.target] : [...document.querySelectorAll("#current-progress progress")];
            for (const bar of bars) {
                if (bar.tagName !== "PROGRESS") continue;
                window.__progress.push([Number(bar.closest(".stage-progress").dataset.stage), bar.value, bar.max]);
            }
        }
    }).observe(document.getElementById("current-progress"), { subtree: true, childList: true, attributes: true, attributeFilter: ["value", "max"] });
"##;

/// The elements that reach past the page's right edge, as `tag.class`.
const WIDER_THAN_THE_PAGE: &str = "const w = document.documentElement.clientWidth; \
    return [...document.querySelectorAll('body *')].filter((e) => e.getBoundingClientRect().right > w + 0.5) \
        .map((e) => `${e.tagName.toLowerCase()}.${e.className}#${e.id} ${Math.round(e.getBoundingClientRect().right)}`);";

/// Sets an input's value from script (past its own min/max) as if typed.
async fn set_value(b: &Browser, css: &str, value: &str) {
    b.js("const el = document.querySelector(arguments[0]); el.value = arguments[1]; el.dispatchEvent(new Event('input', {bubbles: true}));", json!([css, value])).await;
}

async fn text(b: &Browser, css: &str) -> String {
    b.js("const el = document.querySelector(arguments[0]); return el ? el.textContent : null;", json!([css])).await.as_str().unwrap_or_default().to_owned()
}

async fn status(b: &Browser) -> String {
    text(b, "#current-status").await
}

async fn wait_status(b: &Browser, wanted: &str) {
    let script = format!("return document.getElementById('current-status').textContent === {wanted:?};");
    b.wait_for(&format!("status {wanted}"), &script, WAIT).await;
}

/// The images in `css` that have loaded, once there are `n` of them.
async fn wait_images(b: &Browser, css: &str, n: usize) {
    let script = format!("const imgs = [...document.querySelectorAll({css:?})]; return imgs.length === {n} && imgs.every((i) => i.complete && i.naturalWidth > 0);");
    b.wait_for(&format!("{n} images in {css}"), &script, WAIT).await;
}

async fn submit_job(http: &reqwest::Client, base: &str, body: Value) -> String {
    let r = http.post(format!("{base}/generate")).header("Prefer", "respond-async").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 202);
    r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_playground_in_a_real_browser() {
    browser::require_installed();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui_browser");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = browser::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = Some(serve(port, &dir, &[]));
    let http = reqwest::Client::new();
    wait_ready(&http, &base).await;
    let info: Value = http.get(format!("{base}/info")).send().await.unwrap().json().await.unwrap();
    let stages = info["stages"].as_array().unwrap().len();
    assert!(stages >= 2, "the fixture cascade has a base and a super-resolution stage");
    let max_steps = info["stages"][0]["max_steps"].as_u64().unwrap();

    let b = Browser::start(&dir, 1280, 1000).await;
    b.goto(&format!("{base}/")).await;
    b.wait_for("the form built from /info", &format!("return document.querySelectorAll('.stage').length === {stages};"), WAIT).await;
    assert!(text(&b, "#model").await.contains(info["name"].as_str().unwrap()));
    let default_steps = b.js("return document.getElementById('stage-0-steps').value;", json!([])).await;
    assert_eq!(default_steps, json!(info["stages"][0]["defaults"]["steps"].to_string()));
    assert_eq!(b.js("return document.getElementById('stage-0-steps').max;", json!([])).await, json!(max_steps.to_string()));

    // 1. Type a prompt, roll a seed, submit with Ctrl+Enter: progress, then images.
    set_value(&b, "#stage-0-steps", "80").await;
    set_value(&b, "#stage-1-steps", "40").await;
    set_value(&b, "#n", "2").await;
    b.click("#dice").await;
    let seed = b.js("return document.getElementById('seed').value;", json!([])).await.as_str().unwrap().to_owned();
    assert!(seed.parse::<u64>().is_ok(), "the dice gives a seed: {seed:?}");
    b.js(RECORD_PROGRESS, json!([])).await;
    let prompt = "a red circle above a blue square";
    b.type_into("#prompt", prompt).await;
    b.type_into("#prompt", &format!("{CTRL}{ENTER}{NULL_KEY}")).await;
    wait_status(&b, "Done").await;
    wait_images(&b, "#current-images img", 2).await;
    let seen: Vec<(u64, f64, f64)> = serde_json::from_value(b.js("return window.__progress;", json!([])).await).unwrap();
    let moving = seen.iter().filter(|(stage, v, max)| *stage == 0 && *v > 0.0 && v < max).count();
    assert!(moving >= 3, "the base stage's bar moved through intermediate values: {seen:?}");
    for stage in 0..stages as u64 {
        let last = seen.iter().rev().find(|(s, ..)| *s == stage).unwrap_or_else(|| panic!("stage {stage} had no bar: {seen:?}"));
        assert_eq!(last.1, last.2, "stage {stage}'s bar ends full: {seen:?}");
    }
    let base_values: Vec<f64> = seen.iter().filter(|(s, ..)| *s == 0).map(|(_, v, _)| *v).collect();
    assert!(base_values.windows(2).all(|w| w[0] <= w[1]), "progress never goes back: {base_values:?}");
    println!("screenshot: {}", b.screenshot(&dir.join("done.png")).await.display());

    // 2. The gallery has the job; after a reload it still does, images and all.
    let ids: Vec<String> = serde_json::from_value(b.js("return JSON.parse(localStorage.getItem('diffusiond.jobs'));", json!([])).await).unwrap();
    assert_eq!(ids.len(), 1);
    let first = ids[0].clone();
    wait_images(&b, &format!(".card[data-job='{first}'] img"), 2).await;
    b.refresh().await;
    wait_images(&b, &format!(".card[data-job='{first}'] img"), 2).await;
    let card = text(&b, &format!(".card[data-job='{first}']")).await;
    assert!(card.contains(prompt) && card.contains(&seed) && card.contains("80 steps"), "the card shows the settings: {card}");
    let download = b.js(&format!("return document.querySelector(\".card[data-job='{first}'] a.download\").download;"), json!([])).await;
    assert!(download.as_str().unwrap().ends_with(".png"), "{download}");

    // 3. "Reuse these settings" fills the form with the job's resolved values.
    set_value(&b, "#stage-0-steps", "7").await;
    b.click(&format!(".card[data-job='{first}'] .reuse")).await;
    let form = b.js("return ['prompt', 'seed', 'n', 'stage-0-steps', 'stage-1-steps'].map((id) => document.getElementById(id).value);", json!([])).await;
    assert_eq!(form, json!([prompt, seed, "2", "80", "40"]));

    // 4. Behind a running job, the page's job waits and says where; it can be canceled.
    let long = json!({"prompt": "a long one", "n": info["limits"]["max_images"], "steps": max_steps,
        "stage_overrides": [{"stage": 1, "steps": info["stages"][1]["max_steps"]}]});
    let blocker = submit_job(&http, &base, long).await;
    let deadline = Instant::now() + WAIT;
    while http.get(format!("{base}/jobs/{blocker}")).send().await.unwrap().json::<Value>().await.unwrap()["status"] != "running" {
        assert!(Instant::now() < deadline, "the blocking job never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.click("#generate").await;
    wait_status(&b, "Queued").await;
    b.wait_for("the queue position", "return document.getElementById('current-detail').textContent === 'next in the queue';", WAIT).await;

    // 5. The queue is full now: 429, shown with its countdown and retried after Retry-After.
    b.click("#generate").await;
    b.wait_for("the 429", "const e = document.getElementById('error'); return !e.hidden && e.textContent.includes('429');", WAIT).await;
    let error = text(&b, "#error").await;
    assert!(error.contains("queue_full") && error.contains("Retrying in"), "{error}");
    let retry_started = Instant::now();
    b.click("#cancel").await;
    wait_status(&b, "Canceled").await;
    // Retry-After is 5 s: the retry goes through (into the freed queue place) and is followed.
    wait_status(&b, "Queued").await;
    assert!(retry_started.elapsed() >= Duration::from_secs(3), "the retry waited for Retry-After");
    assert!(b.js("return document.getElementById('error').hidden;", json!([])).await == json!(true));

    // 6. The blocker goes; the retried job runs: the screenshot of the page generating.
    b.js(RECORD_PROGRESS, json!([])).await;
    http.post(format!("{base}/jobs/{blocker}/cancel")).send().await.unwrap();
    let midway = "const bar = document.querySelector('.stage-progress[data-stage=\"0\"] progress'); \
        return bar.value >= 0.4 * bar.max && bar.value < bar.max && document.getElementById('current-status').textContent === 'Generating';";
    b.wait_for("progress mid-way", midway, WAIT).await;
    let shot = b.screenshot(&dir.join("generating.png")).await;
    println!("screenshot: {}", shot.display());
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::copy(&shot, docs.join("playground.png")).unwrap();
    wait_status(&b, "Done").await;

    // 7. Out-of-range values (past the inputs' own limits) come back naming the field.
    set_value(&b, "#stage-0-steps", &(max_steps + 4000).to_string()).await;
    b.click("#generate").await;
    b.wait_for("the 422", "return !document.getElementById('error').hidden;", WAIT).await;
    let error = text(&b, "#error").await;
    assert!(error.contains("422") && error.contains("`steps`") && error.contains(&format!("outside 1..={max_steps}")), "{error}");
    assert_eq!(b.js("return document.getElementById('stage-0-steps').getAttribute('aria-invalid');", json!([])).await, json!("true"));
    let note = text(&b, ".field-error[data-for='stage-0-steps']").await;
    assert!(note.contains(&format!("outside 1..={max_steps}")), "the field says what is wrong with it: {note}");
    set_value(&b, "#stage-0-steps", "5").await;
    set_value(&b, "#stage-1-guidance_scale", "99").await;
    b.click("#generate").await;
    b.wait_for("the second 422", "return document.getElementById('stage-1-guidance_scale').getAttribute('aria-invalid') === 'true';", WAIT).await;
    assert!(text(&b, "#error").await.contains("stages[1].guidance_scale"), "{}", text(&b, "#error").await);
    assert_eq!(b.js("return document.getElementById('stage-0-steps').getAttribute('aria-invalid');", json!([])).await, Value::Null);
    println!("screenshot: {}", b.screenshot(&dir.join("invalid.png")).await.display());

    // 8. At a phone's width nothing overflows sideways.
    b.resize(390, 844).await;
    b.wait_for("the narrow layout", "return window.innerWidth <= 400;", WAIT).await;
    println!("screenshot: {}", b.screenshot(&dir.join("phone.png")).await.display());
    let overflow = b.js("return document.documentElement.scrollWidth - document.documentElement.clientWidth;", json!([])).await;
    let wide = b.js(WIDER_THAN_THE_PAGE, json!([])).await;
    assert_eq!(overflow, json!(0), "the page scrolls sideways at phone width: {wide}");
    b.resize(1280, 1000).await;

    // 9. The server goes away: the page says so instead of hanging.
    set_value(&b, "#stage-1-guidance_scale", "3").await;
    drop(server.take());
    b.click("#generate").await;
    b.wait_for("the unreachable notice", "const e = document.getElementById('error'); return !e.hidden && e.textContent.includes('Server unreachable');", WAIT).await;
    assert!(status(&b).await == "Done", "the last job's panel is left as it was");

    // 10. A server with API keys: the page asks for one and then works with it,
    // the event stream and the images included (both need the header).
    let port = browser::free_port();
    let keyed = format!("http://127.0.0.1:{port}");
    let _server = serve(port, &dir, &["--api-keys", "playground-key"]);
    wait_ready(&http, &keyed).await;
    b.goto(&format!("{keyed}/")).await;
    b.wait_for("the key field", "return !document.getElementById('auth').hidden && !document.getElementById('banner').hidden;", WAIT).await;
    assert!(text(&b, "#banner").await.contains("requires an API key"));
    b.type_into("#api-key", "playground-key").await;
    b.click("#api-key-save").await;
    b.wait_for("the form", &format!("return document.querySelectorAll('.stage').length === {stages};"), WAIT).await;
    assert!(b.js("return document.getElementById('banner').hidden;", json!([])).await == json!(true));
    set_value(&b, "#stage-0-steps", "30").await;
    set_value(&b, "#stage-1-steps", "20").await;
    b.js(RECORD_PROGRESS, json!([])).await;
    b.type_into("#prompt", "a green triangle").await;
    b.click("#generate").await;
    wait_status(&b, "Done").await;
    wait_images(&b, "#current-images img", 1).await;
    let seen = b.js("return window.__progress.filter(([s, v, m]) => v > 0 && v < m).length;", json!([])).await;
    assert!(seen.as_u64().unwrap() > 0, "progress arrived over the keyed event stream");
    wait_images(&b, ".card img", 1).await;
}
