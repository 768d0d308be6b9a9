//! Metric names and the HTTP endpoint that serves `/metrics`, `/healthz`, `/readyz` and
//! `POST /admin/reload-model`.
//!
//! Names follow Prometheus conventions: `fraudstream_` prefix, base units, `_total` on
//! counters, `_seconds` histograms with explicit buckets. Labels are bounded: topic,
//! decision, error kind; never an entity or transaction id.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
/// Counter: records forwarded to the repartition topic (not on murmur2(customer)'s partition).
pub const REPARTITIONED: &str = "fraudstream_repartitioned_total";

const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
const SCORING_BUCKETS: [f64; 12] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
];
const ROW_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// Installs the global Prometheus recorder and describes every metric.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(END_TO_END_LATENCY.into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_DURATION.into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(COMMIT_DURATION.into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(MERGE_WAIT.into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(SCORING_DURATION.into()), &SCORING_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(SCORING_BATCH_ROWS.into()), &ROW_BUCKETS)?
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
        REPARTITIONED,
        "Records forwarded to the repartition topic because they were not on their customer's partition."
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

/// Whether this instance is doing its work (`/readyz`): partitions assigned, their state
/// restored, and the global tables loaded.
#[derive(Clone, Default)]
pub struct Readiness(Arc<ReadinessInner>);

#[derive(Default)]
pub struct ReadinessInner {
    assigned: AtomicBool,
    /// Assigned partitions whose state is not restored yet.
    restoring: std::sync::atomic::AtomicUsize,
    global_loaded: AtomicBool,
}

impl Readiness {
    /// Partitions assigned (or not).
    pub fn set(&self, assigned: bool) {
        self.0.assigned.store(assigned, Ordering::Relaxed);
    }
    pub fn set_restoring(&self, partitions: usize) {
        self.0.restoring.store(partitions, Ordering::Relaxed);
    }
    pub fn set_global_loaded(&self, loaded: bool) {
        self.0.global_loaded.store(loaded, Ordering::Relaxed);
    }
    /// Which condition of readiness does not hold.
    pub fn why_not(&self) -> &'static str {
        if !self.0.global_loaded.load(Ordering::Relaxed) {
            "global tables loading"
        } else if !self.0.assigned.load(Ordering::Relaxed) {
            "no partitions assigned"
        } else if self.0.restoring.load(Ordering::Relaxed) > 0 {
            "restoring state"
        } else {
            "ready"
        }
    }

    pub fn get(&self) -> bool {
        self.0.assigned.load(Ordering::Relaxed)
            && self.0.restoring.load(Ordering::Relaxed) == 0
            && self.0.global_loaded.load(Ordering::Relaxed)
    }
}

/// Binds the endpoint; returns the bound address (useful with port 0) and the serving task.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    readiness: Readiness,
    admin: Arc<dyn Admin>,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut upkeep = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = upkeep.tick() => handle.run_upkeep(),
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let handle = handle.clone();
                    let readiness = readiness.clone();
                    let admin = admin.clone();
                    tokio::spawn(async move {
                        let _ = respond(stream, &handle, &readiness, admin.as_ref()).await;
                    });
                }
            }
        }
    });
    Ok((bound, task))
}

/// A minimal HTTP/1.1 responder: one request per connection, GET (and one POST) only.
async fn respond(
    mut stream: tokio::net::TcpStream,
    handle: &PrometheusHandle,
    readiness: &Readiness,
    admin: &dyn Admin,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    // Read until the end of the request head (or 4 KiB, or 2 s).
    let read = async {
        loop {
            let n = stream.read(&mut buf[len..]).await?;
            len += n;
            if n == 0 || len == buf.len() || buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok::<_, std::io::Error>(());
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .is_err()
    {
        return Ok(());
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", handle.render()),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/readyz") if readiness.get() => ("200 OK", "text/plain", "ready\n".to_string()),
        ("GET", "/readyz") => (
            "503 Service Unavailable",
            "text/plain",
            format!("not ready: {}\n", readiness.why_not()),
        ),
        // Loads and checks the configured model files again; answers once they are checked
        // (the swap follows at the next batch boundary) or refused.
        ("POST", "/admin/reload-model") => match admin.reload().await {
            Ok(summary) => ("200 OK", "text/plain", format!("{summary}\n")),
            Err(e) => ("422 Unprocessable Entity", "text/plain", format!("{e}\n")),
        },
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only (and POST /admin/reload-model)\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
