//! Metric names and the HTTP endpoint (axum) that serves `/metrics`, `/healthz`, `/readyz`
//! and `POST /admin/reload-model`.
//!
//! Names follow Prometheus conventions: `fraudstream_` prefix, base units, `_total` on
//! counters, `_seconds` histograms with explicit buckets. Labels are bounded: topic,
//! decision, error kind; never an entity or transaction id.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What `POST /admin/reload-model` does: loads and checks the configured model files again
/// and answers with the versions (or why they were refused). Provided by the owner of the
/// models, so this module knows nothing of them.
pub trait Admin: Send + Sync + 'static {
    fn reload(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + '_>>;
}

/// Counter, label `topic`: messages taken from an input topic.
pub const MESSAGES_CONSUMED: &str = "fraudstream_messages_consumed_total";
/// Counter, label `decision`: verdicts committed.
pub const VERDICTS: &str = "fraudstream_verdicts_total";
/// Counter, label `kind`: messages sent to the dead-letter topic.
pub const DEAD_LETTERS: &str = "fraudstream_dead_letters_total";
/// Histogram: seconds ONNX Runtime took per micro-batch.
pub const SCORING_DURATION: &str = "fraudstream_scoring_duration_seconds";
/// Histogram: rows per scored micro-batch.
pub const SCORING_BATCH_ROWS: &str = "fraudstream_scoring_batch_rows";
/// Histogram: verdict committed − transaction event time, in seconds.
pub const END_TO_END_LATENCY: &str = "fraudstream_end_to_end_latency_seconds";
/// Histogram: seconds to process a batch (features, scores, verdicts handed to the producer).
pub const BATCH_DURATION: &str = "fraudstream_batch_duration_seconds";
/// Histogram: seconds a commit took (changelog, offsets, transaction commit, store write).
pub const COMMIT_DURATION: &str = "fraudstream_commit_duration_seconds";
/// Counter, label `result` (committed, aborted): processing transactions.
pub const COMMITS: &str = "fraudstream_commits_total";
/// Counter: idle entities expired (deleted, with a changelog tombstone).
pub const EXPIRED: &str = "fraudstream_expired_entities_total";
/// Histogram, label `model_version`: the scores the primary model gives (drift shows as a
/// moving distribution).
pub const SCORES: &str = "fraudstream_score";
/// Gauge, labels `version`, `guarantee`: 1 (an info metric).
pub const BUILD_INFO: &str = "fraudstream_build_info";
/// Gauge, labels `topic`, `partition`: messages of an assigned partition not yet read
/// (last stable offset − position), from librdkafka statistics.
pub const CONSUMER_LAG: &str = "fraudstream_consumer_lag_messages";
/// Gauge, labels `model` (primary, shadow) and `model_version`: 1 for a model in service,
/// 0 once replaced (an info metric).
pub const MODEL_INFO: &str = "fraudstream_model_info";
/// Counter, labels `target` (primary, shadow, rules) and `result` (loaded, refused): hot
/// reloads.
pub const RELOADS: &str = "fraudstream_reloads_total";
/// Counter, label `cause` (error, latency-budget, busy): transactions decided without the
/// model (degraded).
pub const DEGRADED: &str = "fraudstream_degraded_total";
/// Counter, label `rule` (its code): rules that fired.
pub const RULE_HITS: &str = "fraudstream_rule_hits_total";
/// Counter: transactions the shadow model could not score (its score is left out).
pub const SHADOW_ERRORS: &str = "fraudstream_shadow_errors_total";
/// Gauge: partitions of the transactions topic assigned to this instance.
pub const ASSIGNED_PARTITIONS: &str = "fraudstream_assigned_partitions";
/// Gauge, label `partition`: changelog records left to restore (0 when done).
pub const RESTORE_REMAINING: &str = "fraudstream_restore_remaining_records";
/// Counter: changelog records restored into the local store.
pub const RESTORED_RECORDS: &str = "fraudstream_restored_records_total";
/// Gauge, label `table`: entities in a global table (labels, blocklist).
pub const GLOBAL_ENTRIES: &str = "fraudstream_global_table_entries";
/// Histogram: how long a transaction waited in the merge buffer for the other inputs of its
/// partition (timestamp-ordered processing).
pub const MERGE_WAIT: &str = "fraudstream_merge_wait_seconds";
/// Counter: global-table records refused because their table was full, by table.
pub const GLOBAL_REFUSED: &str = "fraudstream_global_table_refused_total";
/// Gauge: bytes of input held by the event-time merge (bounded by `batch.max-buffered-bytes`).
pub const MERGE_BUFFERED_BYTES: &str = "fraudstream_merge_buffered_bytes";
/// Counter: records forwarded to the repartition topic (not on murmur2(customer)'s partition).
pub const REPARTITIONED: &str = "fraudstream_repartitioned_total";
/// Counter: forwarded records read again after a crash forwarded them twice (at-least-once),
/// skipped.
pub const REPARTITION_COPIES: &str = "fraudstream_repartition_copies_skipped_total";

const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
const SCORING_BUCKETS: [f64; 12] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
];
const ROW_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];
const SCORE_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99,
];

/// Installs the global Prometheus recorder and describes every metric.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(END_TO_END_LATENCY.into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_DURATION.into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(COMMIT_DURATION.into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(MERGE_WAIT.into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(SCORING_DURATION.into()), &SCORING_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(SCORING_BATCH_ROWS.into()), &ROW_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(SCORES.into()), &SCORE_BUCKETS)?
        .install_recorder()?;
    metrics::describe_counter!(MESSAGES_CONSUMED, "Messages taken from an input topic.");
    metrics::describe_counter!(VERDICTS, "Verdicts committed, by decision.");
    metrics::describe_counter!(
        DEAD_LETTERS,
        "Messages sent to the dead-letter topic, by error kind."
    );
    metrics::describe_histogram!(
        SCORING_DURATION,
        metrics::Unit::Seconds,
        "ONNX Runtime time per micro-batch."
    );
    metrics::describe_histogram!(SCORING_BATCH_ROWS, "Rows per scored micro-batch.");
    metrics::describe_histogram!(
        END_TO_END_LATENCY,
        metrics::Unit::Seconds,
        "Verdict committed minus transaction event time."
    );
    metrics::describe_histogram!(
        BATCH_DURATION,
        metrics::Unit::Seconds,
        "Processing of a batch: features, scores, verdicts handed to the producer."
    );
    metrics::describe_histogram!(
        COMMIT_DURATION,
        metrics::Unit::Seconds,
        "A commit: changelog, offsets, transaction commit, state store write."
    );
    metrics::describe_counter!(
        COMMITS,
        "Processing transactions, by result (committed, aborted)."
    );
    metrics::describe_counter!(
        EXPIRED,
        "Idle entities expired (deleted, with a changelog tombstone)."
    );
    metrics::describe_histogram!(SCORES, "Scores the primary model gave, by model version.");
    metrics::describe_gauge!(
        BUILD_INFO,
        "1, with the version and the processing guarantee as labels."
    );
    metrics::describe_gauge!(
        ASSIGNED_PARTITIONS,
        "Partitions of the transactions topic assigned here."
    );
    metrics::describe_gauge!(
        RESTORE_REMAINING,
        "Changelog records left to restore, per partition (0 when restored)."
    );
    metrics::describe_counter!(
        RESTORED_RECORDS,
        "Changelog records restored into the local store."
    );
    metrics::describe_gauge!(GLOBAL_ENTRIES, "Entities in a global table.");
    metrics::describe_histogram!(
        MERGE_WAIT,
        "Time a transaction waited for the other inputs of its partition (timestamp order)."
    );
    metrics::describe_counter!(
        GLOBAL_REFUSED,
        "Global-table records for a new entity refused because the table was full (state.max-global-entries)."
    );
    metrics::describe_gauge!(
        MERGE_BUFFERED_BYTES,
        metrics::Unit::Bytes,
        "Bytes of input held by the event-time merge, waiting for their turn."
    );
    metrics::describe_counter!(
        REPARTITIONED,
        "Records forwarded to the repartition topic because they were not on their customer's partition."
    );
    metrics::describe_counter!(
        REPARTITION_COPIES,
        "Forwarded records skipped because their task had applied them already (forwarded again after a crash, at-least-once)."
    );
    metrics::describe_gauge!(
        MODEL_INFO,
        "1 for a model in service, by role and version (0 once replaced)."
    );
    metrics::describe_counter!(
        RELOADS,
        "Hot reloads of the models and rules, by target and result (loaded, refused)."
    );
    metrics::describe_counter!(
        DEGRADED,
        "Transactions decided by rules alone because the model could not score, by cause."
    );
    metrics::describe_counter!(RULE_HITS, "Rules that fired, by rule code.");
    metrics::describe_counter!(
        SHADOW_ERRORS,
        "Transactions the shadow model could not score."
    );
    Ok(handle)
}

/// What `/readyz` and `/healthz` report, kept current by the pipeline.
///
/// Ready once every worker has joined its group (its first assignment, possibly empty, is
/// done), no restore is in progress and the global tables are loaded: an instance without
/// partitions is ready (a spare, which a rolling update needs). Healthy while every
/// worker's processing loop turns: each turns at least every 100 ms, so one that has not for
/// `metrics.stall-timeout-ms` is stuck and the instance should be restarted.
#[derive(Clone)]
pub struct Readiness(Arc<ReadinessInner>);

pub struct ReadinessInner {
    global_loaded: AtomicBool,
    workers: Vec<WorkerState>,
}

#[derive(Default)]
struct WorkerState {
    /// The first assignment is done.
    started: AtomicBool,
    /// Partitions assigned to the worker (informational).
    assigned: std::sync::atomic::AtomicUsize,
    /// Assigned partitions whose state is not restored yet.
    restoring: std::sync::atomic::AtomicUsize,
    /// When the processing loop last turned (ms since the epoch; 0: not started).
    beat_ms: std::sync::atomic::AtomicI64,
}

/// One worker's part of the [`Readiness`].
#[derive(Clone)]
pub struct WorkerReadiness {
    all: Readiness,
    index: usize,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness::new(1)
    }
}

impl WorkerReadiness {
    fn state(&self) -> &WorkerState {
        &self.all.0.workers[self.index]
    }
    /// An assignment was applied: `partitions` are assigned to this worker now.
    pub fn set_assigned(&self, partitions: usize) {
        self.state().assigned.store(partitions, Ordering::Relaxed);
        self.state().started.store(true, Ordering::Relaxed);
    }
    pub fn set_restoring(&self, partitions: usize) {
        self.state().restoring.store(partitions, Ordering::Relaxed);
    }
    /// The worker's processing loop turned.
    pub fn beat(&self) {
        self.state().beat_ms.store(now_ms(), Ordering::Relaxed);
    }
    /// Partitions assigned to all workers.
    pub fn assigned_total(&self) -> usize {
        self.all.sum(|w| &w.assigned)
    }
}

impl Readiness {
    pub fn new(workers: usize) -> Readiness {
        Readiness(Arc::new(ReadinessInner {
            global_loaded: AtomicBool::new(false),
            workers: (0..workers.max(1))
                .map(|_| WorkerState::default())
                .collect(),
        }))
    }

    pub fn worker(&self, index: usize) -> WorkerReadiness {
        assert!(index < self.0.workers.len(), "no worker {index}");
        WorkerReadiness {
            all: self.clone(),
            index,
        }
    }

    pub fn set_global_loaded(&self, loaded: bool) {
        self.0.global_loaded.store(loaded, Ordering::Relaxed);
    }

    fn sum(&self, field: impl Fn(&WorkerState) -> &std::sync::atomic::AtomicUsize) -> usize {
        self.0
            .workers
            .iter()
            .map(|w| field(w).load(Ordering::Relaxed))
            .sum()
    }

    /// Whether ready, and the condition, in words.
    pub fn ready(&self) -> (bool, String) {
        let i = &self.0;
        if !i.global_loaded.load(Ordering::Relaxed) {
            return (false, "not ready: loading the global tables".into());
        }
        if !i.workers.iter().all(|w| w.started.load(Ordering::Relaxed)) {
            return (false, "not ready: joining the consumer group".into());
        }
        let restoring = self.sum(|w| &w.restoring);
        if restoring > 0 {
            return (
                false,
                format!("not ready: restoring the state of {restoring} partition(s)"),
            );
        }
        let assigned = self.sum(|w| &w.assigned);
        if assigned == 0 {
            return (true, "ready: no partitions assigned (a spare)".into());
        }
        (
            true,
            format!("ready: {assigned} partition(s) assigned and restored"),
        )
    }

    /// Whether every processing loop has turned within `stall`, and what the slowest last
    /// did.
    pub fn healthy(&self, stall: Duration) -> (bool, String) {
        let beats: Vec<i64> = self
            .0
            .workers
            .iter()
            .map(|w| w.beat_ms.load(Ordering::Relaxed))
            .collect();
        if beats.iter().all(|&b| b == 0) {
            return (true, "ok: starting".into());
        }
        let oldest = beats.iter().copied().filter(|&b| b > 0).min().unwrap_or(0);
        let since = now_ms().saturating_sub(oldest);
        if since as u128 > stall.as_millis() {
            (
                false,
                format!("unhealthy: the processing loop has not turned for {since} ms"),
            )
        } else {
            (
                true,
                format!("ok: the processing loop turned {since} ms ago"),
            )
        }
    }

    /// Whether ready (for tests and logs).
    pub fn get(&self) -> bool {
        self.ready().0
    }
}

/// What the endpoint needs besides the metrics.
pub struct Endpoint {
    pub metrics: PrometheusHandle,
    pub readiness: Readiness,
    /// How long the processing loop may go without a turn before `/healthz` fails.
    pub stall: Duration,
    /// `POST /admin/reload-model`, with the token its requests must carry; `None`: off.
    pub admin: Option<(Arc<dyn Admin>, String)>,
}

/// Binds the endpoint (axum on the runtime); returns the bound address (useful with port 0)
/// and the serving task, which ends when `shutdown` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    endpoint: Endpoint,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    use axum::routing::{get, post};
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let endpoint = Arc::new(endpoint);
    let upkeep = endpoint.metrics.clone();
    let app = axum::Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/admin/reload-model", post(reload_model))
        .with_state(endpoint);
    let task = tokio::spawn(async move {
        let stop = shutdown.clone();
        let serving = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                stop.cancelled().await;
            })
            .into_future();
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tokio::pin!(serving);
        loop {
            tokio::select! {
                r = &mut serving => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "Metrics endpoint stopped.");
                    }
                    break;
                }
                _ = tick.tick() => upkeep.run_upkeep(),
            }
        }
    });
    Ok((bound, task))
}

type State = axum::extract::State<Arc<Endpoint>>;
type Reply = (axum::http::StatusCode, String);

async fn metrics_text(axum::extract::State(e): State) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        e.metrics.render(),
    )
}

fn reply(ok: bool, text: String) -> Reply {
    use axum::http::StatusCode;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, text + "\n")
}

async fn healthz(axum::extract::State(e): State) -> Reply {
    let (ok, text) = e.readiness.healthy(e.stall);
    reply(ok, text)
}

async fn readyz(axum::extract::State(e): State) -> Reply {
    let (ok, text) = e.readiness.ready();
    reply(ok, text)
}

/// Loads and checks the configured model files again; answers once they are checked (the
/// swap follows at the next batch boundary) or refused. Off unless `metrics.admin-token`
/// is set; then only with `Authorization: Bearer <token>`.
async fn reload_model(axum::extract::State(e): State, headers: axum::http::HeaderMap) -> Reply {
    use axum::http::StatusCode;
    let Some((admin, token)) = &e.admin else {
        return (
            StatusCode::NOT_FOUND,
            "the admin endpoint is off (set metrics.admin-token)\n".into(),
        );
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
        return (
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required\n".into(),
        );
    }
    match admin.reload().await {
        Ok(summary) => (StatusCode::OK, format!("{summary}\n")),
        Err(e) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{e}\n")),
    }
}

/// Compares without an early exit, so the time taken says nothing of how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}
