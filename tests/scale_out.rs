//! Scale-out end to end: a private redis-server, two `diffusiond serve --store
//! redis://…` processes on the tiny fixture cascade, and nginx balancing them
//! round-robin, all on loopback.
//!
//! 1. Twenty async jobs and four sync requests through nginx: every one
//!    succeeds, both replicas run some, and every image equals the same request
//!    run alone (same seed, same pixels, same PNG bytes).
//! 2. Eight longer jobs; one replica is killed (SIGKILL) while it runs some.
//!    After the reclaim timeout the other replica takes them over: every job
//!    succeeds, none is lost, each is completed once (one `succeeded` log line
//!    across both replicas, n images stored), and the shared queue ends empty.
//!
//! Each replica computes on one thread (`OMP_NUM_THREADS=1`): two share this
//! machine's two cores.

mod cluster;
mod common;

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use cluster::{metric, tools_present, Nginx, Redis, Replica, ReplicaOptions, Scratch};
use common::fixture_dir;
use diffusiond::jobs::{StreamOptions, WorkStream};
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::pipeline::{Cascade, LoadOptions, RequestSpec};
use serde_json::{json, Value};

const CPU: LoadOptions = LoadOptions { device: DeviceSetting::Cpu, precision: Precision::F32 };

/// One request: its JSON body and the same request as a pipeline spec.
struct Request {
    body: Value,
    spec: RequestSpec,
}

fn request(prompt: String, seed: u64, steps: usize, n: usize, guidance: f32) -> Request {
    let body = json!({"prompt": prompt, "seed": seed, "steps": steps, "n": n, "guidance_scale": guidance});
    let spec = RequestSpec { prompt, n, seed: Some(seed), steps: Some(steps), guidance_scale: Some(guidance), ..Default::default() };
    Request { body, spec }
}

/// The PNGs of each request run alone, through the pipeline, on one thread
/// like the replicas (a different thread count may round differently).
fn references(requests: &[Request]) -> Vec<Vec<Vec<u8>>> {
    let specs: Vec<RequestSpec> = requests.iter().map(|r| r.spec.clone()).collect();
    std::thread::spawn(move || {
        tch::set_num_threads(1);
        let cascade = Cascade::load(&fixture_dir().join("cascade"), &CPU).unwrap();
        specs
            .iter()
            .map(|spec| {
                let plan = cascade.plan(spec).unwrap();
                cascade.generate(&plan, &mut |_| ControlFlow::Continue(())).unwrap().iter().map(|g| g.png().unwrap()).collect()
            })
            .collect()
    })
    .join()
    .unwrap()
}

async fn submit_async(client: &reqwest::Client, base: &str, body: &Value) -> String {
    let r = client.post(format!("{base}/generate")).header("Prefer", "respond-async").json(body).send().await.unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
}

/// Polls every job through `base` until all are terminal; returns their documents.
async fn wait_all(client: &reqwest::Client, base: &str, ids: &[String], limit: Duration) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    let mut docs: Vec<Option<Value>> = vec![None; ids.len()];
    while docs.iter().any(Option::is_none) {
        for (i, id) in ids.iter().enumerate() {
            if docs[i].is_some() {
                continue;
            }
            let r = client.get(format!("{base}/jobs/{id}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "GET /jobs/{id} through nginx");
            let doc: Value = r.json().await.unwrap();
            if ["succeeded", "failed", "canceled"].contains(&doc["status"].as_str().unwrap()) {
                docs[i] = Some(doc);
            }
        }
        let left: Vec<&String> = ids.iter().zip(&docs).filter(|(_, d)| d.is_none()).map(|(id, _)| id).collect();
        assert!(Instant::now() < deadline, "jobs not finished within {limit:?}: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    docs.into_iter().map(Option::unwrap).collect()
}

async fn images(client: &reqwest::Client, base: &str, id: &str, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for i in 0..n {
        let r = client.get(format!("{base}/jobs/{id}/images/{i}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        out.push(r.bytes().await.unwrap().to_vec());
    }
    out
}

async fn succeeded_count(client: &reqwest::Client, replica: &Replica) -> f64 {
    let text = client.get(format!("{}/metrics", replica.base())).send().await.unwrap().text().await.unwrap();
    metric(&text, r#"diffusiond_jobs_total{status="succeeded"}"#)
}

/// Job ids of the engine log lines with `message` in a replica's JSON log
/// (the worker logs a job's lines in its `job` span).
fn logged(log: &str, message: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == message)
        .filter_map(|v| v["span"]["job"].as_str().or(v["fields"]["job"].as_str()).map(str::to_owned))
        .collect()
}

#[test]
fn two_replicas_behind_nginx_share_the_work_and_survive_a_kill() {
    if !tools_present(&["redis-server", "nginx"]) {
        return;
    }
    let started = Instant::now();
    let scratch = Scratch::new("scale-out");
    let redis = Redis::start(&scratch.0);
    let options = ReplicaOptions {
        model: fixture_dir().join("cascade"),
        store: redis.url(),
        max_active_jobs: 4,
        // Short enough for a quick test, long enough that a replica starved of
        // CPU by other processes still keeps its jobs.
        reclaim_after: "4",
        heartbeat: "0.5",
        env: vec![("OMP_NUM_THREADS".into(), "1".into())],
        extra_args: vec!["--log-json".into()],
    };
    let mut a = Replica::spawn(&scratch.0, "a", &options);
    let mut b = Replica::spawn(&scratch.0, "b", &options);

    // What each request gives alone, computed while the replicas load.
    // The last four (sync, PNG responses) ask for one image each.
    let first: Vec<Request> = (0..24)
        .map(|i| {
            let n = 1 + usize::from(i % 5 == 0 && i < 20);
            request(format!("{} red circles", 1 + i % 3), 500 + i as u64, 3 + i % 4, n, 2.0 + 0.5 * (i % 4) as f32)
        })
        .collect();
    let second: Vec<Request> = (0..8).map(|i| request("a green triangle".into(), 900 + i as u64, 40, 1, 3.0)).collect();
    let first_refs = references(&first);
    let second_refs = references(&second);

    // Generous limits: they only matter when something is wrong (or the machine is very busy).
    a.wait_ready(Duration::from_secs(300));
    b.wait_ready(Duration::from_secs(300));
    let nginx = Nginx::start(&scratch.0, &[a.port, b.port]);
    let base = nginx.base();
    println!("cluster up in {:.1} s", started.elapsed().as_secs_f64());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();

        // 1. Twenty async jobs and four sync requests, all through nginx.
        let t = Instant::now();
        let (async_part, sync_part) = first.split_at(20);
        let ids: Vec<String> = futures::future::join_all(async_part.iter().map(|r| submit_async(&client, &base, &r.body))).await;
        let syncs: Vec<_> = sync_part
            .iter()
            .map(|r| {
                let (client, url, body) = (client.clone(), format!("{base}/generate"), r.body.clone());
                tokio::spawn(async move { client.post(url).header("Accept", "image/png").json(&body).send().await.unwrap() })
            })
            .collect();
        let docs = wait_all(&client, &base, &ids, Duration::from_secs(300)).await;
        for (i, (doc, id)) in docs.iter().zip(&ids).enumerate() {
            assert_eq!(doc["status"], "succeeded", "{doc}");
            let n = first[i].spec.n;
            let got = images(&client, &base, id, n).await;
            assert!(got == first_refs[i], "job {i} ({id}) must equal the same request run alone");
        }
        for (k, sync) in syncs.into_iter().enumerate() {
            let response = sync.await.unwrap();
            assert_eq!(response.status(), 200);
            let png = response.bytes().await.unwrap().to_vec();
            assert!(png == first_refs[20 + k][0], "sync request {k} must equal the same request run alone");
        }
        let (ran_a, ran_b) = (succeeded_count(&client, &a).await, succeeded_count(&client, &b).await);
        println!("phase 1: 24 requests in {:.1} s; replica a ran {ran_a}, b ran {ran_b}", t.elapsed().as_secs_f64());
        assert_eq!(ran_a + ran_b, 24.0);
        assert!(ran_a > 0.0 && ran_b > 0.0, "both replicas must run some: a {ran_a}, b {ran_b}");

        // 2. Longer jobs; kill b while it runs some.
        let t = Instant::now();
        let ids: Vec<String> = futures::future::join_all(second.iter().map(|r| submit_async(&client, &base, &r.body))).await;
        let deadline = Instant::now() + Duration::from_secs(300);
        let running_on_b: HashSet<String> = loop {
            let log = b.log_text();
            let done: HashSet<String> = logged(&log, "succeeded").into_iter().collect();
            let running: HashSet<String> = logged(&log, "started").into_iter().filter(|id| ids.contains(id) && !done.contains(id)).collect();
            let mut progressed = false;
            for id in &running {
                let doc: Value = client.get(format!("{base}/jobs/{id}")).send().await.unwrap().json().await.unwrap();
                progressed |= doc["progress"]["step"].as_u64().unwrap_or(0) > 0;
            }
            if progressed {
                break running;
            }
            assert!(Instant::now() < deadline, "replica b never ran one of the long jobs");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        b.kill();
        println!("killed replica b while it ran {} jobs", running_on_b.len());
        let docs = wait_all(&client, &base, &ids, Duration::from_secs(300)).await;
        println!("phase 2: 8 jobs, b killed, all done in {:.1} s", t.elapsed().as_secs_f64());

        let logs = format!("{}\n{}", a.log_text(), b.log_text());
        let completions: Vec<String> = logged(&logs, "succeeded");
        let mut conn = redis.connection();
        for (i, (doc, id)) in docs.iter().zip(&ids).enumerate() {
            assert_eq!(doc["status"], "succeeded", "{doc}");
            assert_eq!(completions.iter().filter(|c| *c == id).count(), 1, "job {id} must be completed exactly once");
            let stored: usize = redis::cmd("HLEN").arg(format!("diffusiond:job:{id}:images")).query(&mut conn).unwrap();
            assert_eq!((doc["images"].as_array().unwrap().len(), stored), (1, 1), "one result per job: {doc}");
            let record: HashMap<String, String> = redis::cmd("HGETALL").arg(format!("diffusiond:job:{id}")).query(&mut conn).unwrap();
            let expected_attempts = if running_on_b.contains(id) { "2" } else { "1" };
            assert_eq!(record["attempts"], expected_attempts, "job {id}: taken over jobs run twice, the others once");
            let got = images(&client, &base, id, 1).await;
            assert!(got == second_refs[i], "job {i} ({id}) after the takeover must equal the request run alone");
        }
        assert!(a.log_text().contains("took over a job from a replica that stopped"));
    });

    // Nothing lost, nothing left: every entry acknowledged.
    let stream = WorkStream::open(&redis.url(), StreamOptions::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while stream.backlog().unwrap().pending != 0 {
        assert!(Instant::now() < deadline, "entries left pending: {:?}", stream.pending(20).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(stream.backlog().unwrap().waiting, 0);
    assert!(a.terminate(Duration::from_secs(20)), "replica a did not drain and exit on SIGTERM");
    println!("scale-out test: {:.1} s in all", started.elapsed().as_secs_f64());
    drop(nginx);
}
