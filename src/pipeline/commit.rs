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
//! The worker does not wait for a commit: the commit (changelog, offsets, commit) runs on a
//! thread of its own while the worker processes the next batches. They read the committing
//! batch's state through it ([`crate::state::Committing`]); their records are held back for
//! the next transaction, which begins once this one is committed. Only after the commit is
//! the state written to RocksDB, by the worker, with the changelog offsets it reflects as
//! each partition's checkpoint ([`Committer::settle`]): the store is never ahead of a
//! committed transaction. One commit is in flight at a time. On an abort the caller drops
//! the uncommitted state (the committing batch's and the batches' after it) and what the
//! merge holds, and rewinds the consumer to the committed offsets.
//!
//! At-least-once differs in one thing. Forwarded records, verdicts and dead letters go out at
//! once through an idempotent producer outside the transaction (visible before the commit),
//! and the commit waits for their acknowledgements before committing the offsets: for those
//! sent before it began, a generation of the producer ([`Sink::cut`]); the next batches' go
//! out meanwhile. After a crash they may be produced again, identical, since the state they
//! were computed from was not committed; a forwarded record's task skips the second copy
//! ([`crate::state::StateBatch::first_forward`]), so its state changes once.
//!
//! Commits happen every `processing.commit-interval-ms` (by default 100 ms under
//! exactly-once, 1,000 ms under at-least-once), on revoke and at shutdown.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, ConsumerContext, ConsumerGroupMetadata};
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};

use super::batch::Output;
use crate::config::{Guarantee, Settings};
use crate::decision::Decision;
use crate::sink::{OutRecord, Sink, Topic};
use crate::source::Wake;
use crate::state::{EntityKind, Key, StateBatch, Store};
use crate::telemetry;

/// How long one transactional call may block.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Records held for the next transaction while one commits (exactly-once) at which the
/// batches wait for the commit.
const MAX_HELD: usize = 50_000;

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

    fn check(this: Option<&CrashAt>, point: &str, commit: u64) {
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
    tx: Arc<Sink>,
    /// At-least-once: forwards, verdicts and dead letters, outside the transaction.
    direct: Option<Arc<Sink>>,
    /// Records were processed since the last commit began: one is to come.
    open: bool,
    /// This thread's transactional producer is in a transaction to abort on a failure: under
    /// exactly-once from the first send until its commit starts (the commit's thread has it
    /// then), or after a failed commit.
    in_tx: bool,
    /// An abort was started and has not finished (the broker was away).
    aborting: bool,
    /// Next offset to commit per input (topic, partition), for what was processed.
    offsets: BTreeMap<(String, i32), i64>,
    /// The verdicts since the last commit began (decision, event time), counted at its end.
    decisions: Vec<(Decision, i64)>,
    interval: Duration,
    opened_at: Instant,
    /// Commits attempted so far (for [`CrashAt`]).
    commits: u64,
    crash: Option<Arc<CrashAt>>,
    /// The commit running beside the next batches.
    in_flight: Option<InFlight>,
    /// Exactly-once: the records of the batches processed while a commit is in flight, for
    /// the next transaction.
    held: Vec<OutRecord>,
    /// Woken when it is done.
    wake: Arc<Wake>,
    /// The batch state of the last commit, emptied with its tables' room kept: the next
    /// batches fill it instead of growing new tables from nothing.
    spare: StateBatch,
}

/// A commit on its thread, and what it commits.
struct InFlight {
    work: JoinHandle<Finished>,
    /// Set (and the loop woken) when its work is done, just before its thread ends.
    done: Arc<AtomicBool>,
    state: Arc<StateBatch>,
    expired: HashSet<(EntityKind, Key)>,
    offsets: BTreeMap<(String, i32), i64>,
    decisions: Vec<(Decision, i64)>,
    started: Instant,
}

/// How a commit thread ended: its checkpoints, and whether it left the transactional
/// producer in a transaction (to abort).
struct Finished {
    result: Result<BTreeMap<i32, i64>, CommitError>,
    in_tx: bool,
}

impl Committer {
    /// Creates the producers and initialises transactions (fencing an earlier incarnation
    /// with the same transactional id, and aborting what it left open).
    pub fn new(
        settings: &Settings,
        transactional_id: &str,
        wake: Arc<Wake>,
    ) -> anyhow::Result<Committer> {
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
            Guarantee::AtLeastOnce => Some(Arc::new(Sink::idempotent(settings)?)),
        };
        Ok(Committer {
            tx: Arc::new(tx),
            direct,
            open: false,
            in_tx: false,
            aborting: false,
            offsets: BTreeMap::new(),
            decisions: Vec::new(),
            interval: settings.processing.commit_interval(),
            opened_at: Instant::now(),
            commits: 0,
            crash: CrashAt::from_env().map(Arc::new),
            in_flight: None,
            held: Vec::new(),
            wake,
            spare: StateBatch::default(),
        })
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Time left until the records processed since the last commit are due for theirs.
    pub fn due_in(&self) -> Option<Duration> {
        self.open
            .then(|| self.interval.saturating_sub(self.opened_at.elapsed()))
    }

    /// Whether the commit beside the batches is done (to [`Committer::settle`]).
    pub fn finished(&self) -> bool {
        self.in_flight
            .as_ref()
            .is_some_and(|f| f.done.load(Ordering::Acquire))
    }

    /// Whether the batches must wait for the commit in flight: under exactly-once their
    /// records are held until it ends, in memory, and a commit the broker is slow to take
    /// would otherwise let them grow without bound.
    pub fn must_settle(&self) -> bool {
        self.in_flight.is_some() && self.held.len() >= MAX_HELD
    }

    /// The state of the commit in flight, for the batches after it to read through.
    pub fn committing(&self) -> Option<(&StateBatch, &HashSet<(EntityKind, Key)>)> {
        self.in_flight.as_ref().map(|f| (&*f.state, &f.expired))
    }

    /// Exactly-once, with no commit in flight: begins a transaction if none is open, and
    /// sends into it first what was held back while the last one committed.
    fn release(&mut self) -> Result<(), CommitError> {
        if self.aborting {
            self.finish_abort(CALL_TIMEOUT)?;
        }
        if !self.in_tx {
            self.tx
                .producer()
                .begin_transaction()
                .map_err(|e| classify(e, &self.tx, None))?;
            self.in_tx = true;
        }
        for r in self.held.drain(..) {
            self.tx.send(r).map_err(|e| classify(e, &self.tx, None))?;
        }
        Ok(())
    }

    /// Sends a batch's output and records the input offsets it covers: (topic, partition,
    /// next offset). Under exactly-once into the open transaction (beginning one if needed),
    /// or, while a commit is in flight, held back for the next; under at-least-once at once,
    /// outside the transaction.
    pub fn send(
        &mut self,
        out: &mut Output,
        processed: impl IntoIterator<Item = (String, i32, i64)>,
    ) -> Result<(), CommitError> {
        if let Some(direct) = &self.direct {
            for r in out
                .forwards
                .drain(..)
                .chain(out.dead_letters.drain(..))
                .chain(out.verdicts.drain(..))
            {
                direct
                    .send(r)
                    .map_err(|e| classify(e, &self.tx, Some(direct)))?;
            }
            direct.serve_deliveries();
        } else if self.in_flight.is_some() {
            self.held.append(&mut out.forwards);
            self.held.append(&mut out.dead_letters);
            self.held.append(&mut out.verdicts);
        } else {
            self.release()?;
            for r in out
                .forwards
                .drain(..)
                .chain(out.dead_letters.drain(..))
                .chain(out.verdicts.drain(..))
            {
                self.tx.send(r).map_err(|e| classify(e, &self.tx, None))?;
            }
            self.tx.serve_deliveries();
        }
        if !self.open {
            self.open = true;
            self.opened_at = Instant::now();
        }
        for (topic, p, next) in processed {
            let e = self.offsets.entry((topic, p)).or_insert(next);
            *e = (*e).max(next);
        }
        self.decisions.append(&mut out.decisions);
        out.clear();
        Ok(())
    }

    /// Starts the commit of what was processed so far, with `state`'s changelog records, on a
    /// thread of its own, and empties `state`; the batches after it read its state through
    /// [`Committer::committing`]. The one in flight before must be settled
    /// ([`Committer::settle`]). Without records processed, does nothing.
    pub fn start<C: ConsumerContext>(
        &mut self,
        consumer: &impl Consumer<C>,
        state: &mut StateBatch,
    ) -> Result<(), CommitError> {
        assert!(self.in_flight.is_none(), "one commit in flight at a time");
        if !self.open {
            return Ok(());
        }
        let direct = self.direct.clone();
        // At-least-once: the commit waits for the records sent so far (this generation),
        // and begins its transaction itself. Exactly-once: its transaction holds them all.
        let generation = match &direct {
            Some(d) => {
                if self.aborting {
                    self.finish_abort(CALL_TIMEOUT)?;
                }
                d.cut()
            }
            None => {
                self.release()?;
                // The commit's thread has the transaction now.
                self.in_tx = false;
                0
            }
        };
        self.open = false;
        self.commits += 1;
        let state = Arc::new(std::mem::replace(state, std::mem::take(&mut self.spare)));
        let offsets = std::mem::take(&mut self.offsets);
        let done = Arc::new(AtomicBool::new(false));
        let group = consumer.group_metadata();
        let work = {
            let (tx, state, offsets) = (self.tx.clone(), state.clone(), offsets.clone());
            let (crash, commit, wake) = (self.crash.clone(), self.commits, self.wake.clone());
            let done = done.clone();
            std::thread::Builder::new()
                .name("commit".into())
                .spawn(move || {
                    let direct = direct.as_deref();
                    let begun = match direct {
                        Some(_) => tx.producer().begin_transaction(),
                        None => Ok(()),
                    };
                    let finished = match begun {
                        Err(e) => Finished {
                            result: Err(classify(e, &tx, direct)),
                            in_tx: false,
                        },
                        Ok(()) => {
                            let result = finish(
                                &tx,
                                direct.map(|d| (d, generation)),
                                &state,
                                &offsets,
                                group,
                                crash.as_deref(),
                                commit,
                            );
                            Finished {
                                in_tx: result.is_err(),
                                result,
                            }
                        }
                    };
                    done.store(true, Ordering::Release);
                    wake.notify();
                    finished
                })
                .map_err(|e| CommitError::Aborted(format!("cannot start a commit thread: {e}")))?
        };
        self.in_flight = Some(InFlight {
            work,
            done,
            expired: state.expired.iter().copied().collect(),
            state,
            offsets,
            decisions: std::mem::take(&mut self.decisions),
            started: Instant::now(),
        });
        Ok(())
    }

    /// Waits for the commit in flight (if any) and ends it: on success the store is written
    /// with its state and checkpoints; on an error its transaction is aborted (see
    /// [`CommitError`]), and what was processed after it must be dropped too.
    pub fn settle(&mut self, store: &Store) -> Result<Option<Committed>, CommitError> {
        let Some(f) = self.in_flight.take() else {
            return Ok(None);
        };
        let done = f.work.join().unwrap_or_else(|_| Finished {
            result: Err(CommitError::Aborted("the commit thread panicked".into())),
            in_tx: true,
        });
        self.in_tx = done.in_tx;
        let mut state = Arc::into_inner(f.state).expect("the commit thread has ended");
        let completed = self.completed(
            done.result,
            &mut state,
            f.offsets,
            f.decisions,
            f.started,
            store,
        );
        state.clear();
        self.spare = state;
        completed
    }

    /// Commits what was processed so far with `state`'s changelog records and waits for it,
    /// then writes `state` to `store` with its checkpoints and clears it. Without records
    /// processed, does nothing. The commit in flight must be settled first. On an error the
    /// transaction is aborted (or the producer is finished): see [`CommitError`].
    pub fn commit<C: ConsumerContext>(
        &mut self,
        consumer: &impl Consumer<C>,
        state: &mut StateBatch,
        store: &Store,
    ) -> Result<Option<Committed>, CommitError> {
        self.start(consumer, state)?;
        self.settle(store)
    }

    /// Ends a commit: on success writes `state` to the store with the checkpoints and counts
    /// its verdicts; on an error aborts the transaction.
    fn completed(
        &mut self,
        result: Result<BTreeMap<i32, i64>, CommitError>,
        state: &mut StateBatch,
        offsets: BTreeMap<(String, i32), i64>,
        decisions: Vec<(Decision, i64)>,
        started: Instant,
        store: &Store,
    ) -> Result<Option<Committed>, CommitError> {
        match result {
            Ok(checkpoints) => {
                self.in_tx = false;
                CrashAt::check(self.crash.as_deref(), "before-store", self.commits);
                store.commit(state, &checkpoints, crate::pipeline::now_ms())?;
                count_verdicts(decisions, crate::pipeline::now_ms());
                metrics::histogram!(telemetry::COMMIT_DURATION)
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!(telemetry::COMMITS, "result" => "committed").increment(1);
                Ok(Some(Committed { offsets }))
            }
            Err(e) => {
                if matches!(e, CommitError::Aborted(_) | CommitError::Permanent(_)) {
                    self.abort();
                }
                Err(e)
            }
        }
    }

    /// Drops what was processed and not committed, aborting the transaction if one is open
    /// (nothing of it becomes visible); a commit in flight is waited for and dropped too
    /// (callers settle it first, to keep it if it succeeded). The caller drops its
    /// uncommitted state and rewinds. An abort librdkafka cannot finish now (the broker is
    /// away) is resumed before the next transaction begins.
    pub fn abort(&mut self) {
        if let Some(f) = self.in_flight.take() {
            self.in_tx |= f.work.join().map_or(true, |done| done.in_tx);
        }
        if self.open || self.in_tx {
            metrics::counter!(telemetry::COMMITS, "result" => "aborted").increment(1);
        }
        if self.in_tx {
            self.aborting = true;
        }
        self.open = false;
        self.in_tx = false;
        self.offsets.clear();
        self.decisions.clear();
        self.held.clear();
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
                    let failed = classify(e, &self.tx, self.direct.as_deref());
                    if matches!(failed, CommitError::Fatal(_)) || Instant::now() >= deadline {
                        return Err(failed);
                    }
                }
            }
        }
    }
}

/// The Kafka part of a commit, after the batches' records: `state`'s changelog records, the
/// at-least-once records of the generation acknowledged (`direct`), the input `offsets`
/// with the consumer's `group` metadata, the commit. Returns the next changelog offset per
/// partition written (the store's checkpoints).
fn finish(
    tx: &Sink,
    direct: Option<(&Sink, usize)>,
    state: &StateBatch,
    offsets: &BTreeMap<(String, i32), i64>,
    group: Option<ConsumerGroupMetadata>,
    crash: Option<&CrashAt>,
    commit: u64,
) -> Result<BTreeMap<i32, i64>, CommitError> {
    let failed = |e| classify(e, tx, direct.map(|(d, _)| d));
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
        tx.send(r).map_err(failed)?;
    }
    if let Some((direct, generation)) = direct {
        // At-least-once: no offset is committed before its verdicts are acknowledged.
        direct
            .wait_acknowledged(generation, CALL_TIMEOUT)
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
    CrashAt::check(crash, "before-offsets", commit);
    let t1 = Instant::now();
    if !offsets.is_empty() {
        let mut tpl = TopicPartitionList::with_capacity(offsets.len());
        for ((topic, p), next) in offsets {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*next))
                .map_err(|e| CommitError::Aborted(e.to_string()))?;
        }
        let group = group.ok_or_else(|| {
            CommitError::Aborted("the consumer has no group metadata (not in the group)".into())
        })?;
        tx.producer()
            .send_offsets_to_transaction(&tpl, &group, CALL_TIMEOUT)
            .map_err(failed)?;
    }
    CrashAt::check(crash, "before-commit", commit);
    let t2 = Instant::now();
    // Everything acknowledged first, so that the commit's own flush returns at once.
    tx.flush(CALL_TIMEOUT).map_err(failed)?;
    let mut attempts = 0;
    loop {
        match tx.producer().commit_transaction(CALL_TIMEOUT) {
            Ok(()) => break,
            Err(KafkaError::Transaction(e)) if e.is_retriable() && attempts < 5 => {
                attempts += 1;
                tracing::warn!(error = %e, "Commit not confirmed yet; retrying.");
            }
            Err(e) => return Err(failed(e)),
        }
    }
    tracing::debug!(
        changelog,
        changelog_ms = (t1 - t0).as_secs_f64() * 1e3,
        offsets_ms = (t2 - t1).as_secs_f64() * 1e3,
        commit_ms = t2.elapsed().as_secs_f64() * 1e3,
        "Committed."
    );
    let d = tx.take_deliveries();
    // The next changelog record to read after each partition's last one of this
    // transaction (its commit marker comes next, which readers step over).
    Ok(d.changelog.into_iter().map(|(p, o)| (p, o + 1)).collect())
}

/// What a producer error means for the commit: a permanent produce failure seen by either
/// producer, a fatal producer, or an abort to retry.
fn classify(e: KafkaError, tx: &Sink, direct: Option<&Sink>) -> CommitError {
    let permanent = tx
        .permanent_failure()
        .or_else(|| direct.and_then(Sink::permanent_failure));
    if let Some(why) = permanent {
        return CommitError::Permanent(why);
    }
    let fatal = match &e {
        KafkaError::Transaction(t) => t.is_fatal(),
        _ => false,
    };
    if fatal || tx.producer().client().fatal_error().is_some() {
        CommitError::Fatal(e.to_string())
    } else {
        CommitError::Aborted(e.to_string())
    }
}

/// Counts a commit's verdicts by decision, and their latency from event to commit.
fn count_verdicts(decisions: Vec<(Decision, i64)>, committed_ms: i64) {
    let mut counts = [0u64; Decision::ALL.len()];
    let latency = metrics::histogram!(telemetry::END_TO_END_LATENCY);
    for (decision, event_time) in decisions {
        counts[decision as usize] += 1;
        latency.record((committed_ms - event_time).max(0) as f64 / 1000.0);
    }
    for (d, n) in Decision::ALL.iter().zip(counts) {
        if n > 0 {
            metrics::counter!(telemetry::VERDICTS, "decision" => d.as_str()).increment(n);
        }
    }
}
