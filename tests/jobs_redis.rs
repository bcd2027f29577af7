//! The Redis job store against the shared conformance suite, plus what only a
//! shared store must show: replicas see each other's jobs, racing completions
//! keep one result, finished jobs expire by TTL, and a restarted Redis is
//! reconnected to.
//!
//! Each test starts its own `redis-server` (no persistence) in a temporary
//! directory, with the harness the scale-out tests use (`cluster::Redis`).
//! Without `redis-server` these tests fail, saying how to install it, unless
//! `DIFFUSIOND_SKIP_REDIS=1` is set.

mod cluster;

use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use cluster::{Listen, Redis};
use diffusiond::jobs::conformance::{self, sample_job};
use diffusiond::jobs::{
    open_store, ImageInfo, JobError, JobId, JobProgress, JobStatus, JobStore, RedisOptions, RedisStore,
};

/// The database of the TCP tests: not the default, so that the store is seen
/// to use the one in its URL and to name it in errors.
const TCP_DB: u8 = 3;

fn open(server: &Redis, prefix: &str, retention: Option<Duration>) -> RedisStore {
    let options = RedisOptions { prefix: prefix.into(), retention, ..RedisOptions::default() };
    RedisStore::open(&server.url(), options).expect("open the Redis store")
}

fn pngs(n: usize, fill: u8, len: usize) -> Vec<(ImageInfo, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let info = ImageInfo { index: i, seed: u64::from(fill) * 100 + i as u64, width: 64, height: 64 };
            (info, (0..=255u8).cycle().take(len + i).map(|b| b ^ fill).collect())
        })
        .collect()
}

fn pttl(conn: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query(conn).expect("PTTL")
}

fn count(store: &dyn JobStore, status: JobStatus) -> u64 {
    store.counts().expect("counts").into_iter().find(|(s, _)| *s == status).map_or(0, |(_, n)| n)
}

#[test]
fn redis_store_passes_conformance() {
    let Some(server) = Redis::start_alone(Listen::Socket) else { return };
    let counter = std::sync::atomic::AtomicUsize::new(0);
    conformance::run_all(&|| {
        // A fresh prefix is a fresh, empty store on the same server.
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::new(open(&server, &format!("check-{n}"), Some(Duration::from_secs(3600))))
    });
}

#[test]
fn replicas_on_one_redis_share_jobs() {
    let Some(server) = Redis::start_alone(Listen::Tcp { db: TCP_DB }) else { return };
    let scratch = std::env::temp_dir().join("diffusiond-unused-data-dir");
    // Replica A opens the way `--store redis://…` will; B with explicit options.
    let a = open_store(Some(&server.url()), &scratch, Duration::from_secs(3600)).expect("open_store");
    let b = RedisStore::open(&server.url(), RedisOptions::with_retention(Duration::from_secs(3600))).expect("open");
    assert!(!scratch.exists(), "a Redis store must not touch the data directory");

    let job = sample_job(Some("key-1"), 10);
    assert!(a.create(&job).expect("create").created);
    assert_eq!(b.get(job.id).expect("get"), Some(job.clone()), "B must see A's job");
    let retry = b.create(&job).expect("create on B");
    assert!(!retry.created, "a retried create on another replica must find the job");
    assert!(b.start(job.id, 20).expect("start"));
    let progress =
        JobProgress { stage: 0, stages: 1, stage_name: "base".into(), step: 3, total_steps: 9, fraction: 0.3, preview: None };
    b.set_progress(job.id, &progress).expect("progress");
    let running = a.get(job.id).expect("get").expect("present");
    assert_eq!((running.status, running.progress.as_ref()), (JobStatus::Running, Some(&progress)));
    assert_eq!(a.unfinished().expect("unfinished"), b.unfinished().expect("unfinished"));
    // A second attempt (another replica took the job over) starts without the stale progress.
    assert!(a.start(job.id, 25).expect("restart"));
    let restarted = b.get(job.id).expect("get").expect("present");
    assert_eq!((restarted.attempts, restarted.progress, restarted.started_at), (2, None, Some(20)));

    let images = pngs(2, 7, 5000);
    assert!(b.complete(job.id, &images, 30).expect("complete"));
    for (info, png) in &images {
        assert_eq!(a.image(job.id, info.index).expect("image").as_ref(), Some(png), "A serves B's images");
    }
    assert_eq!(a.counts().expect("counts"), b.counts().expect("counts"));
    assert_eq!(count(a.as_ref(), JobStatus::Succeeded), 1);

    let other = open(&server, "another-deployment", None);
    assert_eq!(other.get(job.id).expect("get"), None, "another prefix is another namespace");
    assert_eq!(other.unfinished().expect("unfinished"), vec![]);
}

#[test]
fn racing_completions_keep_exactly_one_result() {
    const REPLICAS: usize = 4;
    let Some(server) = Redis::start_alone(Listen::Socket) else { return };
    let replicas: Vec<RedisStore> = (0..REPLICAS).map(|_| open(&server, "race", None)).collect();
    for round in 0..10 {
        let job = sample_job(None, round);
        replicas[0].create(&job).expect("create");
        replicas[0].start(job.id, 1).expect("start");
        // Each replica finishes the job its own way: three completes with their
        // own images, one failure, all released at once.
        let barrier = Barrier::new(REPLICAS);
        let won: Vec<bool> = std::thread::scope(|scope| {
            let runs: Vec<_> = replicas
                .iter()
                .enumerate()
                .map(|(r, store)| {
                    let barrier = &barrier;
                    scope.spawn(move || {
                        let images = pngs(2, r as u8 + 1, 64 * 1024);
                        barrier.wait();
                        if r == REPLICAS - 1 {
                            let error = JobError { kind: "internal".into(), message: format!("replica {r}") };
                            store.fail(job.id, &error, 100 + r as i64).expect("fail")
                        } else {
                            store.complete(job.id, &images, 100 + r as i64).expect("complete")
                        }
                    })
                })
                .collect();
            runs.into_iter().map(|run| run.join().expect("replica thread")).collect()
        });
        let winners: Vec<usize> = (0..REPLICAS).filter(|&r| won[r]).collect();
        assert_eq!(winners.len(), 1, "round {round}: exactly one replica must win, got {winners:?}");
        let winner = winners[0];
        let record = replicas[1].get(job.id).expect("get").expect("present");
        assert_eq!(record.completed_at, Some(100 + winner as i64), "round {round}: the winner's outcome is stored");
        if winner == REPLICAS - 1 {
            assert_eq!(record.status, JobStatus::Failed);
            assert_eq!(replicas[0].image(job.id, 0).expect("image"), None, "a failed job has no images");
        } else {
            let expected = pngs(2, winner as u8 + 1, 64 * 1024);
            assert_eq!(record.status, JobStatus::Succeeded);
            assert_eq!(record.images, expected.iter().map(|(i, _)| i.clone()).collect::<Vec<_>>());
            for (info, png) in &expected {
                let stored = replicas[2].image(job.id, info.index).expect("image");
                assert!(stored.as_ref() == Some(png), "round {round}: image {} must be the winner's", info.index);
            }
        }
    }
    assert_eq!(count(&replicas[0], JobStatus::Running), 0);
}

#[test]
fn finished_jobs_expire_with_the_retention_ttl() {
    let Some(server) = Redis::start_alone(Listen::Socket) else { return };
    let mut raw = server.connection();
    let hour = Duration::from_secs(3600);
    let store = open(&server, "ttl", Some(hour));
    let job_key = |id: JobId| format!("ttl:job:{id}");

    let queued = sample_job(None, 1);
    store.create(&queued).expect("create");
    assert_eq!(pttl(&mut raw, &job_key(queued.id)), -1, "a queued job must never expire");
    store.start(queued.id, 2).expect("start");
    assert_eq!(pttl(&mut raw, &job_key(queued.id)), -1, "a running job must never expire");

    let done = sample_job(None, 1);
    store.create(&done).expect("create");
    store.complete(done.id, &pngs(1, 1, 100), 3).expect("complete");
    let failed = sample_job(None, 1);
    store.create(&failed).expect("create");
    store.fail(failed.id, &JobError { kind: "x".into(), message: "y".into() }, 3).expect("fail");
    let canceled = sample_job(None, 1);
    store.create(&canceled).expect("create");
    store.cancel(canceled.id, 3).expect("cancel");
    let hour_ms = hour.as_millis() as i64;
    for key in [job_key(done.id), format!("{}:images", job_key(done.id)), job_key(failed.id), job_key(canceled.id)] {
        let ttl = pttl(&mut raw, &key);
        assert!(ttl > hour_ms - 60_000 && ttl <= hour_ms, "{key} must expire after the retention period, PTTL {ttl}");
    }

    // With a short retention Redis itself drops results, with no purge.
    let short = open(&server, "short", Some(Duration::from_millis(200)));
    let kept = sample_job(None, 1);
    short.create(&kept).expect("create");
    let gone = sample_job(None, 1);
    short.create(&gone).expect("create");
    short.complete(gone.id, &pngs(2, 3, 100), 5).expect("complete");
    let deadline = Instant::now() + Duration::from_secs(5);
    while short.get(gone.id).expect("get").is_some() {
        assert!(Instant::now() < deadline, "the finished job did not expire");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(short.image(gone.id, 0).expect("image"), None, "images expire with their job");
    assert_eq!(short.get(kept.id).expect("get").map(|j| j.status), Some(JobStatus::Queued), "queued jobs stay");
    assert_eq!(count(&short, JobStatus::Succeeded), 1, "the index keeps an expired id until a purge");
    assert_eq!(short.purge_finished(i64::MAX).expect("purge"), 0, "nothing left to delete");
    assert_eq!(count(&short, JobStatus::Succeeded), 0, "purge drops expired ids from the index");

    // An expired id can be used again, and starts clean.
    short.complete(kept.id, &[], 6).expect("complete");
    std::thread::sleep(Duration::from_millis(400));
    assert!(short.create(&kept).expect("create again").created, "an expired id is free again");
    assert_eq!((count(&short, JobStatus::Succeeded), count(&short, JobStatus::Queued)), (0, 1));
    assert_eq!(short.purge_finished(i64::MAX).expect("purge"), 0, "purge must not touch the new job");
    assert_eq!(short.get(kept.id).expect("get"), Some(kept));
}

/// Kills and restarts `server` under a store and checks that the store
/// reconnects by itself and fails fast (and cleanly) while Redis is down.
fn check_reconnects(mut server: Redis, address: &str) {
    let store = open(&server, "restart", None);
    let job = sample_job(None, 1);
    store.create(&job).expect("create");

    // Its pooled connection is now closed; the next call reconnects by itself.
    server.kill();
    server.respawn();
    assert_eq!(store.get(job.id).expect("get after a restart"), None, "the restarted server has no data");
    assert!(store.create(&job).expect("create after a restart").created);

    server.kill();
    let started = Instant::now();
    let err = store.get(job.id).expect_err("get with Redis down must fail");
    assert!(started.elapsed() < Duration::from_secs(5), "a refused connection must fail fast");
    assert!(matches!(err, diffusiond::jobs::StoreError::Backend(_)), "{err:?}");
    assert!(err.to_string().contains(address), "the error names the server ({address}): {err}");
    server.respawn();
    assert_eq!(store.counts().expect("counts after Redis is back").len(), 5);
}

#[test]
fn a_restarted_redis_is_reconnected_over_a_socket() {
    let Some(server) = Redis::start_alone(Listen::Socket) else { return };
    check_reconnects(server, "redis.sock");
}

#[test]
fn a_restarted_redis_is_reconnected_over_tcp() {
    let Some(server) = Redis::start_alone(Listen::Tcp { db: TCP_DB }) else { return };
    let address = format!("127.0.0.1:{}/{TCP_DB}", server.port);
    check_reconnects(server, &address);
}

#[test]
fn a_newer_key_layout_is_refused() {
    let Some(server) = Redis::start_alone(Listen::Socket) else { return };
    drop(open(&server, "layout", None));
    let mut raw = server.connection();
    assert_eq!(redis::cmd("HGET").arg("layout:meta").arg("schema").query::<String>(&mut raw).expect("HGET"), "1");
    let _: () = redis::cmd("HSET").arg("layout:meta").arg("schema").arg(99).query(&mut raw).expect("HSET");
    let err = RedisStore::open(&server.url(), RedisOptions { prefix: "layout".into(), ..RedisOptions::default() })
        .expect_err("a newer layout must be refused");
    assert!(err.to_string().contains("newer"), "{err}");
}

#[test]
fn a_missing_server_fails_to_open() {
    let path = Path::new("/nonexistent-diffusiond/redis.sock");
    let err = RedisStore::open(&format!("redis+unix://{}", path.display()), RedisOptions::default())
        .expect_err("no server, no store");
    assert!(err.to_string().contains("redis"), "{err}");
    let err = open_store(Some("memcached://x"), Path::new("unused"), Duration::ZERO).err().expect("unsupported");
    assert!(err.to_string().contains("unsupported"), "{err}");
}
