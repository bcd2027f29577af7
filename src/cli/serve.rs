//! `diffusiond serve`: the HTTP server. Every setting is a flag with an
//! environment variable and a default (one config struct, `main.rs` stays thin).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::http::HeaderValue;
use clap::Args;
use diffusiond::api::ApiConfig;
use diffusiond::server::{self, ServerConfig};
use diffusiond::worker::{EngineConfig, QueueLimits, SharedQueueConfig};

use super::generate::ModelArgs;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, env = "DIFFUSIOND_BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,
    /// Where jobs and their images persist (SQLite), when there is no --store.
    #[arg(long, env = "DIFFUSIOND_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Where jobs, images and the work queue live. Absent: the embedded store
    /// in --data-dir, for this process alone. A Redis URL
    /// (redis://[:password@]host:port/db, rediss://…, redis+unix:///path?db=N):
    /// the store and queue several replicas share behind a load balancer. The
    /// queue is the stream `diffusiond:queue`, read by the consumer group
    /// `workers`; each replica takes only the jobs it can start at once,
    /// delivery is at-least-once (a job whose replica dies runs again on
    /// another, from the start; one result is kept), and a job delivered more
    /// than --queue-max-deliveries times fails.
    #[arg(long, env = "DIFFUSIOND_STORE", value_name = "URL", hide_env_values = true, verbatim_doc_comment)]
    pub store: Option<String>,
    /// With a Redis --store: seconds a job may go without its replica's
    /// heartbeat before another replica takes it over.
    #[arg(long, env = "DIFFUSIOND_QUEUE_RECLAIM_AFTER", default_value = "60", value_name = "SECONDS", value_parser = seconds)]
    pub queue_reclaim_after: Duration,
    /// With a Redis --store: seconds between a replica's heartbeats (at most
    /// half of --queue-reclaim-after).
    #[arg(long, env = "DIFFUSIOND_QUEUE_HEARTBEAT", default_value = "10", value_name = "SECONDS", value_parser = seconds)]
    pub queue_heartbeat: Duration,
    /// With a Redis --store: deliveries after which a job is given up on
    /// (failed and recorded in the stream `diffusiond:queue:dead`).
    #[arg(long, env = "DIFFUSIOND_QUEUE_MAX_DELIVERIES", default_value_t = 3)]
    pub queue_max_deliveries: u64,
    /// Accepted bearer tokens, comma-separated; none: no authentication.
    #[arg(long, env = "DIFFUSIOND_API_KEYS", value_delimiter = ',')]
    pub api_keys: Vec<String>,
    /// Most UNet rows in one call (guided images count twice).
    #[arg(long, env = "DIFFUSIOND_MAX_BATCH_ROWS", default_value_t = 32)]
    pub max_batch_rows: usize,
    /// Most jobs running at once.
    #[arg(long, env = "DIFFUSIOND_MAX_ACTIVE_JOBS", default_value_t = 16)]
    pub max_active_jobs: usize,
    /// Jobs that may wait before new ones get 429 (with a Redis --store,
    /// counted across every replica).
    #[arg(long, env = "DIFFUSIOND_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    /// Most images per request.
    #[arg(long, env = "DIFFUSIOND_MAX_IMAGES", default_value_t = 8)]
    pub max_images: usize,
    /// Seconds a sync request waits for its images.
    #[arg(long, env = "DIFFUSIOND_SYNC_TIMEOUT", default_value_t = 300)]
    pub sync_timeout: u64,
    /// Seconds to finish running work after SIGTERM/SIGINT.
    #[arg(long, env = "DIFFUSIOND_DRAIN_TIMEOUT", default_value_t = 30)]
    pub drain_timeout: u64,
    /// Hours finished jobs and images are kept.
    #[arg(long, env = "DIFFUSIOND_RETENTION_HOURS", default_value_t = 24)]
    pub retention_hours: u64,
    /// Skip the warm-up generation before reporting ready.
    #[arg(long, env = "DIFFUSIOND_NO_WARMUP")]
    pub no_warmup: bool,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "DIFFUSIOND_LOG_JSON")]
    pub log_json: bool,
    /// Origins whose pages may call the API from a browser, comma-separated
    /// (e.g. https://app.example.com; `*`: any); none: no cross-origin access.
    #[arg(long, env = "DIFFUSIOND_CORS_ORIGINS", value_delimiter = ',', value_name = "ORIGINS")]
    pub cors_origins: Vec<String>,
    /// Do not serve the web playground at `/` (404 there instead).
    #[arg(long, env = "DIFFUSIOND_NO_UI")]
    pub no_ui: bool,
}

/// `--cors-origins` as header values: `*`, or `scheme://host[:port]` as a
/// browser sends it in `Origin` (no path, no trailing slash).
fn cors_origins(origins: &[String]) -> anyhow::Result<Vec<HeaderValue>> {
    origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .map(|o| {
            let (scheme, rest) = o.split_once("://").unwrap_or_default();
            let shaped = o == "*" || (matches!(scheme, "http" | "https") && !rest.is_empty() && !rest.contains('/'));
            anyhow::ensure!(shaped, "--cors-origins: {o:?} is not an origin like https://host[:port] (or `*`)");
            HeaderValue::from_str(o).map_err(|_| anyhow::anyhow!("--cors-origins: {o:?} is not a valid header value"))
        })
        .collect()
}

/// Parses a duration given in (possibly fractional) seconds.
fn seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text.parse().map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{text:?} is not a non-negative number of seconds"))
}

impl ServeArgs {
    fn config(&self) -> anyhow::Result<ServerConfig> {
        let mut api = ApiConfig::new(self.api_keys.iter().filter(|k| !k.is_empty()).cloned().collect());
        api.max_images = self.max_images;
        api.sync_timeout = Duration::from_secs(self.sync_timeout);
        api.ui = !self.no_ui;
        api.cors_origins = cors_origins(&self.cors_origins)?;
        let shared_queue = SharedQueueConfig {
            reclaim_after: self.queue_reclaim_after,
            heartbeat: self.queue_heartbeat,
            max_deliveries: self.queue_max_deliveries,
            ..Default::default()
        };
        if self.store.is_some() {
            shared_queue.validate().map_err(|e| anyhow::anyhow!("--queue-*: {e}"))?;
        }
        Ok(ServerConfig {
            bind: self.bind,
            model_dir: self.model.model.clone(),
            data_dir: self.data_dir.clone(),
            store: self.store.clone().filter(|s| !s.is_empty()),
            shared_queue,
            load: diffusiond::pipeline::LoadOptions { device: self.model.device, precision: self.model.precision },
            engine: EngineConfig { max_batch_rows: self.max_batch_rows, max_active_jobs: self.max_active_jobs, ..Default::default() },
            limits: QueueLimits { max_waiting_jobs: self.max_queue, retry_after_secs: 5 },
            api,
            warmup: !self.no_warmup,
            drain_timeout: Duration::from_secs(self.drain_timeout),
            retention: Duration::from_secs(self.retention_hours * 3600),
        })
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_json);
    let config = args.config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let server = server::start(config).await?;
        let stop = server.stopper();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("signal received");
            let _ = stop.send(true);
        });
        server.wait().await
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::{cors_origins, seconds};
    use std::time::Duration;

    #[test]
    fn cors_origins_are_origins() {
        let ok = cors_origins(&["https://a.example".into(), " http://127.0.0.1:3000 ".into(), "".into(), "*".into()]).unwrap();
        assert_eq!(ok, ["https://a.example", "http://127.0.0.1:3000", "*"]);
        for bad in ["a.example", "https://a.example/", "ftp://a.example", "https://"] {
            assert!(cors_origins(&[bad.into()]).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn seconds_may_be_fractional_but_not_negative() {
        assert_eq!(seconds("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(seconds("60"), Ok(Duration::from_secs(60)));
        assert!(seconds("-1").is_err() && seconds("soon").is_err());
    }
}
