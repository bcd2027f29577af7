//! An in-process server for the end-to-end tests.

use std::time::{Duration, Instant};

use diffusiond::server::{self, RunningServer, ServerConfig};

/// Starts `config` on its address and waits for `/ready`; returns the server
/// and its base URL.
pub async fn start(config: ServerConfig) -> (RunningServer, String) {
    let server = server::start(config).await.unwrap();
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.get(format!("{base}/ready")).send().await.map(|r| r.status() != 200).unwrap_or(true) {
        assert!(Instant::now() < deadline, "server not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (server, base)
}
