//! The request id travels with the job into the worker: a real `diffusiond
//! serve --log-json` on the tiny fixture cascade logs the job's worker lines
//! (started, succeeded; queue and compute times) in a `job` span that carries
//! the `x-request-id` of the request that created it, for sync, async, PUT and
//! OpenAI-style requests alike.

mod cluster;
mod common;

use std::time::{Duration, Instant};

use cluster::{Replica, ReplicaOptions, Scratch};
use common::fixture_dir;
use serde_json::{json, Value};

/// The worker's JSON log lines with `message`, as (request_id, job) pairs.
fn worker_lines(log: &str, message: &str) -> Vec<(String, String)> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == message && v["span"]["name"] == "job")
        .map(|v| (v["span"]["request_id"].as_str().unwrap_or("").to_owned(), v["span"]["job"].as_str().unwrap_or("").to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_log_lines_carry_the_request_id() {
    let scratch = Scratch::new("request-tracing");
    let options = ReplicaOptions {
        model: fixture_dir().join("cascade"),
        store: String::new(),
        max_active_jobs: 4,
        reclaim_after: "60",
        heartbeat: "10",
        env: vec![("OMP_NUM_THREADS".into(), "1".into())],
        extra_args: vec!["--log-json".into()],
    };
    let mut server = Replica::spawn(&scratch.0, "a", &options);
    server.wait_ready(Duration::from_secs(120));
    let base = server.base();
    let client = reqwest::Client::new();
    let body = json!({"prompt": "a red circle", "steps": 3, "seed": 1});

    let sync = client.post(format!("{base}/generate")).header("x-request-id", "req-sync-1").json(&body).send().await.unwrap();
    assert_eq!(sync.status(), 200);
    assert_eq!(sync.headers()["x-request-id"], "req-sync-1");
    let doc: Value = client
        .post(format!("{base}/generate"))
        .header("x-request-id", "req-async-2")
        .header("Prefer", "respond-async")
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let async_id = doc["id"].as_str().unwrap().to_owned();
    let put_id = "0b6c0d4e-6a59-4f0e-9d43-3c2f1e7a9b10";
    let put = client.put(format!("{base}/jobs/{put_id}")).header("x-request-id", "req-put-3").json(&body).send().await.unwrap();
    assert_eq!(put.status(), 201);
    let openai = client
        .post(format!("{base}/v1/images/generations"))
        .header("x-request-id", "req-openai-4")
        .json(&json!({"prompt": "a blue square"}))
        .send()
        .await
        .unwrap();
    assert_eq!(openai.status(), 200, "{:?}", openai.text().await);
    // Without a client id the server makes one: the job carries that one.
    let anonymous = client.post(format!("{base}/generate")).json(&body).send().await.unwrap();
    let made = anonymous.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(!made.is_empty());

    let wanted = ["req-sync-1", "req-async-2", "req-put-3", "req-openai-4", made.as_str()];
    let deadline = Instant::now() + Duration::from_secs(120);
    let succeeded = loop {
        let lines = worker_lines(&server.log_text(), "succeeded");
        if wanted.iter().all(|w| lines.iter().any(|(r, _)| r == w)) || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = server.log_text();
    for w in wanted {
        assert!(succeeded.iter().any(|(r, _)| r == w), "no `succeeded` line for request {w}:\n{log}");
        assert!(worker_lines(&log, "started").iter().any(|(r, _)| r == w), "no `started` line for request {w}");
    }
    // The span names the job too: the async and PUT jobs' lines carry their ids.
    assert!(succeeded.contains(&("req-async-2".to_owned(), async_id)));
    assert!(succeeded.contains(&("req-put-3".to_owned(), put_id.to_owned())));
    // Queue and compute times are on the line.
    let line = log.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).find(|v| v["fields"]["message"] == "succeeded").unwrap();
    assert!(line["fields"]["queue_ms"].is_u64() && line["fields"]["compute_ms"].is_u64(), "{line}");
}
