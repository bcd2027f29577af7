//! The shared work queue against a private redis-server: the stream protocol
//! (read, ack, heartbeat, reclaim, requeue, trim, dead letters), the HTTP
//! side's `RedisQueue` (cluster-wide capacity, positions, cancel broadcast),
//! and two in-process replicas on the tiny fixture cascade: a job accepted by
//! one runs on the other, with sync results, edits, SSE progress and
//! cancellation crossing over; a job delivered too often is given up on.

mod cluster;
mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::{tools_present, Redis, Scratch};
use common::fixture_dir;
use common::server::start;
use diffusiond::api::ApiConfig;
use diffusiond::jobs::conformance::sample_job;
use diffusiond::jobs::{
    event_channel, now_ms, open_store, EventRelay, JobEvent, JobId, JobQueue, JobRecord, JobStatus, QueueError,
    RedisQueue, RelayConfig, RelayTargets, SharedLimits, StreamOptions, WorkStream,
};
use diffusiond::nn::device::{DeviceSetting, Precision};
use base64::Engine as _;
use diffusiond::pipeline::{Cascade, LoadOptions, Mask, Picture, RequestSpec, SourceSpec};
use diffusiond::server::ServerConfig;
use diffusiond::worker::{EngineConfig, LocalQueue, QueueLimits, SharedQueueConfig};
use serde_json::{json, Value};

fn stream(redis: &Redis, prefix: &str) -> WorkStream {
    WorkStream::open(&redis.url(), StreamOptions { prefix: prefix.into(), ..Default::default() }).expect("open the stream")
}

fn ids(n: usize) -> Vec<JobId> {
    (0..n).map(|_| JobId::new_v4()).collect()
}

#[test]
fn entries_are_read_acked_kept_reclaimed_and_trimmed() {
    if !tools_present(&["redis-server"]) {
        return;
    }
    let scratch = Scratch::new("queue-protocol");
    let redis = Redis::start(&scratch.0);
    let q = stream(&redis, "proto");
    let jobs = ids(4);
    for id in &jobs {
        q.add(*id).expect("add");
    }
    assert_eq!(q.backlog().expect("backlog").waiting, 4);

    // A reads two (only what it can start), B one: the rest stays for anyone.
    let mut conn_a = q.dedicated(Duration::from_secs(5)).expect("connection");
    let mut conn_b = q.dedicated(Duration::from_secs(5)).expect("connection");
    let a = q.read(&mut conn_a, "a", 2, Duration::from_millis(10)).expect("read");
    let b = q.read(&mut conn_b, "b", 1, Duration::from_millis(10)).expect("read");
    assert_eq!(a.iter().map(|d| d.job).collect::<Vec<_>>(), jobs[..2]);
    assert_eq!(b[0].job, jobs[2]);
    assert!(a.iter().chain(&b).all(|d| d.deliveries == 1));
    let (backlog, waiting) = q.waiting(10).expect("waiting");
    assert_eq!((backlog.waiting, backlog.pending, waiting), (1, 3, vec![jobs[3]]));
    assert!(q.read(&mut conn_b, "b", 1, Duration::from_millis(10)).expect("read").len() == 1);
    assert!(q.read(&mut conn_b, "b", 5, Duration::from_millis(50)).expect("empty read").is_empty(), "a read times out empty");

    // A keeps its entries alive; B falls silent. Only B's go to a reclaimer.
    std::thread::sleep(Duration::from_millis(300));
    let a_entries: Vec<String> = a.iter().map(|d| d.entry.clone()).collect();
    assert_eq!(q.keep("a", &a_entries).expect("keep"), a_entries);
    let taken = q.reclaim("c", Duration::from_millis(250), 10).expect("reclaim");
    assert_eq!(taken.iter().map(|d| d.job).collect::<Vec<_>>(), jobs[2..]);
    assert!(taken.iter().all(|d| d.deliveries == 2), "a reclaim counts a delivery: {taken:?}");
    // B comes back: its heartbeat finds that it no longer owns them.
    let b_entries: Vec<String> = taken.iter().map(|d| d.entry.clone()).collect();
    assert_eq!(q.keep("b", &b_entries).expect("keep"), Vec::<String>::new());

    // A drains: its second job goes back to the queue as a new entry.
    assert!(q.requeue(&a[1].entry, a[1].job).expect("requeue"));
    assert!(!q.requeue(&a[1].entry, a[1].job).expect("requeue twice"), "an entry is handed back once");
    let again = q.read(&mut conn_b, "b", 5, Duration::from_millis(10)).expect("read");
    assert_eq!((again.len(), again[0].job, again[0].deliveries), (1, a[1].job, 1));

    // Acknowledged entries below the oldest pending one are trimmed; pending ones stay.
    assert_eq!(q.ack(&[a[0].entry.clone()]).expect("ack"), 1);
    assert_eq!(q.ack(&[a[0].entry.clone()]).expect("ack twice"), 0);
    q.trim().expect("trim");
    let pending: Vec<String> = q.pending(100).expect("pending").into_iter().map(|(e, _, _)| e).collect();
    let left: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE").arg("proto:queue").arg("-").arg("+").query(&mut redis.connection()).unwrap();
    for entry in &pending {
        assert!(left.iter().any(|(e, _)| e == entry), "a pending entry was trimmed");
    }
    q.ack(&pending).expect("ack all");
    q.trim().expect("trim");
    let backlog = q.backlog().expect("backlog");
    assert_eq!((backlog.waiting, backlog.pending), (0, 0), "lag stays known after trims: {backlog:?}");
    q.add(jobs[0]).expect("add after trim");
    assert_eq!(q.backlog().expect("backlog").waiting, 1);

    // Dead letters: recorded and acknowledged at once.
    let dead = q.read(&mut conn_a, "a", 1, Duration::from_millis(10)).expect("read");
    q.dead_letter(&dead[0], "a").expect("dead letter");
    assert_eq!(q.backlog().expect("backlog").pending, 0);
    let letters: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE").arg("proto:queue:dead").arg("-").arg("+").query(&mut redis.connection()).unwrap();
    assert_eq!(letters.len(), 1);
    assert!(letters[0].1.contains(&("id".into(), jobs[0].to_string())), "{letters:?}");

    // Consumers that hold nothing and went quiet are forgotten; holders never.
    std::thread::sleep(Duration::from_millis(50));
    q.read(&mut conn_a, "holder", 1, Duration::from_millis(10)).expect("read");
    q.add(jobs[1]).expect("add");
    assert_eq!(q.read(&mut conn_a, "holder", 1, Duration::from_millis(10)).expect("read").len(), 1);
    let forgotten = q.forget_consumers("a", Duration::from_millis(10)).expect("forget");
    assert_eq!(forgotten, 2, "b and c hold nothing; holder holds an entry");
    let consumers: Vec<Vec<redis::Value>> = redis::cmd("XINFO").arg("CONSUMERS").arg("proto:queue").arg("workers").query(&mut redis.connection()).unwrap();
    assert_eq!(consumers.len(), 2, "a (itself) and holder stay");
}

/// One replica's HTTP side without an engine: a `RedisQueue`, its local
/// queue, its relay, a stand-in for its engine's event channel, and what its
/// local listeners hear.
struct FrontEnd {
    queue: RedisQueue,
    local: Arc<LocalQueue>,
    relay: EventRelay,
    engine: diffusiond::jobs::EventSender,
    heard: tokio::sync::broadcast::Receiver<JobEvent>,
}

fn front_end(redis: &Redis, prefix: &str, max_waiting: usize, origin: &str) -> FrontEnd {
    let stream = Arc::new(stream(redis, prefix));
    let store = open_store(Some(&redis.url()), std::path::Path::new("unused"), Duration::from_secs(60)).expect("store");
    let local = Arc::new(LocalQueue::new(QueueLimits { max_waiting_jobs: 100, retry_after_secs: 1 }));
    let events = event_channel();
    let heard = events.subscribe();
    let engine = event_channel();
    let cancel_target = local.clone();
    let targets = RelayTargets { events, cancel_local: Box::new(move |id| cancel_target.cancel(id)), finished_local: Box::new(|_| {}) };
    let config = RelayConfig { origin: origin.into(), poll_interval: Duration::from_millis(100) };
    let relay = EventRelay::start(stream.clone(), store, config, engine.subscribe(), targets).expect("relay");
    let limits = SharedLimits { max_waiting_jobs: max_waiting, retry_after_secs: 4 };
    FrontEnd { queue: RedisQueue::new(stream, local.clone(), relay.handle(), limits), local, relay, engine, heard }
}

#[test]
fn the_front_end_counts_the_cluster_backlog_and_broadcasts_cancels() {
    if !tools_present(&["redis-server"]) {
        return;
    }
    let scratch = Scratch::new("queue-front-end");
    let redis = Redis::start(&scratch.0);
    let fa = front_end(&redis, "fe", 3, "replica-a");
    let fb = front_end(&redis, "fe", 3, "replica-b");
    let (a, b) = (&fa.queue, &fb.queue);
    let jobs = ids(4);
    for (i, id) in jobs[..3].iter().enumerate() {
        let queue = if i % 2 == 0 { a } else { b };
        queue.check_capacity(1).expect("room");
        queue.submit(*id).expect("submit");
    }
    // Three wait, submitted through two replicas: both refuse the fourth.
    for queue in [a, b] {
        assert_eq!(queue.check_capacity(1), Err(QueueError::Full { depth: 3, retry_after_secs: 4 }));
    }
    assert_eq!((a.depth(), b.position(jobs[2]), b.position(jobs[3])), (3, Some(2), None));

    // A cancel through A reaches B's worker.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        a.cancel(jobs[1]);
        std::thread::sleep(Duration::from_millis(50));
        if fb.local.take_canceled().contains(&jobs[1]) {
            break;
        }
        assert!(Instant::now() < deadline, "the cancel did not reach the other replica");
    }
    a.close();
    assert_eq!(a.submit(jobs[3]), Err(QueueError::Closed));
    assert_eq!(a.check_capacity(1), Err(QueueError::Closed));
    let FrontEnd { queue: b, relay: relay_b, .. } = fb;
    fa.relay.stop();
    relay_b.stop();

    // Redis gone: a 503-style refusal, not a full queue, and nothing hangs.
    drop(redis);
    let started = Instant::now();
    assert_eq!(b.check_capacity(1), Err(QueueError::Unavailable { retry_after_secs: 4 }));
    assert_eq!(b.submit(jobs[3]), Err(QueueError::Unavailable { retry_after_secs: 4 }));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn events_of_one_replica_reach_the_listeners_of_another() {
    if !tools_present(&["redis-server"]) {
        return;
    }
    let scratch = Scratch::new("queue-events");
    let redis = Redis::start(&scratch.0);
    let mut a = front_end(&redis, "ev", 10, "replica-a");
    let mut b = front_end(&redis, "ev", 10, "replica-b");
    // Both subscriptions in place first (pub/sub keeps nothing for late subscribers).
    std::thread::sleep(Duration::from_millis(300));
    let id = JobId::new_v4();
    a.engine.send(JobEvent::Started { id }).unwrap();
    a.engine.send(JobEvent::Finished { id, status: JobStatus::Succeeded }).unwrap();
    let expected = vec![JobEvent::Started { id }, JobEvent::Finished { id, status: JobStatus::Succeeded }];
    for (name, listener) in [("A", &mut a.heard), ("B", &mut b.heard)] {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < 2 {
            match listener.try_recv() {
                Ok(e) => got.push(e),
                Err(_) => {
                    assert!(Instant::now() < deadline, "replica {name} heard {got:?}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        assert_eq!(got, expected, "replica {name} hears each event once");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(a.heard.try_recv().is_err(), "A's own events do not come back to it from Redis");

    // A job submitted on B whose end no event announces: B's poll finds it in the store.
    let store = open_store(Some(&redis.url()), std::path::Path::new("unused"), Duration::from_secs(60)).unwrap();
    let job = sample_job(None, 1);
    store.create(&job).unwrap();
    b.queue.submit(job.id).unwrap();
    store.fail(job.id, &diffusiond::jobs::JobError { kind: "x".into(), message: "y".into() }, 2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(JobEvent::Finished { id, status }) = b.heard.try_recv() {
            assert_eq!((id, status), (job.id, JobStatus::Failed));
            break;
        }
        assert!(Instant::now() < deadline, "the poll did not announce the job's end");
        std::thread::sleep(Duration::from_millis(10));
    }
    a.relay.stop();
    b.relay.stop();
}

// ---- two in-process replicas on the fixture cascade ----

const CPU: LoadOptions = LoadOptions { device: DeviceSetting::Cpu, precision: Precision::F32 };

fn replica_config(redis: &Redis, name: &str) -> ServerConfig {
    ServerConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        model_dir: fixture_dir().join("cascade"),
        data_dir: std::env::temp_dir().join(format!("diffusiond-unused-{name}")),
        store: Some(redis.url()),
        shared_queue: SharedQueueConfig {
            reclaim_after: Duration::from_millis(1500),
            heartbeat: Duration::from_millis(300),
            read_block: Duration::from_millis(200),
            event_poll: Duration::from_millis(500),
            ..Default::default()
        },
        load: CPU,
        engine: EngineConfig { max_active_jobs: 1, ..Default::default() },
        limits: QueueLimits { max_waiting_jobs: 16, retry_after_secs: 2 },
        api: ApiConfig::default(),
        warmup: false,
        drain_timeout: Duration::from_secs(10),
        retention: Duration::from_secs(3600),
    }
}

async fn submit(client: &reqwest::Client, base: &str, body: Value) -> Value {
    let r = client.post(format!("{base}/generate")).header("Prefer", "respond-async").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 202);
    r.json().await.unwrap()
}

async fn status_of(client: &reqwest::Client, base: &str, id: &str) -> Value {
    client.get(format!("{base}/jobs/{id}")).send().await.unwrap().json().await.unwrap()
}

async fn wait_status(client: &reqwest::Client, base: &str, id: &str, wanted: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let doc = status_of(client, base, id).await;
        if doc["status"] == wanted {
            return doc;
        }
        assert!(Instant::now() < deadline, "job {id} is not {wanted}: {doc}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_accepted_by_one_replica_runs_on_another() {
    if !tools_present(&["redis-server"]) {
        return;
    }
    let scratch = Scratch::new("queue-replicas");
    let redis = Redis::start(&scratch.0);
    let client = reqwest::Client::new();
    let long = json!({"prompt": "a star", "seed": 1, "steps": 1000});

    // A alone takes a long job; then it has no room (one job at a time).
    let (a, base_a) = start(replica_config(&redis, "a")).await;
    let busy = submit(&client, &base_a, long.clone()).await;
    let busy_id = busy["id"].as_str().unwrap().to_owned();
    wait_status(&client, &base_a, &busy_id, "running").await;
    let (b, base_b) = start(replica_config(&redis, "b")).await;
    let b_calls = || b.stats.unet_calls.load(Ordering::Relaxed);

    // A sync request on A: B runs it, A answers it.
    let a_finished = a.stats.jobs_finished.load(Ordering::Relaxed);
    let body = json!({"prompt": "a blue square", "seed": 7, "steps": 3});
    let r = client.post(format!("{base_a}/generate")).header("Accept", "image/png").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert!(!r.bytes().await.unwrap().is_empty());
    assert_eq!(b.stats.jobs_finished.load(Ordering::Relaxed), 1, "B ran it");
    assert_eq!(a.stats.jobs_finished.load(Ordering::Relaxed), a_finished, "A did not");

    // An edit crosses over whole: inpainting accepted by A, run by B, gives
    // the image the pipeline makes directly from the same picture and mask.
    let edit = |name: &str| std::fs::read(fixture_dir().join("edit").join(name)).unwrap();
    let (image, mask) = (edit("image32.png"), edit("mask32.png"));
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let body = json!({"prompt": "a blue square", "seed": 2, "steps": 4, "source": {"kind": "inpaint", "image": b64(&image), "mask": b64(&mask)}});
    let doc: Value = client.post(format!("{base_a}/generate")).json(&body).send().await.unwrap().json().await.unwrap();
    let served = base64::engine::general_purpose::STANDARD.decode(doc["images"][0]["b64_json"].as_str().unwrap_or_else(|| panic!("{doc}"))).unwrap();
    assert_eq!(b.stats.jobs_finished.load(Ordering::Relaxed), 2, "B ran the edit");
    let source = SourceSpec::Inpaint {
        image: Picture::from_image(&image::load_from_memory(&image).unwrap()),
        mask: Mask::from_image(&image::load_from_memory(&mask).unwrap()),
        strength: None,
    };
    let spec = RequestSpec { prompt: "a blue square".into(), n: 1, seed: Some(2), steps: Some(4), source: Some(source), ..Default::default() };
    let cascade = Cascade::load(&fixture_dir().join("cascade"), &CPU).unwrap();
    let direct = cascade.generate(&cascade.plan(&spec).unwrap(), &mut |_| std::ops::ControlFlow::Continue(())).unwrap();
    assert_eq!(served, direct[0].png().unwrap(), "the edit's image");

    // SSE on A follows a job B runs, to its end.
    let job = submit(&client, &base_a, json!({"prompt": "a ring", "seed": 2, "steps": 12})).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let mut events = client.get(format!("{base_a}/jobs/{id}/events")).send().await.unwrap();
    let mut text = String::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), events.chunk()).await.unwrap().unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("event: progress") && text.contains("event: stage_done"), "{text}");
    assert!(text.trim_end().contains("event: succeeded"), "{text}");
    assert_eq!(b.stats.jobs_finished.load(Ordering::Relaxed), 3);

    // B busy too: the next job waits in the shared queue, with a position.
    let second = submit(&client, &base_b, long.clone()).await;
    let second_id = second["id"].as_str().unwrap().to_owned();
    wait_status(&client, &base_b, &second_id, "running").await;
    let waiting = submit(&client, &base_a, json!({"prompt": "a moon", "seed": 3, "steps": 3})).await;
    assert_eq!((waiting["status"].as_str(), waiting["queue_position"].as_u64()), (Some("queued"), Some(0)), "{waiting}");
    let metrics = client.get(format!("{base_b}/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(cluster::metric(&metrics, "diffusiond_queue_depth"), 1.0, "cluster-wide depth on either replica");

    // A cancel sent to A stops the job B runs, and B moves on to the waiting one.
    let r = client.post(format!("{base_a}/jobs/{second_id}/cancel")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let waiting_id = waiting["id"].as_str().unwrap();
    wait_status(&client, &base_a, waiting_id, "succeeded").await;
    assert_eq!(status_of(&client, &base_b, &second_id).await["status"], "canceled");
    let calls = b_calls();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(b_calls(), calls, "B stopped the canceled job");

    client.post(format!("{base_b}/jobs/{busy_id}/cancel")).send().await.unwrap();
    wait_status(&client, &base_a, &busy_id, "canceled").await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    // Everything was acknowledged: nothing pending, nothing waiting.
    let q = stream(&redis, "diffusiond");
    let deadline = Instant::now() + Duration::from_secs(5);
    while q.backlog().unwrap().pending != 0 {
        assert!(Instant::now() < deadline, "entries left pending: {:?}", q.pending(10).unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(q.backlog().unwrap().waiting, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_delivered_too_often_is_given_up_on() {
    if !tools_present(&["redis-server"]) {
        return;
    }
    let scratch = Scratch::new("queue-dead-letter");
    let redis = Redis::start(&scratch.0);
    let store = open_store(Some(&redis.url()), std::path::Path::new("unused"), Duration::from_secs(3600)).unwrap();
    let q = stream(&redis, "diffusiond");
    // Two jobs whose replicas died: one three times already, one once.
    let mut conn = q.dedicated(Duration::from_secs(5)).unwrap();
    let cascade = Cascade::load(&fixture_dir().join("cascade"), &CPU).unwrap();
    let job = |seed| {
        let spec = RequestSpec { prompt: "a square".into(), n: 2, seed: Some(seed), steps: Some(3), ..Default::default() };
        JobRecord::new(JobId::new_v4(), None, cascade.plan(&spec).unwrap(), now_ms())
    };
    let (hopeless, survivor) = (job(1), job(2));
    for job in [&hopeless, &survivor] {
        store.create(job).unwrap();
        q.add(job.id).unwrap();
    }
    let entries = q.read(&mut conn, "ghost-1", 2, Duration::from_millis(10)).unwrap();
    for ghost in ["ghost-2", "ghost-3"] {
        let _: Vec<redis::Value> = redis::cmd("XCLAIM").arg("diffusiond:queue").arg("workers").arg(ghost).arg(0).arg(&entries[0].entry).query(&mut conn).unwrap();
    }
    assert_eq!(q.pending(10).unwrap().iter().map(|p| p.2).collect::<Vec<_>>(), vec![3, 1]);

    let (server, base) = start(replica_config(&redis, "c")).await;
    let client = reqwest::Client::new();
    let dead = wait_status(&client, &base, &hopeless.id.to_string(), "failed").await;
    assert!(dead["error"]["message"].as_str().unwrap().contains("gave up after 3 attempts"), "{dead}");
    wait_status(&client, &base, &survivor.id.to_string(), "succeeded").await;
    let record = store.get(survivor.id).unwrap().unwrap();
    assert_eq!((record.status, record.images.len()), (JobStatus::Succeeded, survivor.request.n));
    server.shutdown().await.unwrap();
    assert_eq!(q.backlog().unwrap().pending, 0, "both acknowledged");
    let letters: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE").arg("diffusiond:queue:dead").arg("-").arg("+").query(&mut redis.connection()).unwrap();
    assert_eq!(letters.len(), 1);
    assert!(letters[0].1.contains(&("deliveries".into(), "4".into())), "{letters:?}");
}
