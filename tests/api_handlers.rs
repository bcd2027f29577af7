//! The HTTP API through `Router::oneshot` (axum's `examples/testing`), against
//! an in-memory store and a fake queue that finishes jobs the way the worker
//! does. No models, no network.

mod api_support;

use std::sync::Arc;
use std::time::Duration;

use api_support::{fake_png, get, json_request, post_json, Behaviour, Harness};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use diffusiond::api::ApiConfig;
use diffusiond::jobs::{JobId, JobStatus};
use diffusiond::worker::Readiness;
use serde_json::{json, Value};

fn error_param(reply: &api_support::Reply) -> (String, String) {
    let e = &reply.json()["error"];
    (e["param"].as_str().unwrap_or_default().to_owned(), e["message"].as_str().unwrap_or_default().to_owned())
}

async fn invalid(h: &Harness, body: Value) -> (String, String) {
    let reply = h.send(post_json("/generate", &body)).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", reply.text());
    assert_eq!(reply.json()["error"]["type"], "invalid_request");
    error_param(&reply)
}

#[tokio::test]
async fn validation_errors_name_the_field_and_the_range() {
    let h = Harness::new(Behaviour::Hold);
    let (param, msg) = invalid(&h, json!({"prompt": "x", "colour": "red"})).await;
    assert_eq!(param, "colour", "{msg}");
    assert_eq!(invalid(&h, json!({"negative_prompt": "x"})).await.0, "prompt");
    assert_eq!(invalid(&h, json!({"prompt": "x", "n": "two"})).await.0, "n");
    let (param, msg) = invalid(&h, json!({"prompt": "x", "n": 0})).await;
    assert_eq!((param.as_str(), msg.as_str()), ("n", "invalid `n`: 0 is outside 1..=8"));
    assert_eq!(invalid(&h, json!({"prompt": "x", "n": 9})).await.0, "n");
    let (param, msg) = invalid(&h, json!({"prompt": "x", "size": "64x64"})).await;
    assert_eq!(param, "size");
    assert!(msg.contains("16x16, 32x32"), "{msg}");
    let (param, msg) = invalid(&h, json!({"prompt": "x", "sampler": "euler"})).await;
    assert_eq!(param, "sampler");
    assert!(msg.contains("dpmsolver++"), "{msg}");
    let (param, msg) = invalid(&h, json!({"prompt": "x", "steps": 5000})).await;
    assert_eq!(param, "steps");
    assert!(msg.contains("1..=1000"), "{msg}");
    let (param, _) = invalid(&h, json!({"prompt": "x", "stage_overrides": [{"stage": 1, "steps": 0}]})).await;
    assert_eq!(param, "stages[1].steps");
    let (param, _) = invalid(&h, json!({"prompt": "x", "stage_overrides": [{"stage": 1, "cfg": 2}]})).await;
    assert_eq!(param, "stage_overrides[0].cfg");
    assert_eq!(invalid(&h, json!({"prompt": "  "})).await.0, "prompt");
    assert_eq!(invalid(&h, json!({"prompt": "x", "size": "16x16", "stages": 2})).await.0, "stages");
    let malformed = h.send(Request::post("/generate").header("content-type", "application/json").body(Body::from("{\"prompt\":")).unwrap()).await;
    assert_eq!(malformed.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_param(&malformed).0, "body");
    assert_eq!(h.store.len(), 0, "nothing invalid is stored");
}

#[tokio::test]
async fn body_size_and_content_type() {
    let config = ApiConfig { max_body_bytes: 256, ..ApiConfig::default() };
    let h = Harness::with_config(Behaviour::Hold, config);
    let big = json!({"prompt": "x".repeat(1000)});
    let reply = h.send(post_json("/generate", &big)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", reply.text());
    assert_eq!(reply.json()["error"]["type"], "payload_too_large");
    let reply = h.send(Request::post("/generate").body(Body::from("{\"prompt\": \"x\"}")).unwrap()).await;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(reply.json()["error"]["type"], "unsupported_media_type");
}

#[tokio::test]
async fn not_ready_is_503_with_retry_after() {
    let h = Harness::new(Behaviour::Hold);
    h.readiness.send_replace(Readiness::Loading);
    for reply in [h.send(post_json("/generate", &json!({"prompt": "x"}))).await, h.send(get("/ready")).await] {
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.json()["error"]["type"], "not_ready");
        assert_eq!(reply.header("retry-after"), Some("5"));
    }
    assert_eq!(h.send(get("/info")).await.status, StatusCode::SERVICE_UNAVAILABLE);
    h.readiness.send_replace(Readiness::Failed("/models/base/unet: missing".into()));
    let reply = h.send(get("/ready")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!reply.text().contains("/models"), "no internals: {}", reply.text());
    h.readiness.send_replace(Readiness::Draining(Arc::new(api_support::cascade_info())));
    let reply = h.send(post_json("/generate", &json!({"prompt": "x"}))).await;
    assert_eq!((reply.status, reply.json()["error"]["type"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("shutting_down")));
    assert_eq!(h.send(get("/info")).await.status, StatusCode::OK, "a draining server still describes itself");
    assert_eq!(h.send(get("/health")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn full_queue_is_429_with_retry_after_and_stores_nothing() {
    let h = Harness::new(Behaviour::Full);
    let reply = h.send(post_json("/generate", &json!({"prompt": "x"}))).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("retry-after"), Some("7"));
    assert_eq!(reply.json()["error"]["type"], "queue_full");
    assert_eq!(h.store.len(), 0);
}

fn async_generate(body: &Value) -> Request<Body> {
    let mut r = post_json("/generate", body);
    r.headers_mut().insert("prefer", "respond-async".parse().unwrap());
    r
}

#[tokio::test]
async fn async_generate_and_the_job_document() {
    let h = Harness::new(Behaviour::Hold);
    let first = h.send(async_generate(&json!({"prompt": "first"}))).await;
    let reply = h.send(async_generate(&json!({"prompt": "a cat", "n": 2, "seed": 7, "size": "16x16", "steps": 4, "sampler": "ddim"}))).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let doc = reply.json();
    let id = doc["id"].as_str().unwrap().to_owned();
    assert_eq!(reply.header("location"), Some(format!("/jobs/{id}").as_str()));
    assert_eq!(first.status, StatusCode::ACCEPTED);

    let reply = h.send(get(&format!("/jobs/{id}"))).await;
    assert_eq!(reply.status, StatusCode::OK);
    let doc = reply.json();
    assert_eq!(doc["status"], "queued");
    assert_eq!(doc["queue_position"], 1, "one job ahead");
    assert!(doc["progress"].is_null() && doc["started_at"].is_null() && doc["error"].is_null());
    let created = doc["created_at"].as_str().unwrap();
    assert!(created.len() == 24 && created.ends_with('Z') && created.as_bytes()[10] == b'T', "{created}");
    assert_eq!(doc["images"], json!([]));
    let request = &doc["request"];
    assert_eq!((request["prompt"].as_str(), request["n"].as_u64(), request["seed"].as_u64()), (Some("a cat"), Some(2), Some(7)));
    let stages = request["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 1, "size 16x16 stops after the base stage");
    assert_eq!((stages[0]["sampler"].as_str(), stages[0]["steps"].as_u64()), (Some("ddim"), Some(4)));
    assert_eq!(stages[0]["guidance_scale"], 4.0);

    let id: JobId = id.parse().unwrap();
    h.queue.finish(id, Behaviour::Succeed);
    let doc = h.send(get(&format!("/jobs/{id}"))).await.json();
    assert_eq!(doc["status"], "succeeded");
    assert!(doc["queue_position"].is_null());
    assert_eq!(doc["progress"]["fraction"], 1.0);
    assert_eq!(doc["images"][1]["url"], format!("/jobs/{id}/images/1"));
    assert_eq!(doc["images"][1]["seed"], 8);
}

#[tokio::test]
async fn unknown_jobs_are_404() {
    let h = Harness::new(Behaviour::Hold);
    for uri in [format!("/jobs/{}", uuid::Uuid::new_v4()), "/jobs/not-a-uuid".into(), format!("/jobs/{}/images/0", uuid::Uuid::new_v4())] {
        let reply = h.send(get(&uri)).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(reply.json()["error"]["type"], "not_found");
    }
    let reply = h.send(Request::post(format!("/jobs/{}/cancel", uuid::Uuid::new_v4())).body(Body::empty()).unwrap()).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn put_is_idempotent() {
    let h = Harness::new(Behaviour::Hold);
    let id = uuid::Uuid::new_v4();
    let body = json!({"prompt": "a dog", "seed": 3});
    let first = h.send(json_request("PUT", &format!("/jobs/{id}"), &body)).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    assert_eq!(first.header("location"), Some(format!("/jobs/{id}").as_str()));
    assert_eq!(first.json()["id"], id.to_string());
    // A retry, even while the queue is full, returns the same job.
    h.set_behaviour(Behaviour::Full);
    let second = h.send(json_request("PUT", &format!("/jobs/{id}"), &body)).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(first.json(), second.json());
    assert_eq!(h.queue.submitted.lock().unwrap().as_slice(), &[id], "submitted once");
    assert_eq!(h.send(json_request("PUT", "/jobs/nope", &body)).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn cancel_is_idempotent() {
    let h = Harness::new(Behaviour::Hold);
    let id = h.send(async_generate(&json!({"prompt": "x"}))).await.json()["id"].as_str().unwrap().to_owned();
    let cancel = || Request::post(format!("/jobs/{id}/cancel")).body(Body::empty()).unwrap();
    let a = h.send(cancel()).await;
    let b = h.send(cancel()).await;
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
    assert_eq!(a.json()["status"], "canceled");
    assert_eq!(a.json(), b.json());
    assert_eq!(h.queue.canceled.lock().unwrap().len(), 1, "the queue is told once; the second call sees a terminal job");
}

#[tokio::test]
async fn images_download_as_png() {
    let h = Harness::new(Behaviour::Hold);
    let id: JobId = h.send(async_generate(&json!({"prompt": "x", "n": 2}))).await.json()["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(h.send(get(&format!("/jobs/{id}/images/0"))).await.status, StatusCode::NOT_FOUND, "not finished yet");
    h.queue.finish(id, Behaviour::Succeed);
    let reply = h.send(get(&format!("/jobs/{id}/images/1"))).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), Some("image/png"));
    assert_eq!(reply.body, fake_png(1));
    assert_eq!(h.send(get(&format!("/jobs/{id}/images/2"))).await.status, StatusCode::NOT_FOUND);
    assert_eq!(h.send(get(&format!("/jobs/{id}/images/x"))).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn events_stream_state_progress_and_the_end() {
    let h = Harness::new(Behaviour::Hold);
    let id: JobId = h.send(async_generate(&json!({"prompt": "x"}))).await.json()["id"].as_str().unwrap().parse().unwrap();
    let response = tower::ServiceExt::oneshot(h.router.clone(), get(&format!("/jobs/{id}/events"))).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    h.queue.finish(id, Behaviour::Succeed);
    let text = api_support::Reply::read(response).await.text();
    let names: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(names, ["state", "started", "progress", "stage_done", "progress", "stage_done", "succeeded"], "{text}");
    let data: Vec<Value> = text.lines().filter_map(|l| l.strip_prefix("data: ")).map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(data[0]["status"], "queued");
    assert_eq!(data[2]["stage_name"], "base");
    assert_eq!(data[5]["stage"], 1);
    assert_eq!(data[6]["status"], "succeeded");
    // A finished job's stream is its state and its end.
    let text = h.send(get(&format!("/jobs/{id}/events"))).await.text();
    let names: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(names, ["state", "succeeded"]);
}

#[tokio::test]
async fn sync_generate_returns_png_or_json() {
    let h = Harness::new(Behaviour::Succeed);
    let mut request = post_json("/generate", &json!({"prompt": "x", "size": "32x32"}));
    request.headers_mut().insert("accept", "image/png".parse().unwrap());
    let reply = h.send(request).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("image/png"));
    assert_eq!(reply.body, fake_png(0));

    let reply = h.send(post_json("/generate", &json!({"prompt": "x", "n": 2, "seed": 40}))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let body = reply.json();
    let images = body["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let png = base64::engine::general_purpose::STANDARD.decode(images[1]["b64_json"].as_str().unwrap()).unwrap();
    assert_eq!((png, images[1]["seed"].as_u64()), (fake_png(1), Some(41)));
    assert!(body["timings"]["queue_ms"].as_i64().unwrap() >= 0 && body["timings"]["compute_ms"].as_i64().unwrap() >= 0);
    let id: JobId = body["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(h.store.status(id), Some(JobStatus::Succeeded));
}

#[tokio::test]
async fn sync_failures_and_cancellations() {
    let h = Harness::new(Behaviour::Fail);
    let reply = h.send(post_json("/generate", &json!({"prompt": "x"}))).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.json()["error"]["type"], "out_of_memory");
    assert_eq!(reply.json()["error"]["message"], "the device ran out of memory");
    h.set_behaviour(Behaviour::Cancel);
    let reply = h.send(post_json("/generate", &json!({"prompt": "x"}))).await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    assert_eq!(reply.json()["error"]["type"], "canceled");
}

#[tokio::test]
async fn a_sync_client_that_leaves_cancels_its_job() {
    let h = Harness::new(Behaviour::Hold);
    let pending = tokio::spawn(tower::ServiceExt::oneshot(h.router.clone(), post_json("/generate", &json!({"prompt": "x"}))));
    let id = wait_for(|| h.queue.submitted.lock().unwrap().first().copied()).await;
    pending.abort();
    let _ = pending.await;
    wait_for(|| (h.store.status(id) == Some(JobStatus::Canceled)).then_some(())).await;
    assert_eq!(h.queue.canceled.lock().unwrap().as_slice(), &[id]);
}

#[tokio::test]
async fn a_sync_request_past_the_timeout_is_504_and_cancels() {
    let config = ApiConfig { sync_timeout: Duration::from_millis(100), ..ApiConfig::default() };
    let h = Harness::with_config(Behaviour::Hold, config);
    let reply = h.send(post_json("/generate", &json!({"prompt": "x"}))).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.json()["error"]["type"], "timeout");
    let id = h.queue.submitted.lock().unwrap()[0];
    wait_for(|| (h.store.status(id) == Some(JobStatus::Canceled)).then_some(())).await;
}

async fn wait_for<T>(mut probe: impl FnMut() -> Option<T>) -> T {
    for _ in 0..200 {
        if let Some(v) = probe() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not met within 2 s");
}

#[tokio::test]
async fn openai_images_generations() {
    let h = Harness::new(Behaviour::Succeed);
    let body = json!({"prompt": "x", "n": 2, "model": "dall-e-2", "user": "u1", "seed": 5, "num_inference_steps": 3, "guidance_scale": 2.5});
    let reply = h.send(post_json("/v1/images/generations", &body)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let out = reply.json();
    assert!(out["created"].as_i64().unwrap() > 1_600_000_000);
    let png = base64::engine::general_purpose::STANDARD.decode(out["data"][0]["b64_json"].as_str().unwrap()).unwrap();
    assert_eq!(png, fake_png(0));
    assert!(out["data"][0].get("url").is_none());

    let reply = h.send(post_json("/v1/images/generations", &json!({"prompt": "x", "response_format": "url"}))).await;
    let out = reply.json();
    let id = out["id"].as_str().unwrap();
    assert_eq!(out["data"][0]["url"], format!("/jobs/{id}/images/0"));
    assert!(out["data"][0].get("b64_json").is_none());
}

#[tokio::test]
async fn openai_errors_use_its_envelope() {
    let h = Harness::new(Behaviour::Succeed);
    let reply = h.send(post_json("/v1/images/generations", &json!({"prompt": "x", "n": 0}))).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        reply.json(),
        json!({"error": {"message": "invalid `n`: 0 is outside 1..=8", "type": "invalid_request_error", "param": "n", "code": "invalid_request"}})
    );
    let reply = h.send(post_json("/v1/images/generations", &json!({"prompt": "x", "colour": "red"}))).await;
    assert_eq!(reply.json()["error"]["param"], "colour");
    let reply = h.send(post_json("/v1/images/generations", &json!({"prompt": "x", "size": "1024x1024"}))).await;
    assert_eq!((reply.json()["error"]["param"].as_str(), reply.json()["error"]["code"].as_str()), (Some("size"), Some("invalid_request")));
    h.set_behaviour(Behaviour::Full);
    let reply = h.send(post_json("/v1/images/generations", &json!({"prompt": "x"}))).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!((reply.json()["error"]["type"].as_str(), reply.json()["error"]["code"].as_str()), (Some("rate_limit_error"), Some("queue_full")));
}

fn with_key(mut request: Request<Body>, key: &str) -> Request<Body> {
    request.headers_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

#[tokio::test]
async fn api_keys_guard_routes_and_jobs() {
    let h = Harness::with_config(Behaviour::Hold, ApiConfig::new(vec!["key-a".into(), "key-b".into()]));
    let reply = h.send(async_generate(&json!({"prompt": "x"}))).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.json()["error"]["type"], "unauthorized");
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    assert_eq!(h.send(with_key(get("/info"), "key-c")).await.status, StatusCode::UNAUTHORIZED);
    let reply = h.send(post_json("/v1/images/generations", &json!({"prompt": "x"}))).await;
    assert_eq!((reply.status, reply.json()["error"]["type"].as_str()), (StatusCode::UNAUTHORIZED, Some("authentication_error")));
    for open in ["/health", "/ready", "/metrics", "/openapi.json", "/docs/"] {
        assert_eq!(h.send(get(open)).await.status, StatusCode::OK, "{open}");
    }

    let reply = h.send(with_key(async_generate(&json!({"prompt": "x"})), "key-a")).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    let stored = diffusiond::jobs::JobStore::get(h.store.as_ref(), id.parse().unwrap()).unwrap().unwrap();
    assert_eq!(stored.owner.as_deref(), Some(diffusiond::api::auth::fingerprint("key-a").as_str()));
    assert!(!stored.owner.unwrap().contains("key-a"));
    assert_eq!(h.send(with_key(get(&format!("/jobs/{id}")), "key-a")).await.status, StatusCode::OK);
    assert_eq!(h.send(with_key(get(&format!("/jobs/{id}")), "key-b")).await.status, StatusCode::NOT_FOUND);
    let cancel = Request::post(format!("/jobs/{id}/cancel")).body(Body::empty()).unwrap();
    assert_eq!(h.send(with_key(cancel, "key-b")).await.status, StatusCode::NOT_FOUND);
    let put = json_request("PUT", &format!("/jobs/{id}"), &json!({"prompt": "x"}));
    assert_eq!(h.send(with_key(put, "key-b")).await.status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn request_ids_are_echoed_or_made() {
    let h = Harness::new(Behaviour::Hold);
    let mut request = get("/health");
    request.headers_mut().insert("x-request-id", "abc-123".parse().unwrap());
    assert_eq!(h.send(request).await.header("x-request-id"), Some("abc-123"));
    let reply = h.send(get("/jobs/nope")).await;
    assert!(reply.header("x-request-id").is_some_and(|id| uuid::Uuid::parse_str(id).is_ok()));
}

#[tokio::test]
async fn meta_endpoints() {
    let h = Harness::new(Behaviour::Succeed);
    assert_eq!(h.send(get("/health")).await.json(), json!({"status": "ok"}));
    assert_eq!(h.send(get("/ready")).await.json(), json!({"status": "ready"}));

    let info = h.send(get("/info")).await.json();
    assert_eq!((info["name"].as_str(), info["device"].as_str(), info["precision"].as_str()), (Some("tiny-if"), Some("cpu"), Some("f32")));
    assert_eq!(info["encoder"]["kind"], "bert");
    assert_eq!(info["limits"]["max_images"], 8);
    assert_eq!(info["limits"]["sizes"], json!(["16x16", "32x32"]));
    assert_eq!(info["stages"][1]["kind"], "super_resolution");
    assert_eq!(info["stages"][1]["defaults"]["noise_level"], 250);
    assert_eq!(info["stages"][0]["defaults"]["use_clipped_model_output"], json!(false));
    assert_eq!(info["stages"][1]["defaults"]["use_clipped_model_output"], json!(true));
    assert_eq!(info["stages"][0]["parameters"], 1000);
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));

    // One generation, so that the request counters exist.
    assert_eq!(h.send(post_json("/generate", &json!({"prompt": "x"}))).await.status, StatusCode::OK);
    let metrics = h.send(get("/metrics")).await;
    assert!(metrics.header("content-type").unwrap().starts_with("text/plain"));
    let text = metrics.text();
    assert!(text.contains("diffusiond_http_requests_total{route=\"/generate\",status=\"200\"}"), "{text}");
    assert!(text.contains("diffusiond_request_outcomes_total{outcome=\"ok\"}"), "{text}");
    assert!(text.contains("diffusiond_queue_depth"), "{text}");

    let spec = h.send(get("/openapi.json")).await.json();
    assert_eq!(spec["info"]["title"], "diffusiond");
    assert!(spec["paths"]["/generate"]["post"].is_object());
    assert!(spec["paths"]["/jobs/{id}"]["put"].is_object());

    let docs = h.send(get("/docs")).await;
    assert!(docs.status.is_redirection());
    let docs = h.send(get("/docs/")).await;
    assert_eq!(docs.status, StatusCode::OK);
    assert!(docs.header("content-type").unwrap().starts_with("text/html"));
    assert!(docs.text().to_lowercase().contains("swagger"));
}

fn png_b64(w: u32, h: u32, luma: u8) -> String {
    let image = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(w, h, image::Rgb([luma, luma, luma])));
    let mut bytes = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn image_inputs_are_checked_before_anything_is_queued() {
    let h = Harness::new(Behaviour::Hold);
    let image = png_b64(32, 32, 90);
    let cases = [
        (json!({"prompt": "x", "source": {"kind": "image", "image": "@@@"}}), "source.image", "base64"),
        (json!({"prompt": "x", "source": {"kind": "image", "image": "aGVsbG8="}}), "source.image", "PNG, JPEG or WebP"),
        (json!({"prompt": "x", "source": {"kind": "image", "image": png_b64(40, 20, 0)}}), "source.image", "aspect ratio"),
        // Refused from its header, before its pixels are decoded.
        (json!({"prompt": "x", "source": {"kind": "image", "image": png_b64(4097, 1, 0)}}), "source.image", "at most 4096 pixels a side"),
        (json!({"prompt": "x", "source": {"kind": "image", "image": image, "strength": 0}}), "source.strength", "outside"),
        (json!({"prompt": "x", "source": {"kind": "inpaint", "image": image, "mask": png_b64(16, 16, 255)}}), "source.mask", "16x16"),
        (json!({"prompt": "x", "source": {"kind": "inpaint", "image": image, "mask": png_b64(32, 32, 0)}}), "source.mask", "repaints nothing"),
        (json!({"prompt": "x", "source": {"kind": "upscale", "image": image}}), "source.image", "no super-resolution stage"),
        (json!({"prompt": "x", "source": {"kind": "invert", "image": image}, "sampler": "ddpm"}), "sampler", "DDIM"),
        (json!({"prompt": "x", "variation": {"seed": 1, "strength": 0.5}, "interpolate": {"seed": 2}}), "interpolate", "variation"),
        (json!({"prompt": "x", "interpolate": {"seed": 2}}), "n", "2 frames"),
        (json!({"prompt": "x", "preview_every": 0}), "preview_every", "at least 1"),
        (json!({"prompt": "x", "output_compression": 101}), "output_compression", ""),
    ];
    for (body, field, words) in cases {
        let (param, msg) = invalid(&h, body.clone()).await;
        assert_eq!(param, field, "{body}: {msg}");
        assert!(msg.contains(words), "{field}: {msg:?} lacks {words:?}");
    }
    // Unknown kinds and fields of a source are the body's errors, named by path.
    let (param, _) = invalid(&h, json!({"prompt": "x", "source": {"kind": "outpaint", "image": image}})).await;
    assert_eq!(param, "source.kind");
    let (param, _) = invalid(&h, json!({"prompt": "x", "source": {"kind": "upscale", "image": image, "strength": 0.5}})).await;
    assert!(param.starts_with("source"), "{param}");
    assert_eq!(h.store.len(), 0, "nothing invalid is stored");

    // Accepted: the job document describes the input without its pixels.
    let body = json!({"prompt": "x", "source": {"kind": "inpaint", "image": image, "mask": png_b64(32, 32, 255)}, "output_format": "webp"});
    let reply = h.send(async_generate(&body)).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let source = &reply.json()["request"]["source"];
    assert_eq!(source, &json!({"kind": "inpaint", "size": "32x32", "strength": 1.0, "prompt": null}));
}

#[tokio::test]
async fn openai_forms_name_their_fields() {
    let h = Harness::new(Behaviour::Hold);
    let multipart = |parts: &[(&str, Vec<u8>)]| {
        let mut body = Vec::new();
        for (name, bytes) in parts {
            body.extend_from_slice(format!("--X\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"f\"\r\n\r\n").as_bytes());
            body.extend_from_slice(bytes);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"--X--\r\n");
        Request::post("/v1/images/edits").header("content-type", "multipart/form-data; boundary=X").body(Body::from(body)).unwrap()
    };
    let png = base64::engine::general_purpose::STANDARD.decode(png_b64(32, 32, 10)).unwrap();
    let check = |reply: api_support::Reply, status: StatusCode, param: &str| {
        assert_eq!(reply.status, status, "{}", reply.text());
        assert_eq!(reply.json()["error"]["param"].as_str().unwrap_or_default(), param, "{}", reply.text());
    };
    check(h.send(multipart(&[("prompt", b"x".to_vec())])).await, StatusCode::UNPROCESSABLE_ENTITY, "image");
    check(h.send(multipart(&[("image", png.clone())])).await, StatusCode::UNPROCESSABLE_ENTITY, "prompt");
    check(h.send(multipart(&[("image", png.clone()), ("prompt", b"x".to_vec()), ("colour", b"red".to_vec())])).await, StatusCode::UNPROCESSABLE_ENTITY, "colour");
    check(h.send(multipart(&[("image", b"not an image".to_vec()), ("prompt", b"x".to_vec())])).await, StatusCode::UNPROCESSABLE_ENTITY, "image");
    let wide = base64::engine::general_purpose::STANDARD.decode(png_b64(4097, 1, 10)).unwrap();
    check(h.send(multipart(&[("image", wide), ("prompt", b"x".to_vec())])).await, StatusCode::UNPROCESSABLE_ENTITY, "image");
    check(h.send(multipart(&[("image", png.clone()), ("prompt", b"x".to_vec()), ("n", b"two".to_vec())])).await, StatusCode::UNPROCESSABLE_ENTITY, "n");
    check(h.send(multipart(&[("image", png.clone()), ("image[]", png.clone()), ("prompt", b"x".to_vec())])).await, StatusCode::UNPROCESSABLE_ENTITY, "image");
    let json = h.send(post_json("/v1/images/edits", &json!({"prompt": "x"}))).await;
    assert_eq!(json.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(json.json()["error"]["code"], "unsupported_media_type");
    let stream = h.send(post_json("/v1/images/generations", &json!({"prompt": "x", "partial_images": 2}))).await;
    assert_eq!((stream.status, error_param(&stream).0.as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "partial_images"));
    assert_eq!(h.store.len(), 0);
}

/// `/info` with the base stage's CLIP set to read `side`-pixel images (none: no CLIP).
fn with_clip(h: &Harness, side: Option<i64>) {
    let mut info = api_support::cascade_info();
    info.stages[0].0.clip_image_size = side;
    h.readiness.send_replace(Readiness::Ready(Arc::new(info)));
}

#[tokio::test]
async fn layout_guidance_is_planned_for_laid_out_prompts_and_range_checked() {
    let h = Harness::new(Behaviour::Hold);
    let info = h.send(get("/info")).await.json();
    assert_eq!(info["limits"]["max_layout_guidance_scale"], 1000.0);
    assert_eq!(info["stages"][0]["defaults"]["layout_guidance_scale"], 0.0);
    // A relation: stored on the base stage's plan only.
    let reply = h.send(async_generate(&json!({"prompt": "a red circle above a blue square", "layout_guidance_scale": 250.0}))).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let stages = reply.json()["request"]["stages"].clone();
    assert_eq!(stages[0]["layout_guidance_scale"], 250.0);
    assert_eq!(stages[1]["layout_guidance_scale"], 0.0, "{stages}");
    // One group of no stated size has nothing to lay out: accepted, planned as 0; a counted one is guided.
    let reply = h.send(async_generate(&json!({"prompt": "green stars", "layout_guidance_scale": 250.0}))).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    assert_eq!(reply.json()["request"]["stages"][0]["layout_guidance_scale"], 0.0);
    let reply = h.send(async_generate(&json!({"prompt": "three green stars", "layout_guidance_scale": 250.0}))).await;
    assert_eq!(reply.json()["request"]["stages"][0]["layout_guidance_scale"], 250.0);
    for bad in [json!(-1.0), json!(1000.5), json!("lots")] {
        let (param, msg) = invalid(&h, json!({"prompt": "a red circle above a blue square", "layout_guidance_scale": bad})).await;
        assert_eq!(param, "layout_guidance_scale", "{bad}: {msg}");
    }
}

#[tokio::test]
async fn super_resolution_strength_defaults_to_the_stage_and_is_range_checked() {
    let h = Harness::new(Behaviour::Hold);
    let info = h.send(get("/info")).await.json();
    assert_eq!(info["stages"][1]["defaults"]["strength"], 1.0);
    // Half of the SR stage's 8 steps from the base output, stored with the job.
    let reply = h.send(async_generate(&json!({"prompt": "x", "stage_overrides": [{"stage": 1, "strength": 0.5}]}))).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let stages = reply.json()["request"]["stages"].clone();
    assert_eq!((stages[0]["strength"].clone(), stages[1]["strength"].clone()), (json!(1.0), json!(0.5)), "{stages}");
    for bad in [json!(0.0), json!(-0.5), json!(1.5), json!("half")] {
        let (param, msg) = invalid(&h, json!({"prompt": "x", "stage_overrides": [{"stage": 1, "strength": bad}]})).await;
        assert!(param.starts_with("stage") && param.ends_with("strength"), "{bad}: {param}: {msg}");
    }
    // 0.1 of 8 steps runs none; the base stage's strength is the source's.
    let (param, msg) = invalid(&h, json!({"prompt": "x", "stage_overrides": [{"stage": 1, "strength": 0.1}]})).await;
    assert_eq!(param, "stages[1].strength", "{msg}");
    assert!(msg.contains("runs no step"), "{msg}");
    let (param, msg) = invalid(&h, json!({"prompt": "x", "stage_overrides": [{"stage": 0, "strength": 0.5}]})).await;
    assert_eq!(param, "stages[0].strength", "{msg}");
    assert_eq!(h.store.len(), 1);
}

#[tokio::test]
async fn clip_guidance_needs_a_clip_of_the_base_stage_size() {
    let h = Harness::new(Behaviour::Hold);
    let info = h.send(get("/info")).await.json();
    assert_eq!(info["clip_guidance"], json!({"available": false, "image_size": null}));
    assert_eq!(info["limits"]["max_clip_guidance_scale"], 100.0);
    // Without a CLIP: 0 (or unset) is fine, anything else names the field.
    assert_eq!(h.send(async_generate(&json!({"prompt": "x", "clip_guidance_scale": 0.0}))).await.status, StatusCode::ACCEPTED);
    let (param, msg) = invalid(&h, json!({"prompt": "x", "clip_guidance_scale": 3.0})).await;
    assert_eq!(param, "clip_guidance_scale", "{msg}");
    assert!(msg.contains("no noised CLIP"), "{msg}");
    assert_eq!(invalid(&h, json!({"prompt": "x", "clip_guidance_scale": "lots"})).await.0, "clip_guidance_scale");

    // A CLIP of another size than the base stage's 16x16.
    with_clip(&h, Some(32));
    let info = h.send(get("/info")).await.json();
    assert_eq!(info["clip_guidance"], json!({"available": false, "image_size": 32}));
    let (param, msg) = invalid(&h, json!({"prompt": "x", "clip_guidance_scale": 3.0})).await;
    assert_eq!(param, "clip_guidance_scale");
    assert!(msg.contains("32x32") && msg.contains("16x16"), "{msg}");

    // The right size: accepted and stored with the base stage's plan only.
    with_clip(&h, Some(16));
    assert_eq!(h.send(get("/info")).await.json()["clip_guidance"], json!({"available": true, "image_size": 16}));
    let reply = h.send(async_generate(&json!({"prompt": "a cat", "clip_guidance_scale": 2.5}))).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let stages = reply.json()["request"]["stages"].clone();
    assert_eq!(stages[0]["clip_guidance_scale"], 2.5);
    assert_eq!(stages[1]["clip_guidance_scale"], 0.0, "{stages}");
    // Out of range, not a number, no prompt to guide towards, no base stage to guide.
    for bad in [json!(-1.0), json!(100.5)] {
        let (param, msg) = invalid(&h, json!({"prompt": "x", "clip_guidance_scale": bad})).await;
        assert_eq!(param, "clip_guidance_scale");
        assert!(msg.contains("0..=100"), "{msg}");
    }
    let body = json!({"prompt": "", "clip_guidance_scale": 1.0, "source": {"kind": "image", "image": png_b64(16, 16, 90)}});
    let (param, msg) = invalid(&h, body).await;
    assert_eq!(param, "clip_guidance_scale");
    assert!(msg.contains("prompt"), "{msg}");
    let body = json!({"prompt": "x", "clip_guidance_scale": 1.0, "source": {"kind": "upscale", "image": png_b64(16, 16, 90)}});
    let (param, msg) = invalid(&h, body).await;
    assert_eq!(param, "clip_guidance_scale");
    assert!(msg.contains("upscale"), "{msg}");
    assert_eq!(h.store.len(), 2, "only the valid requests are stored");
}

#[tokio::test]
async fn classifier_guidance_needs_the_same_clip_and_combines_with_clip_guidance() {
    let h = Harness::new(Behaviour::Hold);
    assert_eq!(h.send(get("/info")).await.json()["limits"]["max_classifier_guidance_scale"], 100.0);
    assert_eq!(h.send(async_generate(&json!({"prompt": "x", "classifier_guidance_scale": 0.0}))).await.status, StatusCode::ACCEPTED);
    let (param, msg) = invalid(&h, json!({"prompt": "x", "classifier_guidance_scale": 3.0})).await;
    assert_eq!(param, "classifier_guidance_scale", "{msg}");
    assert!(msg.contains("no noised CLIP"), "{msg}");
    with_clip(&h, Some(32));
    let (param, msg) = invalid(&h, json!({"prompt": "x", "classifier_guidance_scale": 3.0})).await;
    assert_eq!(param, "classifier_guidance_scale");
    assert!(msg.contains("32x32"), "{msg}");

    with_clip(&h, Some(16));
    let body = json!({"prompt": "a red circle above a blue square", "classifier_guidance_scale": 4.5, "clip_guidance_scale": 2.0});
    let reply = h.send(async_generate(&body)).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let stages = reply.json()["request"]["stages"].clone();
    assert_eq!((stages[0]["classifier_guidance_scale"].clone(), stages[0]["clip_guidance_scale"].clone()), (json!(4.5), json!(2.0)));
    assert_eq!(stages[1]["classifier_guidance_scale"], 0.0, "{stages}");
    for bad in [json!(-0.5), json!(100.5), json!("lots"), json!(null)] {
        let body = json!({"prompt": "x", "classifier_guidance_scale": bad});
        if bad.is_null() {
            assert_eq!(h.send(async_generate(&body)).await.status, StatusCode::ACCEPTED, "null is unset");
            continue;
        }
        let (param, msg) = invalid(&h, body).await;
        assert_eq!(param, "classifier_guidance_scale", "{bad}: {msg}");
    }
    let body = json!({"prompt": "", "classifier_guidance_scale": 1.0, "source": {"kind": "image", "image": png_b64(16, 16, 90)}});
    let (param, msg) = invalid(&h, body).await;
    assert_eq!(param, "classifier_guidance_scale");
    assert!(msg.contains("prompt"), "{msg}");
    let body = json!({"prompt": "x", "classifier_guidance_scale": 1.0, "source": {"kind": "upscale", "image": png_b64(16, 16, 90)}});
    assert_eq!(invalid(&h, body).await.0, "classifier_guidance_scale");
    assert_eq!(h.store.len(), 3, "only the valid requests are stored");
}

#[tokio::test]
async fn a_running_job_shows_its_latest_preview_and_a_finished_one_does_not() {
    use diffusiond::jobs::{JobPreview, JobProgress, JobStore};
    let h = Harness::new(Behaviour::Hold);
    let reply = h.send(async_generate(&json!({"prompt": "x", "preview_every": 2}))).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    let job: JobId = id.parse().unwrap();
    let preview = JobPreview { stage: 0, step: 4, images: vec![png_b64(16, 16, 200)] };
    let progress = JobProgress { stage: 0, stages: 3, stage_name: "base".into(), step: 4, total_steps: 25, fraction: 0.1, preview: Some(preview) };
    assert!(h.store.start(job, 1).unwrap());
    h.store.set_progress(job, &progress).unwrap();
    let doc = h.send(get(&format!("/jobs/{id}"))).await.json();
    assert_eq!(doc["status"], "running", "{doc}");
    assert_eq!((doc["preview"]["stage"].as_u64(), doc["preview"]["step"].as_u64()), (Some(0), Some(4)), "{doc}");
    let png = base64::engine::general_purpose::STANDARD.decode(doc["preview"]["images"][0].as_str().unwrap()).unwrap();
    assert_eq!(image::load_from_memory(&png).unwrap().width(), 16);
    // Once the images are there, the preview is gone.
    h.queue.finish(job, Behaviour::Succeed);
    assert_eq!(h.store.status(job), Some(JobStatus::Succeeded));
    let doc = h.send(get(&format!("/jobs/{id}"))).await.json();
    assert!(doc.get("preview").is_none_or(Value::is_null), "{doc}");
}
