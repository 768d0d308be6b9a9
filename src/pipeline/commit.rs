//! The commit: the one place where the order of outputs, state and input offsets is decided.
//!
//! Everything processed since the last commit is one Kafka transaction of the instance's
//! transactional producer (Kafka Streams' `exactly_once_v2`, KIP-447): the repartitioned
//! records and the dead letters and verdicts of each batch as it is processed, then, at the
//! commit, the changelog records of the state the transaction changed (the latest value of
//! each entity, tombstones for expired ones, each partition's stream time), then the input
//! offsets sent with the consumer's group metadata, then the commit. A member of an older
//! group generation (a zombie whose partitions have moved) is refused at the offsets and its
//! transaction aborted: nothing it wrote becomes visible to `read_committed` readers.
//!
//! Only after the commit is the state written to RocksDB, with the changelog offsets it
//! reflects as each partition's checkpoint: the store is never ahead of a committed
//! transaction. On an abort the caller drops the uncommitted state and what the merge holds,
//! and rewinds the consumer to the committed offsets.
//!
//! At-least-once differs in one thing: forwarded records, verdicts and dead letters go out at
//! once through an idempotent producer outside the transaction (visible before the commit),
//! and the commit waits for their acknowledgements before committing the offsets. After a
//! crash they may be produced again, identical, since the state they were computed from was
//! not committed; a forwarded record's task skips the second copy
//! ([`crate::state::StateBatch::first_forward`]), so its state changes once.
//!
//! Commits happen every `processing.commit-interval-ms`, on revoke and at shutdown.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};

use super::batch::Output;
use crate::config::{Guarantee, Settings};
use crate::decision::Decision;
use crate::sink::{OutRecord, Sink, Topic};
use crate::state::{StateBatch, Store};
use crate::telemetry;

/// How long one transactional call may block.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Test hook for the chaos runs: `FRAUDSTREAM_TEST_CRASH=<point>:<n>` aborts the process at
/// `point` of its n-th commit, as a SIGKILL at that moment would. Points: `before-offsets`
/// (records sent, transaction open), `before-commit` (offsets sent), `before-store` (committed,
/// store not written).
#[derive(Debug)]
struct CrashAt {
    point: String,
    commit: u64,
}

impl CrashAt {
    fn from_env() -> Option<CrashAt> {
        let v = std::env::var("FRAUDSTREAM_TEST_CRASH").ok()?;
        let (point, n) = v.split_once(':')?;
        Some(CrashAt {
            point: point.to_string(),
            commit: n.parse().ok()?,
        })
    }

    fn check(this: &Option<CrashAt>, point: &str, commit: u64) {
        if let Some(c) = this {
            if c.point == point && c.commit == commit {
                tracing::error!(
                    point,
                    commit,
                    "FRAUDSTREAM_TEST_CRASH: aborting the process."
                );
                std::process::abort();
            }
        }
    }
}

/// Why a transaction did not commit, and what happens next.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Aborted: nothing of it is visible. Retry: drop the uncommitted state, rewind the
    /// consumer to the committed offsets and process again.
    #[error("transaction aborted: {0}")]
    Aborted(String),
    /// The producer cannot go on (fenced by another incarnation of this instance, or a fatal
    /// librdkafka error). Fatal for the producer: a new one must be created, or the
    /// instance must exit.
    #[error("the transactional producer failed for good: {0}")]
    Fatal(String),
    /// A record can never be produced (too large, its topic gone or refused): retrying
    /// would block the instance for good, and every instance that takes its partitions
    /// after it. Fatal, with what to do: the transaction is aborted and the instance stops.
    #[error("{0}")]
    Permanent(String),
    /// The state store could not be written after a commit. Fatal: the instance exits, and
    /// its restart restores the committed state from the changelog.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// What a commit did, for the caller's bookkeeping.
#[derive(Debug, Default)]
pub struct Committed {
    /// The input offsets committed: (topic, partition) → next offset to read.
    pub offsets: BTreeMap<(String, i32), i64>,
}

pub struct Committer {
    guarantee: Guarantee,
    tx: Sink,
    /// At-least-once: forwards, verdicts and dead letters, outside the transaction.
    direct: Option<Sink>,
    open: bool,
    /// An abort was started and has not finished (the broker was away).
    aborting: bool,
    /// Next offset to commit per input (topic, partition), for what was processed.
    offsets: BTreeMap<(String, i32), i64>,
    /// The verdicts of the open transaction (decision, event time), counted at its commit.
    decisions: Vec<(Decision, i64)>,
    interval: Duration,
    opened_at: Instant,
    /// Commits attempted so far (for [`CrashAt`]).
    commits: u64,
    crash: Option<CrashAt>,
}

impl Committer {
    /// Creates the producers and initialises transactions (fencing an earlier incarnation
    /// with the same transactional id, and aborting what it left open).
    pub fn new(settings: &Settings, transactional_id: &str) -> anyhow::Result<Committer> {
        let tx = Sink::transactional(settings, transactional_id)?;
        let mut backoff = Duration::from_millis(200);
        loop {
            match tx.producer().init_transactions(CALL_TIMEOUT) {
                Ok(()) => break,
                Err(KafkaError::Transaction(e)) if e.is_retriable() => {
                    tracing::warn!(error = %e, "Initialising transactions; retrying.");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => anyhow::bail!("cannot initialise Kafka transactions (transactional id `{transactional_id}`): {e}"),
            }
        }
        let direct = match settings.processing.guarantee {
            Guarantee::ExactlyOnce => None,
            Guarantee::AtLeastOnce => Some(Sink::idempotent(settings)?),
        };
        Ok(Committer {
            guarantee: settings.processing.guarantee,
            tx,
            direct,
            open: false,
            aborting: false,
            offsets: BTreeMap::new(),
            decisions: Vec::new(),
            interval: Duration::from_millis(settings.processing.commit_interval_ms),
            opened_at: Instant::now(),
            commits: 0,
            crash: CrashAt::from_env(),
        })
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Time left until the open transaction is due for its commit.
    pub fn due_in(&self) -> Option<Duration> {
        self.open
            .then(|| self.interval.saturating_sub(self.opened_at.elapsed()))
    }

    fn begin(&mut self) -> Result<(), CommitError> {
        if self.aborting {
            self.finish_abort(CALL_TIMEOUT)?;
        }
        if !self.open {
            self.tx
                .producer()
                .begin_transaction()
                .map_err(|e| self.failed(e))?;
            self.open = true;
            self.opened_at = Instant::now();
        }
        Ok(())
    }

    /// Sends a batch's output into the open transaction (opening one if needed) and records
    /// the input offsets it covers: (topic, partition, next offset).
    pub fn send(
        &mut self,
        out: &mut Output,
        processed: impl IntoIterator<Item = (String, i32, i64)>,
    ) -> Result<(), CommitError> {
        self.begin()?;
        let outside = self.direct.as_ref();
        for r in out
            .forwards
            .iter()
            .chain(&out.dead_letters)
            .chain(&out.verdicts)
        {
            match outside {
                Some(direct) => direct.send(r),
                None => self.tx.send(r),
            }
            .map_err(|e| self.failed(e))?;
        }
        self.tx.serve_deliveries();
        if let Some(direct) = outside {
            direct.serve_deliveries();
        }
        for (topic, p, next) in processed {
            let e = self.offsets.entry((topic, p)).or_insert(next);
            *e = (*e).max(next);
        }
        self.decisions.append(&mut out.decisions);
        out.clear();
        Ok(())
    }

    /// Commits the open transaction with `state`'s changelog records and the offsets sent so
    /// far, then writes `state` to `store` with its checkpoints and clears it. Without an
    /// open transaction, does nothing. On an error the transaction is aborted (or the
    /// producer is finished): see [`CommitError`].
    pub fn commit<C: ConsumerContext>(
        &mut self,
        consumer: &impl Consumer<C>,
        state: &mut StateBatch,
        store: &Store,
    ) -> Result<Option<Committed>, CommitError> {
        if !self.open {
            return Ok(None);
        }
        let started = Instant::now();
        self.commits += 1;
        match self.commit_open(consumer, state) {
            Ok(checkpoints) => {
                CrashAt::check(&self.crash, "before-store", self.commits);
                store.commit(state, &checkpoints, crate::pipeline::now_ms())?;
                self.open = false;
                let committed_ms = crate::pipeline::now_ms();
                self.count_verdicts(committed_ms);
                metrics::histogram!(telemetry::COMMIT_DURATION)
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!(telemetry::COMMITS, "result" => "committed").increment(1);
                Ok(Some(Committed {
                    offsets: std::mem::take(&mut self.offsets),
                }))
            }
            Err(e) => {
                if matches!(e, CommitError::Aborted(_) | CommitError::Permanent(_)) {
                    self.abort();
                }
                Err(e)
            }
        }
    }

    fn commit_open<C: ConsumerContext>(
        &mut self,
        consumer: &impl Consumer<C>,
        state: &StateBatch,
    ) -> Result<BTreeMap<i32, i64>, CommitError> {
        let t0 = Instant::now();
        let mut changelog = 0;
        for (p, key, value) in state.changelog_records() {
            changelog += 1;
            let r = OutRecord {
                topic: Topic::Changelog,
                partition: Some(p),
                key: Some(key),
                payload: value,
                headers: None,
                timestamp: None,
            };
            self.tx.send(&r).map_err(|e| self.failed(e))?;
        }
        if let Some(direct) = &self.direct {
            // At-least-once: no offset is committed before its verdicts are acknowledged.
            direct
                .flush(CALL_TIMEOUT)
                .map_err(|e| CommitError::Aborted(format!("verdicts not acknowledged: {e}")))?;
            let d = direct.take_deliveries();
            if let Some((topic, e)) = &d.permanent {
                return Err(CommitError::Permanent(crate::sink::explain_permanent(
                    topic, e,
                )));
            }
            if d.failed > 0 {
                return Err(CommitError::Aborted(format!(
                    "{} verdicts or dead letters not delivered: {}",
                    d.failed,
                    d.first_error.map(|e| e.to_string()).unwrap_or_default()
                )));
            }
        }
        CrashAt::check(&self.crash, "before-offsets", self.commits);
        let t1 = Instant::now();
        if !self.offsets.is_empty() {
            let mut tpl = TopicPartitionList::with_capacity(self.offsets.len());
            for ((topic, p), next) in &self.offsets {
                tpl.add_partition_offset(topic, *p, Offset::Offset(*next))
                    .map_err(|e| CommitError::Aborted(e.to_string()))?;
            }
            let group = consumer.group_metadata().ok_or_else(|| {
                CommitError::Aborted("the consumer has no group metadata (not in the group)".into())
            })?;
            self.tx
                .producer()
                .send_offsets_to_transaction(&tpl, &group, CALL_TIMEOUT)
                .map_err(|e| self.failed(e))?;
        }
        CrashAt::check(&self.crash, "before-commit", self.commits);
        let t2 = Instant::now();
        // Everything acknowledged first, so that the commit's own flush returns at once.
        self.tx.flush(CALL_TIMEOUT).map_err(|e| self.failed(e))?;
        let mut attempts = 0;
        loop {
            match self.tx.producer().commit_transaction(CALL_TIMEOUT) {
                Ok(()) => break,
                Err(KafkaError::Transaction(e)) if e.is_retriable() && attempts < 5 => {
                    attempts += 1;
                    tracing::warn!(error = %e, "Commit not confirmed yet; retrying.");
                }
                Err(e) => return Err(self.failed(e)),
            }
        }
        tracing::debug!(
            changelog,
            changelog_ms = (t1 - t0).as_secs_f64() * 1e3,
            offsets_ms = (t2 - t1).as_secs_f64() * 1e3,
            commit_ms = t2.elapsed().as_secs_f64() * 1e3,
            "Committed."
        );
        let d = self.tx.take_deliveries();
        // The next changelog record to read after each partition's last one of this
        // transaction (its commit marker comes next, which readers step over).
        Ok(d.changelog.into_iter().map(|(p, o)| (p, o + 1)).collect())
    }

    /// Aborts the open transaction (if any): nothing of it becomes visible. The caller
    /// drops its uncommitted state and rewinds. An abort librdkafka cannot finish now (the
    /// broker is away) is resumed before the next transaction begins.
    pub fn abort(&mut self) {
        if self.open {
            metrics::counter!(telemetry::COMMITS, "result" => "aborted").increment(1);
            self.aborting = true;
        }
        self.open = false;
        self.offsets.clear();
        self.decisions.clear();
        if self.aborting {
            if let Err(e) = self.finish_abort(CALL_TIMEOUT) {
                tracing::warn!(error = %e, "Abort not finished yet; resumed before the next transaction.");
            }
        }
        self.tx.take_deliveries();
        if let Some(d) = &self.direct {
            d.take_deliveries();
        }
    }

    /// Drives librdkafka's abort to its end. It waits for the messages in flight, whose
    /// delivery reports this thread must serve: so the abort is called in short slices, with
    /// the reports served in between (librdkafka resumes an abort that timed out).
    fn finish_abort(&mut self, timeout: Duration) -> Result<(), CommitError> {
        use rdkafka::producer::PurgeConfig;
        // What is still queued (not sent) is dropped at once.
        self.tx.producer().purge(PurgeConfig::default().queue());
        let deadline = Instant::now() + timeout;
        loop {
            self.tx.producer().poll(Duration::ZERO);
            match self
                .tx
                .producer()
                .abort_transaction(Duration::from_millis(200))
            {
                Ok(()) => {
                    self.aborting = false;
                    return Ok(());
                }
                Err(e) => {
                    let failed = self.failed(e);
                    if matches!(failed, CommitError::Fatal(_)) || Instant::now() >= deadline {
                        return Err(failed);
                    }
                }
            }
        }
    }

    /// Whether the producer has failed for good.
    pub fn is_fatal(&self) -> bool {
        self.tx.producer().client().fatal_error().is_some()
    }

    fn failed(&self, e: KafkaError) -> CommitError {
        let permanent = self
            .tx
            .permanent_failure()
            .or_else(|| self.direct.as_ref().and_then(Sink::permanent_failure));
        if let Some(why) = permanent {
            return CommitError::Permanent(why);
        }
        let fatal = match &e {
            KafkaError::Transaction(t) => t.is_fatal(),
            _ => false,
        };
        if fatal || self.is_fatal() {
            CommitError::Fatal(e.to_string())
        } else {
            CommitError::Aborted(e.to_string())
        }
    }

    fn count_verdicts(&mut self, committed_ms: i64) {
        let mut counts = [0u64; Decision::ALL.len()];
        let latency = metrics::histogram!(telemetry::END_TO_END_LATENCY);
        for (decision, event_time) in self.decisions.drain(..) {
            counts[decision as usize] += 1;
            latency.record((committed_ms - event_time).max(0) as f64 / 1000.0);
        }
        for (d, n) in Decision::ALL.iter().zip(counts) {
            if n > 0 {
                metrics::counter!(telemetry::VERDICTS, "decision" => d.as_str()).increment(n);
            }
        }
    }

    pub fn guarantee(&self) -> Guarantee {
        self.guarantee
    }
}
