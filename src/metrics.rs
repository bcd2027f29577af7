//! The server's Prometheus metrics: every name (one prefix, `diffusiond_`), its
//! description and its buckets, and the one process-wide recorder that `/metrics`
//! renders.
//!
//! Follows the `metrics` crate's facade model (record anywhere with `counter!`,
//! `gauge!`, `histogram!`; one recorder installed per process) and Prometheus'
//! naming practice (<https://prometheus.io/docs/practices/naming/>): base units
//! (seconds), `_total` on counters, and only low-cardinality labels — a route
//! template, never a path with a job id in it.
//!
//! The HTTP side records the request and outcome counters; the worker records
//! the queue, batch and compute ones under the same constants.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests served, by route template and status code. Labels: `route`, `status`.
pub const HTTP_REQUESTS: &str = "diffusiond_http_requests_total";
/// Generation requests by how they ended (`ok` or the error's machine tag). Label: `outcome`.
pub const REQUEST_OUTCOMES: &str = "diffusiond_request_outcomes_total";
/// Jobs waiting to start.
pub const QUEUE_DEPTH: &str = "diffusiond_queue_depth";
/// Rows (images × guidance halves) in each UNet call.
pub const BATCH_ROWS: &str = "diffusiond_batch_rows";
/// Seconds per denoising step. Label: `stage`.
pub const STEP_SECONDS: &str = "diffusiond_step_seconds";
/// Images delivered by succeeded jobs.
pub const IMAGES_GENERATED: &str = "diffusiond_images_generated_total";
/// Jobs that reached a final status. Label: `status`.
pub const JOBS: &str = "diffusiond_jobs_total";
/// Seconds from a job's creation to its start.
pub const QUEUE_SECONDS: &str = "diffusiond_queue_seconds";
/// Seconds from a job's start to its completion.
pub const COMPUTE_SECONDS: &str = "diffusiond_compute_seconds";

/// Label names, so that recorders on both sides spell them the same way.
pub const LABEL_ROUTE: &str = "route";
pub const LABEL_STATUS: &str = "status";
pub const LABEL_OUTCOME: &str = "outcome";
pub const LABEL_STAGE: &str = "stage";

/// Buckets for the `_seconds` histograms: a UNet step takes milliseconds to a
/// second; a queue wait or a whole job takes seconds to minutes.
const SECONDS_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
/// Buckets for batch rows: powers of two up to a large GPU batch.
const ROWS_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Registers the description of every metric with the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(HTTP_REQUESTS, "HTTP requests served, by route template and status code");
    describe_counter!(REQUEST_OUTCOMES, "Generation requests by outcome: ok or the error type");
    describe_gauge!(QUEUE_DEPTH, "Jobs waiting to start");
    describe_histogram!(BATCH_ROWS, "Rows in each UNet call");
    describe_histogram!(STEP_SECONDS, Unit::Seconds, "Duration of one denoising step, by stage");
    describe_counter!(IMAGES_GENERATED, "Images delivered by succeeded jobs");
    describe_counter!(JOBS, "Jobs that reached a final status, by status");
    describe_histogram!(QUEUE_SECONDS, Unit::Seconds, "Time from a job's creation to its start");
    describe_histogram!(COMPUTE_SECONDS, Unit::Seconds, "Time from a job's start to its completion");
}

fn builder() -> PrometheusBuilder {
    // Explicit buckets make these true Prometheus histograms (aggregatable across
    // replicas) rather than client-side summaries.
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_ROWS.into()), ROWS_BUCKETS))
        .expect("bucket lists are non-empty")
}

/// Installs the process-wide recorder the first time and returns a handle to it.
///
/// A process has one global recorder, but tests build many servers: later calls
/// hand out clones of the first handle. When something else installed a
/// recorder first, the handle still renders (our own, empty) registry and a
/// warning says why the numbers are missing.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => describe(),
                Err(e) => tracing::warn!(error = %e, "another metrics recorder is installed; /metrics will be empty"),
            }
            handle
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_share_the_prefix_and_install_is_repeatable() {
        for name in [HTTP_REQUESTS, REQUEST_OUTCOMES, QUEUE_DEPTH, BATCH_ROWS, STEP_SECONDS, IMAGES_GENERATED, JOBS, QUEUE_SECONDS, COMPUTE_SECONDS] {
            assert!(name.starts_with("diffusiond_"), "{name}");
        }
        let a = install();
        let b = install();
        metrics::counter!(IMAGES_GENERATED).increment(2);
        metrics::histogram!(STEP_SECONDS, LABEL_STAGE => "base").record(0.2);
        let text = b.render();
        assert!(text.contains("diffusiond_images_generated_total 2"), "{text}");
        assert!(text.contains("diffusiond_step_seconds_bucket{stage=\"base\",le=\"0.25\"} 1"), "{text}");
        assert_eq!(a.render(), text);
    }
}
