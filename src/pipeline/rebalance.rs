//! Partitions moving in and out: the consumer's rebalance callbacks, and the restore of an
//! assigned partition's state from the changelog.
//!
//! On revoke, the open transaction is committed first (Kafka Streams commits in
//! `onPartitionsRevoked` too: the offsets are still this member's to commit), then what is
//! buffered or uncommitted for the revoked partitions is dropped: the next owner restores
//! their state from the changelog.
//!
//! On assign, the partition's inputs are paused and a restore is planned; the pipeline's
//! loop carries it out in bounded steps between polls, so the instance stays in the group
//! and goes on with its other partitions meanwhile:
//! 1. the committed input offsets are fetched. Under `read_committed` the broker answers only
//!    once no transaction with offsets for them is open (KIP-447), so a previous owner's
//!    last transaction is committed or aborted by then;
//! 2. the end of the changelog partition is read (its last stable offset);
//! 3. the store's checkpoint decides where to start: at the checkpoint, or, when the state
//!    cannot be trusted (no checkpoint, a checkpoint past the changelog's end, or one older
//!    than a compacted changelog keeps its tombstones), at the changelog's start after
//!    wiping the partition's state (logged);
//! 4. records are applied in chunks, each with its checkpoint, until the consumer's position
//!    reaches the end; then the inputs resume.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use super::Core;
use crate::config::Settings;
use crate::state::Store;
use crate::telemetry::{self, ASSIGNED_PARTITIONS, RESTORED_RECORDS, RESTORE_REMAINING};

/// Changelog records applied per RocksDB write (and read per loop turn) while restoring.
const RESTORE_CHUNK: usize = 5_000;

/// A checkpoint older than this may have missed tombstones a compacted changelog has since
/// dropped (their `delete.retention.ms`, a day by default): such state is rebuilt.
const CHECKPOINT_TRUSTED_MS: i64 = 12 * 3_600_000;

/// A changelog record's key and value (`None`: a tombstone).
type ChangelogRecord = (Vec<u8>, Option<Vec<u8>>);

/// The group consumer's callbacks: they run inside its `poll`, on the pipeline's thread.
pub struct GroupContext {
    pub core: Arc<Mutex<Core>>,
}

pub type GroupConsumer = BaseConsumer<GroupContext>;

impl ClientContext for GroupContext {
    /// librdkafka statistics (every `statistics.interval.ms`): exports the lag of each
    /// assigned partition.
    fn stats(&self, statistics: Statistics) {
        crate::source::export_lag(&statistics);
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions: BTreeSet<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(partitions = ?partitions, "Partitions revoked.");
            let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
            core.on_revoke(consumer, &partitions);
            for e in tpl.elements() {
                metrics::gauge!(telemetry::CONSUMER_LAG, "topic" => e.topic().to_string(), "partition" => e.partition().to_string())
                    .set(0.0);
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions: BTreeSet<i32> =
                    tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(partitions = ?partitions, "Partitions assigned.");
                let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
                core.on_assign(consumer, &partitions);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "Rebalance failed."),
            Rebalance::Revoke(_) => {}
        }
        // Of every worker of the process.
        let assigned = {
            let core = self.core.lock().unwrap_or_else(|e| e.into_inner());
            core.readiness.assigned_total()
        };
        metrics::gauge!(ASSIGNED_PARTITIONS).set(assigned as f64);
    }
}

/// Restores in progress, and the consumer that reads the changelog for them.
pub struct Restorer {
    consumer: BaseConsumer,
    changelog: String,
    plans: BTreeMap<i32, Plan>,
}

#[derive(Debug)]
enum Plan {
    /// Assigned; committed offsets and the changelog's end not known yet.
    Pending,
    /// Reading the changelog up to `end` (`assigned`: the restore consumer reads it).
    Reading {
        end: i64,
        started: Instant,
        applied: u64,
        assigned: bool,
    },
}

impl Restorer {
    pub fn new(settings: &Settings) -> anyhow::Result<Restorer> {
        let mut config = crate::source::side_client_config(settings, "restore")?;
        // Prefetch at most 16 MiB of changelog, in fetches of at most 8 MiB (librdkafka's
        // defaults: 64 MiB a partition, 50 MiB a fetch): with the chunks and RocksDB's
        // memtables, what bounds a restore's memory.
        config
            .set("enable.partition.eof", "false")
            .set("queued.max.messages.kbytes", "16384")
            .set("fetch.max.bytes", "8388608")
            .set("max.partition.fetch.bytes", "4194304");
        Ok(Restorer {
            consumer: config
                .create()
                .map_err(|e| anyhow::anyhow!("cannot create the restore consumer: {e}"))?,
            changelog: settings.changelog_topic(),
            plans: BTreeMap::new(),
        })
    }

    pub fn restoring(&self) -> usize {
        self.plans.len()
    }

    pub fn is_restoring(&self, partition: i32) -> bool {
        self.plans.contains_key(&partition)
    }

    fn plan(&mut self, partition: i32) {
        self.plans.insert(partition, Plan::Pending);
        metrics::gauge!(RESTORE_REMAINING, "partition" => partition.to_string()).set(0.0);
    }

    fn cancel(&mut self, partition: i32) {
        if let Some(Plan::Reading { assigned: true, .. }) = self.plans.remove(&partition) {
            self.unassign(partition);
        }
    }

    fn unassign(&self, partition: i32) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.changelog, partition);
        if let Err(e) = self.consumer.incremental_unassign(&tpl) {
            tracing::warn!(partition, error = %e, "Cannot stop reading the changelog partition.");
        }
    }

    /// Where to start reading `partition`'s changelog, given the store and the changelog's
    /// `[low, end)`: the checkpoint, or the start after wiping state that cannot be trusted.
    fn start(&self, store: &Store, partition: i32, low: i64, end: i64) -> anyhow::Result<i64> {
        let now = super::now_ms();
        let distrust = match store.checkpoint(partition)? {
            Some(c) if c.next > end => Some(format!(
                "its checkpoint {} is past the changelog's end {end} (was the changelog recreated?)",
                c.next
            )),
            Some(c) if c.next < low => Some(format!(
                "its checkpoint {} is before the changelog's start {low}",
                c.next
            )),
            Some(c) if c.next < end && now - c.written_at_ms > CHECKPOINT_TRUSTED_MS => Some(
                format!(
                    "its checkpoint is {} h old, older than a compacted changelog keeps its tombstones",
                    (now - c.written_at_ms) / 3_600_000
                ),
            ),
            Some(c) => return Ok(c.next),
            None => None,
        };
        if let Some(why) = distrust {
            tracing::warn!(
                partition,
                reason = %why,
                "Local state of this partition cannot be trusted; wiping it and rebuilding it from the changelog."
            );
        }
        store.drop_partition(partition)?;
        Ok(low)
    }
}

impl Core {
    /// Revoked: commit what was processed, then forget the partitions.
    pub(super) fn on_revoke(
        &mut self,
        consumer: &BaseConsumer<GroupContext>,
        partitions: &BTreeSet<i32>,
    ) {
        if let Err(e) = self.commit(consumer, false) {
            tracing::warn!(error = %e, "Commit on revoke failed; the next owners process the partitions from the last commit.");
        }
        for &p in partitions {
            self.forget(p);
            self.restorer.cancel(p);
        }
        self.readiness.set_restoring(self.restorer.restoring());
    }

    /// Assigned: pause the inputs and plan the restore.
    pub(super) fn on_assign(
        &mut self,
        consumer: &BaseConsumer<GroupContext>,
        partitions: &BTreeSet<i32>,
    ) {
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            for t in self.inputs.iter().flatten() {
                tpl.add_partition(t, p);
            }
            self.assigned.insert(p);
            self.restorer.plan(p);
        }
        if let Err(e) = consumer.pause(&tpl) {
            tracing::warn!(error = %e, "Cannot pause assigned partitions until their state is restored.");
        }
        self.readiness.set_restoring(self.restorer.restoring());
        self.readiness.set_assigned(self.assigned.len());
    }

    /// One bounded step of the restores in progress. Errors are fatal (the store).
    pub(super) fn restore_step(&mut self, consumer: &Arc<GroupConsumer>) -> anyhow::Result<()> {
        if self.restorer.plans.is_empty() {
            return Ok(());
        }
        let pending: Vec<i32> = self
            .restorer
            .plans
            .iter()
            .filter(|(_, plan)| matches!(plan, Plan::Pending))
            .map(|(p, _)| *p)
            .collect();
        for p in pending {
            self.begin_restore(consumer, p)?;
        }
        self.read_changelog()?;
        let done: Vec<i32> = self
            .restorer
            .plans
            .iter()
            .filter_map(|(p, plan)| match plan {
                Plan::Reading { end, .. } => {
                    crate::source::position(&self.restorer.consumer, &self.restorer.changelog, *p)
                        .is_some_and(|pos| pos >= *end)
                        .then_some(*p)
                }
                Plan::Pending => None,
            })
            .collect();
        for p in done {
            self.finish_restore(consumer, p)?;
        }
        Ok(())
    }

    fn begin_restore(&mut self, consumer: &Arc<GroupConsumer>, p: i32) -> anyhow::Result<()> {
        // 1. Committed offsets: stable ones only (the broker waits for an open transaction).
        let mut tpl = TopicPartitionList::new();
        for t in self.inputs.iter().flatten() {
            tpl.add_partition(t, p);
        }
        let committed = match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(partition = p, error = %e, "Committed offsets not available yet; retrying.");
                return Ok(());
            }
        };
        for (i, t) in self.inputs.clone().iter().enumerate() {
            let Some(t) = t else { continue };
            let at = match committed.find_partition(t, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Some(o),
                _ => consumer
                    .fetch_watermarks(t, p, Duration::from_secs(10))
                    .ok()
                    .map(|(low, _)| low),
            };
            if let Some(o) = at {
                self.committed.insert((i, p), o);
                self.next_offset.insert((i, p), o);
            }
        }
        // 2. The changelog's end as a read_committed reader sees it.
        let changelog = self.restorer.changelog.clone();
        let (low, end) = match self.restorer.consumer.fetch_watermarks(
            &changelog,
            p,
            Duration::from_secs(10),
        ) {
            Ok(w) => w,
            Err(e) => {
                tracing::info!(partition = p, error = %e, "End of the changelog not known yet; retrying.");
                return Ok(());
            }
        };
        // 3. Where to start.
        let start = self.restorer.start(&self.store, p, low, end)?;
        if start >= end {
            self.restorer.plans.insert(
                p,
                Plan::Reading {
                    end,
                    started: Instant::now(),
                    applied: 0,
                    assigned: false,
                },
            );
            return self.finish_restore(consumer, p);
        }
        tracing::info!(
            partition = p,
            from = start,
            to = end,
            records = end - start,
            "Restoring state from the changelog."
        );
        metrics::gauge!(RESTORE_REMAINING, "partition" => p.to_string()).set((end - start) as f64);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&changelog, p, Offset::Offset(start))?;
        self.restorer.consumer.incremental_assign(&tpl)?;
        self.restorer.plans.insert(
            p,
            Plan::Reading {
                end,
                started: Instant::now(),
                applied: 0,
                assigned: true,
            },
        );
        Ok(())
    }

    /// Reads at most a chunk of changelog records and applies them, a write per partition.
    fn read_changelog(&mut self) -> anyhow::Result<()> {
        if !self
            .restorer
            .plans
            .values()
            .any(|p| matches!(p, Plan::Reading { .. }))
        {
            return Ok(());
        }
        // Per partition: the records read, and the offset after the last one.
        let mut chunk: BTreeMap<i32, (Vec<ChangelogRecord>, i64)> = BTreeMap::new();
        let mut n = 0;
        let deadline = Instant::now() + Duration::from_millis(20);
        while n < RESTORE_CHUNK {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = match self.restorer.consumer.poll(left) {
                Some(Ok(m)) => m,
                // librdkafka reports broker trouble as events and retries on its own.
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "Restore consumer error; retrying.");
                    break;
                }
                None => break,
            };
            let Some(k) = m.key() else { continue };
            let e = chunk.entry(m.partition()).or_default();
            e.0.push((k.to_vec(), m.payload().map(<[u8]>::to_vec)));
            e.1 = m.offset() + 1;
            n += 1;
        }
        let now = super::now_ms();
        for (p, (records, next)) in chunk {
            self.store.restore(p, &records, next, now)?;
            metrics::counter!(RESTORED_RECORDS).increment(records.len() as u64);
            if let Some(Plan::Reading { end, applied, .. }) = self.restorer.plans.get_mut(&p) {
                *applied += records.len() as u64;
                metrics::gauge!(RESTORE_REMAINING, "partition" => p.to_string())
                    .set((*end - next).max(0) as f64);
            }
        }
        Ok(())
    }

    fn finish_restore(&mut self, consumer: &Arc<GroupConsumer>, p: i32) -> anyhow::Result<()> {
        if let Some(Plan::Reading {
            started,
            applied,
            assigned,
            ..
        }) = self.restorer.plans.remove(&p)
        {
            if assigned {
                self.restorer.unassign(p);
            }
            if applied > 0 {
                tracing::info!(
                    partition = p,
                    records = applied,
                    seconds = started.elapsed().as_secs_f64(),
                    "State restored."
                );
            }
        }
        metrics::gauge!(RESTORE_REMAINING, "partition" => p.to_string()).set(0.0);
        if let Some(t) = self.store.stream_time(p)? {
            self.stream_time.insert(p, t);
        }
        // Its own queues, then from the committed offsets: anything fetched before the pause
        // is dropped.
        let mut tpl = TopicPartitionList::new();
        for (i, t) in self.inputs.iter().enumerate() {
            let Some(t) = t else { continue };
            if !self.queues.split(consumer, i, t, p) {
                tracing::warn!(topic = %t, partition = p, "No queue of its own for this partition; reading it through the consumer's.");
            }
            let at = match self.committed.get(&(i, p)) {
                Some(&o) => Offset::Offset(o),
                None => Offset::Beginning,
            };
            if let Err(e) = consumer.seek(t, p, at, Duration::from_secs(10)) {
                tracing::debug!(topic = %t, partition = p, error = %e, "Seek before resuming.");
            }
            if !self.held.contains(&(i, p)) {
                tpl.add_partition(t, p);
            }
        }
        consumer.resume(&tpl)?;
        self.readiness.set_restoring(self.restorer.restoring());
        Ok(())
    }
}

/// The state the changelog holds, as a `read_committed` reader sees it: per partition, the
/// latest value of every key (tombstones remove), written to `out` as `partition<TAB>key
/// hex<TAB>value hex` lines in key order. Two runs over the same input that end with equal
/// exports hold equal state (`fraudstream state-export`, the chaos runs).
pub fn export(settings: &Settings, out: &mut impl std::io::Write) -> anyhow::Result<usize> {
    let restorer = Restorer::new(settings)?;
    let consumer = &restorer.consumer;
    let changelog = &restorer.changelog;
    let metadata = consumer
        .fetch_metadata(Some(changelog), Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("cannot read `{changelog}`: {e}"))?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len() as i32)
        .filter(|n| *n > 0)
        .ok_or_else(|| anyhow::anyhow!("no changelog topic `{changelog}`"))?;
    let mut lines = 0;
    for partition in 0..partitions {
        let (low, end) =
            consumer.fetch_watermarks(changelog, partition, Duration::from_secs(10))?;
        let mut state: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        if low < end {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(changelog, partition, Offset::Offset(low))?;
            consumer.assign(&tpl)?;
            while crate::source::position(consumer, changelog, partition).is_none_or(|p| p < end) {
                let Some(r) = consumer.poll(Duration::from_millis(500)) else {
                    continue;
                };
                let m = r?;
                let Some(k) = m.key() else { continue };
                match m.payload() {
                    Some(v) => state.insert(k.to_vec(), v.to_vec()),
                    None => state.remove(k),
                };
            }
            consumer.unassign()?;
        }
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        for (k, v) in &state {
            writeln!(out, "{partition}\t{}\t{}", hex(k), hex(v))?;
            lines += 1;
        }
    }
    Ok(lines)
}
