//! The server end to end on 127.0.0.1:0 with the tiny fixture cascade: real HTTP,
//! the real worker thread and the embedded store. Concurrent requests share UNet
//! calls and still equal the same requests run alone; sync PNG and JSON; SSE;
//! cancel; a sync client that hangs up cancels its job; 429 when the queue is
//! full; the official `openai` client; draining on shutdown.

mod common;

use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::fixture_dir;
use common::server::start;
use diffusiond::api::ApiConfig;
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::pipeline::{Cascade, LoadOptions, RequestSpec};
use diffusiond::server::ServerConfig;
use diffusiond::worker::{EngineConfig, QueueLimits};
use serde_json::{json, Value};

const CPU: LoadOptions = LoadOptions { device: DeviceSetting::Cpu, precision: Precision::F32 };

fn config(name: &str) -> ServerConfig {
    let data_dir = std::env::temp_dir().join(format!("diffusiond-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    ServerConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        model_dir: fixture_dir().join("cascade"),
        data_dir,
        store: None,
        shared_queue: Default::default(),
        load: CPU,
        engine: EngineConfig::default(),
        limits: QueueLimits { max_waiting_jobs: 256, retry_after_secs: 2 },
        api: ApiConfig::default(),
        warmup: true,
        drain_timeout: Duration::from_secs(30),
        retention: Duration::from_secs(3600),
    }
}

async fn wait_done(client: &reqwest::Client, base: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let doc: Value = client.get(format!("{base}/jobs/{id}")).send().await.unwrap().json().await.unwrap();
        if ["succeeded", "failed", "canceled"].contains(&doc["status"].as_str().unwrap()) {
            return doc;
        }
        assert!(Instant::now() < deadline, "job {id} did not finish: {doc}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The whole body of an event stream that ends (each chunk within a minute).
async fn read_to_end(stream: &mut reqwest::Response) -> String {
    let mut text = String::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), stream.chunk()).await.unwrap().unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text
}

fn direct_png(spec: &RequestSpec, index: usize) -> Vec<u8> {
    let cascade = Cascade::load(&fixture_dir().join("cascade"), &CPU).unwrap();
    let request = cascade.plan(spec).unwrap();
    cascade.generate(&request, &mut |_| ControlFlow::Continue(())).unwrap()[index].png().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_requests_share_unet_calls_and_match_running_alone() {
    let (server, base) = start(config("concurrent")).await;
    let client = reqwest::Client::new();
    let warmup_calls = server.stats.unet_calls.load(Ordering::Relaxed);
    let bodies: Vec<Value> = (0..16)
        .map(|i| json!({"prompt": format!("{} red circles", 1 + i % 3), "seed": 100 + i, "steps": 4 + i % 5, "guidance_scale": 2.0 + i as f64 * 0.5}))
        .collect();
    let ids: Vec<String> = futures::future::join_all(bodies.iter().map(|b| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let r = client.post(format!("{base}/generate")).header("Prefer", "respond-async").json(b).send().await.unwrap();
            assert_eq!(r.status(), 202);
            assert!(r.headers()["location"].to_str().unwrap().starts_with("/jobs/"));
            r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
        }
    }))
    .await;
    let mut sequential = 0usize;
    for (id, body) in ids.iter().zip(&bodies) {
        let doc = wait_done(&client, &base, id).await;
        assert_eq!(doc["status"], "succeeded", "{doc}");
        sequential += doc["request"]["stages"].as_array().unwrap().iter().map(|s| s["steps"].as_u64().unwrap() as usize).sum::<usize>();
        assert_eq!(doc["images"][0]["url"], format!("/jobs/{id}/images/0"));
        assert_eq!(doc["images"][0]["seed"], body["seed"]);
    }
    let calls = server.stats.unet_calls.load(Ordering::Relaxed) - warmup_calls;
    println!("16 concurrent requests: {calls} UNet calls; one at a time they take {sequential}");
    assert!(calls * 3 < sequential as u64, "{calls} calls is not far fewer than {sequential}");

    // Batching never changes an image: job 5 equals the same request run alone.
    let png = client.get(format!("{base}/jobs/{}/images/0", ids[5])).send().await.unwrap();
    assert_eq!(png.headers()["content-type"], "image/png");
    let spec = RequestSpec {
        prompt: bodies[5]["prompt"].as_str().unwrap().into(),
        n: 1,
        seed: Some(105),
        steps: Some(4),
        guidance_scale: Some(4.5),
        ..Default::default()
    };
    assert_eq!(png.bytes().await.unwrap().to_vec(), direct_png(&spec, 0));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_requests_return_png_or_json_and_sse_streams_progress() {
    let (server, base) = start(config("sync")).await;
    let client = reqwest::Client::new();
    let body = json!({"prompt": "a blue square", "seed": 7, "steps": 3});
    let png = client.post(format!("{base}/generate")).header("Accept", "image/png").json(&body).send().await.unwrap();
    assert_eq!(png.status(), 200);
    assert_eq!(png.headers()["content-type"], "image/png");
    let spec = RequestSpec { prompt: "a blue square".into(), n: 1, seed: Some(7), steps: Some(3), ..Default::default() };
    assert_eq!(png.bytes().await.unwrap().to_vec(), direct_png(&spec, 0));

    let json_body = json!({"prompt": "a blue square", "seed": 7, "steps": 3, "n": 2, "size": "16x16"});
    let doc: Value = client.post(format!("{base}/generate")).json(&json_body).send().await.unwrap().json().await.unwrap();
    assert_eq!(doc["images"].as_array().unwrap().len(), 2);
    assert_eq!(doc["images"][1]["seed"], 8);
    assert!(doc["timings"]["compute_ms"].as_f64().is_some(), "{doc}");

    // SSE: start a job, then follow it to its end.
    let job: Value = client
        .post(format!("{base}/generate"))
        .header("Prefer", "respond-async")
        .json(&json!({"prompt": "a ring", "seed": 1, "steps": 20}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    let mut stream = client.get(format!("{base}/jobs/{id}/events")).send().await.unwrap();
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let text = read_to_end(&mut stream).await;
    assert!(text.contains("event: progress"), "{text}");
    assert!(text.contains("event: stage_done"), "{text}");
    assert!(text.trim_end().contains("event: succeeded"), "{text}");
    server.shutdown().await.unwrap();
}

fn fixture_b64(name: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(fixture_dir().join("edit").join(name)).unwrap())
}

/// Every image input through the native route: the served image is the one the
/// pipeline makes directly, in the asked format; previews arrive on the SSE stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_inputs_and_previews_over_http() {
    use diffusiond::pipeline::{Mask, Picture, SourceSpec};
    let (server, base) = start(config("sources")).await;
    let client = reqwest::Client::new();
    let (image, mask) = (fixture_b64("image32.png"), fixture_b64("mask32.png"));
    let picture = || Picture::from_image(&image::open(fixture_dir().join("edit/image32.png")).unwrap());
    let cases = [
        (
            json!({"prompt": "a blue square", "seed": 2, "steps": 4, "source": {"kind": "image", "image": image, "strength": 0.5}}),
            RequestSpec { source: Some(SourceSpec::Image { image: picture(), strength: Some(0.5) }), ..Default::default() },
        ),
        (
            json!({"prompt": "a blue square", "seed": 2, "steps": 4, "source": {"kind": "inpaint", "image": image, "mask": format!("data:image/png;base64,{mask}")}}),
            RequestSpec {
                source: Some(SourceSpec::Inpaint {
                    image: picture(),
                    mask: Mask::from_image(&image::open(fixture_dir().join("edit/mask32.png")).unwrap()),
                    strength: None,
                }),
                ..Default::default()
            },
        ),
        (
            json!({"prompt": "a blue square", "seed": 2, "steps": 4, "interpolate": {"seed": 5, "prompt": "a red ring"}, "n": 2}),
            RequestSpec { n: 2, noise: diffusiond::pipeline::NoiseMix::Interpolation { seed: 5, prompt: Some("a red ring".into()) }, ..Default::default() },
        ),
    ];
    for (body, spec) in cases {
        let doc: Value = client.post(format!("{base}/generate")).json(&body).send().await.unwrap().json().await.unwrap();
        let spec = RequestSpec { prompt: "a blue square".into(), seed: Some(2), steps: Some(4), n: spec.n.max(1), ..spec };
        for (i, image) in doc["images"].as_array().unwrap_or_else(|| panic!("{doc}")).iter().enumerate() {
            use base64::Engine as _;
            let png = base64::engine::general_purpose::STANDARD.decode(image["b64_json"].as_str().unwrap()).unwrap();
            assert_eq!(png, direct_png(&spec, i), "{}", body["source"]["kind"]);
        }
    }
    // Upscaling a 16 px picture, as JPEG.
    let small = {
        use base64::Engine as _;
        let mut bytes = Vec::new();
        picture().resized((16, 16)).0.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    let body = json!({"prompt": "", "source": {"kind": "upscale", "image": small}, "output_format": "jpeg", "output_compression": 90});
    let jpeg = client.post(format!("{base}/generate")).header("Accept", "image/jpeg").json(&body).send().await.unwrap();
    assert_eq!(jpeg.headers()["content-type"], "image/jpeg");
    let decoded = image::load_from_memory(&jpeg.bytes().await.unwrap()).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (32, 32));

    // Previews: every 3 steps of a 12-step base stage, on the job's event stream.
    let job: Value = client
        .post(format!("{base}/generate"))
        .header("Prefer", "respond-async")
        .json(&json!({"prompt": "a ring", "seed": 1, "steps": 12, "preview_every": 3, "stages": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    let mut stream = client.get(format!("{base}/jobs/{id}/events")).send().await.unwrap();
    let text = read_to_end(&mut stream).await;
    let previews: Vec<Value> = text
        .split("\n\n")
        .filter(|e| e.contains("event: preview"))
        .map(|e| serde_json::from_str(e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap()).unwrap())
        .collect();
    // Steps 3, 6 and 9 (not 12: the finished image follows).
    assert_eq!(previews.iter().map(|p| p["step"].as_u64().unwrap()).collect::<Vec<_>>(), [3, 6, 9], "{text}");
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD.decode(previews[0]["images"][0].as_str().unwrap()).unwrap();
    let preview = image::load_from_memory(&png).unwrap();
    assert_eq!((preview.width(), preview.height()), (16, 16));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_disconnect_and_a_full_queue() {
    let mut cfg = config("cancel");
    cfg.engine.max_active_jobs = 1;
    cfg.limits.max_waiting_jobs = 2;
    let (server, base) = start(cfg).await;
    let client = reqwest::Client::new();
    let long = json!({"prompt": "a star", "seed": 1, "steps": 1000});
    let submit = |body: Value| {
        let client = client.clone();
        let base = base.clone();
        async move { client.post(format!("{base}/generate")).header("Prefer", "respond-async").json(&body).send().await.unwrap() }
    };
    let running: Value = submit(long.clone()).await.json().await.unwrap();
    let running_id = running["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let doc: Value = client.get(format!("{base}/jobs/{running_id}")).send().await.unwrap().json().await.unwrap();
        if doc["status"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Two wait; the third is refused with Retry-After.
    let waiting: Value = submit(long.clone()).await.json().await.unwrap();
    assert_eq!(waiting["queue_position"], 0, "{waiting}");
    submit(long.clone()).await;
    let refused = submit(long.clone()).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "2");
    let err: Value = refused.json().await.unwrap();
    assert!(err["error"]["type"].is_string(), "{err}");

    // Cancel is idempotent and stops the running job.
    for _ in 0..2 {
        let r = client.post(format!("{base}/jobs/{running_id}/cancel")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(wait_done(&client, &base, &running_id).await["status"], "canceled");
    let waiting_id = waiting["id"].as_str().unwrap();
    client.post(format!("{base}/jobs/{waiting_id}/cancel")).send().await.unwrap();
    assert_eq!(wait_done(&client, &base, waiting_id).await["status"], "canceled");

    // A sync client that hangs up cancels its job.
    let addr = server.addr;
    let hang_up = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let body = json!({"prompt": "a moon", "seed": 3, "steps": 1000}).to_string();
        write!(s, "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // Closing the socket with the response still pending.
        drop(s);
    });
    hang_up.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // The only job about "a moon" is the hung-up one: find it through the store.
        let store = diffusiond::jobs::EmbeddedStore::open(&std::env::temp_dir().join(format!("diffusiond-e2e-cancel-{}", std::process::id()))).unwrap();
        let moon: Vec<_> = diffusiond::jobs::JobStore::unfinished(&store).unwrap().into_iter().filter(|j| j.request.prompt == "a moon").collect();
        if moon.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the hung-up client's job is still {:?}", moon[0].status);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await.unwrap();
}

fn reference_python() -> PathBuf {
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-fixtures/bin/python");
    assert!(py.exists(), "{} is missing: run `make refenv` (make test does)", py.display());
    py
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_generates_images() {
    let (server, base) = start(config("openai")).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/openai_client_check.py");
    let out = tokio::process::Command::new(reference_python()).arg(script).arg(&base).arg("32x32").output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let result: Value = serde_json::from_slice(out.stdout.trim_ascii_end().rsplit(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(result["sizes"], json!([[32, 32], [32, 32]]));
    assert!(result["url"].as_str().unwrap().contains("/jobs/"), "{result}");
    assert_eq!(result["error"]["param"], "size", "{result}");
    assert!(result["error"]["status"].as_u64().unwrap() >= 400);
    // Edits: the opaque half of the mask comes back exactly; a whole-image edit as JPEG; variations.
    assert_eq!(result["edit_kept_unmasked"], true, "{result}");
    assert_eq!(result["edit_jpeg"], true, "{result}");
    assert_eq!(result["variations"], json!([[32, 32], [32, 32]]));
    // output_format on the other two routes.
    assert_eq!(result["webp"], true, "{result}");
    assert_eq!(result["variation_jpeg"], true, "{result}");
    // Streaming: two partial images (x̂₀ of the 16 px base stage), then the finished one.
    let partial = json!({"type": "image_generation.partial_image", "size": [16, 16]});
    let stream: Vec<Value> = result["stream"].as_array().unwrap().clone();
    assert_eq!(stream.len(), 3, "{result}");
    for (i, event) in stream[..2].iter().enumerate() {
        assert_eq!((event["type"].clone(), event["size"].clone(), event["index"].as_u64()), (partial["type"].clone(), partial["size"].clone(), Some(i as u64)));
    }
    assert_eq!(stream[2]["type"], "image_generation.completed");
    assert_eq!(stream[2]["size"], json!([32, 32]));
    server.shutdown().await.unwrap();
}

#[test]
fn a_killed_server_loses_no_accepted_job() {
    let data = std::env::temp_dir().join(format!("diffusiond-e2e-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let serve = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_diffusiond"))
            .args(["serve", "--device", "cpu", "--no-warmup", "--max-active-jobs", "2", "--bind"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--model")
            .arg(fixture_dir().join("cascade"))
            .arg("--data-dir")
            .arg(&data)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let http = |method: &str, path: &str, body: Option<&Value>| -> Option<(u16, Value)> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        let body = body.map(Value::to_string).unwrap_or_default();
        write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nPrefer: respond-async\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let json = text.split("\r\n\r\n").nth(1).and_then(|b| serde_json::from_str(b).ok()).unwrap_or(Value::Null);
        Some((status, json))
    };
    let wait_ready = || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while http("GET", "/ready", None).map(|(s, _)| s) != Some(200) {
            assert!(Instant::now() < deadline, "server not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut child = serve();
    wait_ready();
    let ids: Vec<String> = (0..6)
        .map(|i| {
            let (status, doc) = http("POST", "/generate", Some(&json!({"prompt": "a square", "seed": i, "steps": 60}))).unwrap();
            assert_eq!(status, 202);
            doc["id"].as_str().unwrap().to_owned()
        })
        .collect();
    // Kill it while it runs them.
    let deadline = Instant::now() + Duration::from_secs(30);
    while http("GET", &format!("/jobs/{}", ids[0]), None).map(|(_, d)| d["status"] == "running") != Some(true) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let mut child = serve();
    wait_ready();
    // All six jobs, one after another: generous, since the other tests of this
    // file share the machine's cores meanwhile.
    let deadline = Instant::now() + Duration::from_secs(300);
    for id in &ids {
        loop {
            let (_, doc) = http("GET", &format!("/jobs/{id}"), None).unwrap();
            if doc["status"] == "succeeded" {
                assert_eq!(doc["images"].as_array().unwrap().len(), 1, "one result per job: {doc}");
                break;
            }
            assert_ne!(doc["status"], "failed", "{doc}");
            assert!(Instant::now() < deadline, "job {id} did not finish after the restart: {doc}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_dir_all(&data).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_running_jobs_and_keeps_queued_ones() {
    let mut cfg = config("drain");
    cfg.engine.max_active_jobs = 1;
    // Long enough for the running job on a loaded 2-core machine: this test is
    // about what a drain keeps, not about its deadline.
    cfg.drain_timeout = Duration::from_secs(180);
    let data_dir = cfg.data_dir.clone();
    let (server, base) = start(cfg).await;
    let client = reqwest::Client::new();
    let submit = |steps: u64| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let body = json!({"prompt": "a triangle", "seed": 1, "steps": steps});
            let doc: Value = client.post(format!("{base}/generate")).header("Prefer", "respond-async").json(&body).send().await.unwrap().json().await.unwrap();
            doc["id"].as_str().unwrap().to_owned()
        }
    };
    let running = submit(60).await;
    let queued = submit(60).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get(format!("{base}/jobs/{running}")).send().await.unwrap().json::<Value>().await.unwrap()["status"] != "running" {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopper = server.stopper();
    let mut readiness = server.readiness.clone();
    let done = tokio::spawn(server.shutdown());
    stopper.send(true).unwrap();
    // Draining: not ready, and new work is refused (the listener may already be closed).
    readiness.wait_for(|r| matches!(r, diffusiond::worker::Readiness::Draining(_))).await.unwrap();
    if let Ok(r) = client.post(format!("{base}/generate")).json(&json!({"prompt": "late"})).send().await {
        assert_eq!(r.status(), 503);
    }
    done.await.unwrap().unwrap();
    // The running job finished; the queued one waits in the store for the next start.
    let store = diffusiond::jobs::EmbeddedStore::open(&data_dir).unwrap();
    let get = |id: &str| diffusiond::jobs::JobStore::get(&store, id.parse().unwrap()).unwrap().unwrap().status;
    assert_eq!(get(&running), diffusiond::jobs::JobStatus::Succeeded);
    assert_eq!(get(&queued), diffusiond::jobs::JobStatus::Queued);
}
