//! Private servers on loopback for the tests and benchmark that need Redis:
//! a `redis-server` of the test's own (also the Redis job store tests'), and,
//! for the scale-out tests, `diffusiond serve` replicas as child processes and
//! nginx balancing them round-robin. Everything lives in a temporary directory
//! and is killed on drop.
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
/// with installation advice when a tool is missing, so that a machine without
/// them does not pass these tests by running none of them.
pub fn tools_present(tools: &[&str]) -> bool {
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
        eprintln!("{SKIP_ENV}=1: skipping the tests that need {}", tools.join(" and "));
        return false;
    }
    for tool in tools {
        match Command::new(program(tool)).arg("-v").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!("`{tool} -v` failed: {}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => panic!(
                "{tool} is needed by these tests but cannot be run ({e}). `make test` installs it; \
                 or run `apt-get install -y {tool}`. Set {SKIP_ENV}=1 to skip these tests."
            ),
        }
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

/// Where a private redis-server listens, which decides its URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket, `redis.sock` in the server's directory: no port to race
    /// other processes for.
    Socket,
    /// A free loopback port, the way replicas reach Redis; URLs name database
    /// `db` (a test can pick one other than 0 to see it used and named).
    Tcp { db: u8 },
}

/// A private redis-server without persistence, killed on drop.
///
/// It can be killed at once ([`Redis::kill`], as a crash or failover would)
/// and started again, empty, on the same address ([`Redis::respawn`]), so
/// that tests can watch clients reconnect to it.
pub struct Redis {
    /// The loopback port; 0 on a Unix socket.
    pub port: u16,
    listen: Listen,
    /// Holds its log (and its socket).
    dir: PathBuf,
    // Declared before `scratch`: the server is killed before its directory is removed.
    process: Killed,
    /// The directory of a server started alone, removed on drop.
    scratch: Option<Scratch>,
}

impl Redis {
    /// On a loopback port, database 0, in `dir/redis`: the shared store of a
    /// cluster whose replicas and nginx live in `dir` too.
    pub fn start(dir: &Path) -> Self {
        Self::start_in(dir, Listen::Tcp { db: 0 })
    }

    /// In a scratch directory of its own, for tests that need Redis and
    /// nothing else; `None` when these tests are skipped (see [`tools_present`]).
    pub fn start_alone(listen: Listen) -> Option<Self> {
        if !tools_present(&["redis-server"]) {
            return None;
        }
        let scratch = Scratch::new("redis");
        let mut redis = Self::start_in(&scratch.0, listen);
        redis.scratch = Some(scratch);
        Some(redis)
    }

    fn start_in(dir: &Path, listen: Listen) -> Self {
        let dir = dir.join("redis");
        std::fs::create_dir_all(&dir).expect("redis directory");
        let mut redis = Self { port: 0, listen, dir, process: Killed(None), scratch: None };
        // A port is free when picked but could be taken before Redis binds it:
        // then another is tried. A socket path is ours alone.
        let tries = if listen == Listen::Socket { 1 } else { 5 };
        let mut error = String::new();
        for _ in 0..tries {
            if listen != Listen::Socket {
                redis.port = free_port();
            }
            match redis.try_spawn() {
                Ok(()) => return redis,
                Err(e) => error = e,
            }
        }
        panic!("redis-server did not start: {error}");
    }

    /// What a store or replica is given: `redis://127.0.0.1:PORT/DB`, or
    /// `redis+unix://…/redis.sock`.
    pub fn url(&self) -> String {
        match self.listen {
            Listen::Socket => format!("redis+unix://{}", self.dir.join("redis.sock").display()),
            Listen::Tcp { db } => format!("redis://127.0.0.1:{}/{db}", self.port),
        }
    }

    /// A plain connection of the test's own, for looking at keys directly.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url()).and_then(|c| c.get_connection()).expect("redis connection")
    }

    /// SIGKILL, no clean shutdown: as a crash or failover would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the server again on the same address after [`Redis::kill`]. It
    /// comes back empty (no persistence), as a restarted cache would.
    pub fn respawn(&mut self) {
        assert!(self.process.0.is_none(), "respawn a killed redis-server only");
        if let Err(e) = self.try_spawn() {
            panic!("redis-server did not start again: {e}");
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    /// Starts redis-server on its address and waits until it answers PING.
    fn try_spawn(&mut self) -> Result<(), String> {
        let mut command = Command::new(program("redis-server"));
        command.args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
        command.arg("--dir").arg(&self.dir).arg("--logfile").arg(self.log_path());
        match self.listen {
            Listen::Socket => {
                command.args(["--port", "0", "--unixsocketperm", "700", "--unixsocket"]).arg(self.dir.join("redis.sock"));
            }
            Listen::Tcp { .. } => {
                command.args(["--bind", "127.0.0.1", "--port", &self.port.to_string()]);
            }
        }
        let child = command.stdin(Stdio::null()).stdout(Stdio::null()).spawn().expect("spawn redis-server");
        let mut process = Killed(Some(child));
        let client = redis::Client::open(self.url()).expect("redis URL");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = process.0.as_mut().and_then(|c| c.try_wait().expect("poll redis-server")) {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                return Err(format!("redis-server exited at start ({status}):\n{log}"));
            }
            let ping = client.get_connection().and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ping.is_ok() {
                self.process = process;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("redis-server did not answer within 10 s; see {}", self.log_path().display()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
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
        client_max_body_size 8192k;
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
