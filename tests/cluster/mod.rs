//! A small cluster on loopback for the scale-out tests and benchmark: a
//! private `redis-server`, `diffusiond serve` replicas as child processes, and
//! nginx balancing them round-robin. Everything lives in one temporary
//! directory and is killed on drop.
//!
//! redis-server and nginx come from Debian (`make test` installs them). Without
//! them these tests fail saying how to install them, unless
//! `DIFFUSIOND_SKIP_REDIS=1` is set.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SKIP_ENV: &str = "DIFFUSIOND_SKIP_REDIS";

/// A free loopback port (free when picked; a race with other processes is possible but rare).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// Whether the tests that need redis-server (and nginx) should run; panics
/// with installation advice when a tool is missing.
pub fn tools_present(tools: &[&str]) -> bool {
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
        eprintln!("{SKIP_ENV}=1: skipping the tests that need {}", tools.join(" and "));
        return false;
    }
    for tool in tools {
        let found = Command::new(program(tool)).arg("-v").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
        assert!(
            found,
            "{tool} is needed by the scale-out tests but cannot be run. `make test` installs it; \
             or run `apt-get install -y redis-server nginx`. Set {SKIP_ENV}=1 to skip these tests."
        );
    }
    true
}

/// `tool`, or Debian's /usr/sbin copy of it when that directory is not on PATH
/// (as for most users but root).
pub fn program(tool: &str) -> PathBuf {
    let sbin = Path::new("/usr/sbin").join(tool);
    let on_path = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
    if !on_path && sbin.is_file() {
        return sbin;
    }
    PathBuf::from(tool)
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("diffusiond-{name}-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills a child process on drop.
pub struct Killed(pub Option<Child>);

impl Killed {
    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A private redis-server on a loopback port, without persistence.
pub struct Redis {
    pub port: u16,
    process: Killed,
}

impl Redis {
    pub fn start(dir: &Path) -> Self {
        let dir = dir.join("redis");
        std::fs::create_dir_all(&dir).expect("redis directory");
        for _ in 0..5 {
            let port = free_port();
            let child = Command::new(program("redis-server"))
                .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1", "--port", &port.to_string()])
                .arg("--dir")
                .arg(&dir)
                .arg("--logfile")
                .arg(dir.join("redis.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            let mut process = Killed(Some(child));
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).expect("URL");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if process.0.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some()) {
                    break; // exited: the port was taken; try another
                }
                let ping = client.get_connection().and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
                if ping.is_ok() {
                    return Self { port, process };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            process.kill();
        }
        panic!("redis-server did not start; see {}", dir.join("redis.log").display());
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url()).and_then(|c| c.get_connection()).expect("redis connection")
    }
}

/// nginx balancing `upstreams` round-robin, with the proxy settings of
/// docker/nginx.conf that matter here (HTTP/1.1 keep-alive upstream, the
/// request id, retry on a refused connection, unbuffered SSE).
pub struct Nginx {
    pub port: u16,
    process: Killed,
    dir: PathBuf,
}

impl Nginx {
    pub fn start(dir: &Path, upstreams: &[u16]) -> Self {
        let dir = dir.join("nginx");
        std::fs::create_dir_all(dir.join("logs")).expect("nginx directory");
        let port = free_port();
        let servers: String = upstreams.iter().map(|p| format!("        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n")).collect();
        let config = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/logs/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {dir}/logs/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    map $http_x_request_id $diffusiond_request_id {{
        default $http_x_request_id;
        ""      $request_id;
    }}
    upstream diffusiond {{
{servers}        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 64k;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_set_header X-Request-Id $diffusiond_request_id;
        proxy_connect_timeout 2s;
        proxy_read_timeout 330s;
        proxy_next_upstream error timeout;
        proxy_next_upstream_tries 2;
        location / {{ proxy_pass http://diffusiond; }}
        location ~ ^/jobs/[^/]+/events$ {{
            proxy_pass http://diffusiond;
            proxy_buffering off;
            proxy_cache off;
        }}
    }}
}}
"#,
            dir = dir.display()
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).expect("write nginx.conf");
        let child = Command::new(program("nginx"))
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("logs/error.log"))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let mut process = Killed(Some(child));
        let log = dir.join("logs/error.log");
        wait_until("nginx listens", Duration::from_secs(10), || {
            if let Some(status) = process.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("nginx exited ({status}): {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Self { port, process, dir }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/error.log")).unwrap_or_default()
    }
}

/// How a replica is started.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    pub model: PathBuf,
    pub store: String,
    pub max_active_jobs: usize,
    pub reclaim_after: &'static str,
    pub heartbeat: &'static str,
    /// Extra environment (e.g. OMP_NUM_THREADS).
    pub env: Vec<(String, String)>,
    pub extra_args: Vec<String>,
}

/// One `diffusiond serve` process, its stderr in `log`.
pub struct Replica {
    pub port: u16,
    pub log: PathBuf,
    process: Killed,
}

impl Replica {
    pub fn binary() -> PathBuf {
        std::env::var_os("DIFFUSIOND_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_diffusiond")))
    }

    /// Starts a replica (not waiting for it: see [`Replica::wait_ready`]).
    pub fn spawn(dir: &Path, name: &str, options: &ReplicaOptions) -> Self {
        let port = free_port();
        let log = dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log).expect("replica log");
        let mut command = Command::new(Self::binary());
        command
            .args(["serve", "--device", "cpu", "--no-warmup", "--bind"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--model")
            .arg(&options.model)
            .arg("--data-dir")
            .arg(dir.join(format!("{name}-data")))
            .arg("--max-active-jobs")
            .arg(options.max_active_jobs.to_string())
            .args(["--queue-reclaim-after", options.reclaim_after, "--queue-heartbeat", options.heartbeat])
            .args(&options.extra_args)
            .env("RUST_LOG", "info")
            .env("OMP_WAIT_POLICY", "PASSIVE")
            .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if !options.store.is_empty() {
            command.arg("--store").arg(&options.store);
        }
        let child = command.spawn().expect("spawn diffusiond");
        Self { port, log, process: Killed(Some(child)) }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `/ready` (models loaded, reading the queue).
    pub fn wait_ready(&mut self, limit: Duration) {
        let port = self.port;
        let log = self.log.clone();
        let process = &mut self.process;
        wait_until("the replica is ready", limit, || {
            if let Some(status) = process.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("diffusiond exited ({status}):\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            http_status(port, "/ready") == Some(200)
        });
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGTERM, then waits for the process to exit.
    pub fn terminate(&mut self, limit: Duration) -> bool {
        let Some(pid) = self.pid() else { return true };
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.process.0.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some()) {
                self.process.0 = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

/// The status of `GET path` on a loopback port (None when nothing answers).
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// A counter's value in a Prometheus text exposition (0 when absent).
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
