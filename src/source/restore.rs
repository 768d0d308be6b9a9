//! Restoring a partition's state from the changelog topic, and creating the internal topics.
//!
//! The store remembers, per partition, the offset of the last changelog record its state
//! includes. On assignment the changelog's end is compared with it: equal, nothing to do
//! (the common case of a restart on the same machine); behind, the missing tail is read and
//! applied; no local state, the partition is rebuilt from the changelog's start (compacted,
//! so only the latest value of each key is read).

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::Settings;
use crate::state::{Restored, Store};
use crate::telemetry::{RESTORED_RECORDS, RESTORE_REMAINING};

/// Records applied per RocksDB write during a restore.
const RESTORE_CHUNK: usize = 10_000;

pub struct Restorer {
    consumer: BaseConsumer,
    changelog: String,
}

impl Restorer {
    pub fn new(settings: &Settings) -> anyhow::Result<Restorer> {
        let mut config = super::side_client_config(settings, "restore")?;
        config.set("enable.partition.eof", "false");
        Ok(Restorer {
            consumer: config
                .create()
                .map_err(|e| anyhow::anyhow!("cannot create the restore consumer: {e}"))?,
            changelog: settings.changelog_topic(),
        })
    }

    /// Brings `partition`'s local state up to the changelog's last marker. `inputs` are the
    /// input topics whose applied offsets the partition's state carries.
    pub fn restore(
        &self,
        store: &Store,
        partition: i32,
        inputs: &[&str],
    ) -> anyhow::Result<Restored> {
        let started = Instant::now();
        let (low, high) = self
            .consumer
            .fetch_watermarks(&self.changelog, partition, Duration::from_secs(10))
            .map_err(|e| anyhow::anyhow!("cannot read the end of `{}`: {e}", self.changelog))?;
        let gauge = metrics::gauge!(RESTORE_REMAINING, "partition" => partition.to_string());
        gauge.set(0.0);
        let local = store.changelog_position(partition)?;
        let start = match local {
            Some(pos) if pos + 1 == high => return Ok(Restored::default()),
            Some(pos) if pos < high => (pos + 1).max(low),
            Some(pos) => {
                tracing::warn!(
                    partition,
                    local = pos,
                    changelog_end = high,
                    "Local state is ahead of the changelog (was the topic recreated?); rebuilding from the changelog."
                );
                store.drop_partition(partition, inputs)?;
                low
            }
            None => {
                // State written with the changelog off, or none: the changelog is the truth.
                store.drop_partition(partition, inputs)?;
                low
            }
        };
        if start >= high {
            gauge.set(0.0);
            return Ok(Restored::default());
        }
        let total = (high - start) as u64;
        tracing::info!(
            partition,
            from = start,
            to = high,
            records = total,
            "Restoring state from the changelog."
        );
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.changelog, partition, Offset::Offset(start))?;
        self.consumer.assign(&tpl)?;
        // Records since the last marker: applied when the next marker arrives, discarded
        // if none does (a batch whose output was not all acknowledged).
        let mut pending: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        let mut offsets: Vec<i64> = Vec::new();
        let mut read = 0u64;
        let mut last_log = Instant::now();
        let mut last = start - 1;
        while last + 1 < high {
            let Some(r) = self.consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let m =
                r.map_err(|e| anyhow::anyhow!("restore of partition {partition} failed: {e}"))?;
            last = m.offset();
            read += 1;
            let Some(k) = m.key() else { continue };
            let marker = k.first() == Some(&b'a');
            pending.push((k.to_vec(), m.payload().map(<[u8]>::to_vec)));
            offsets.push(last);
            if marker && (pending.len() >= RESTORE_CHUNK || last + 1 >= high) {
                store.restore(partition, &pending, last)?;
                metrics::counter!(RESTORED_RECORDS).increment(pending.len() as u64);
                pending.clear();
                offsets.clear();
            }
            gauge.set((high - 1 - last) as f64);
            if last_log.elapsed() > Duration::from_secs(5) {
                tracing::info!(
                    partition,
                    restored = read,
                    of = total,
                    "Restore in progress."
                );
                last_log = Instant::now();
            }
        }
        self.consumer.unassign()?;
        // Whatever is buffered ends with its last marker, if any: apply up to it.
        let cut = pending.iter().rposition(|(k, _)| k.first() == Some(&b'a'));
        let tail = match cut {
            Some(i) => {
                let tail = pending.split_off(i + 1);
                store.restore(partition, &pending, offsets[i])?;
                metrics::counter!(RESTORED_RECORDS).increment(pending.len() as u64);
                tail
            }
            None => pending,
        };
        let repair = Store::tail_keys(&tail);
        if !tail.is_empty() {
            tracing::info!(
                partition,
                records = tail.len(),
                "Changelog records after the last marker discarded (a batch cut short); their entities are re-written."
            );
        }
        gauge.set(0.0);
        tracing::info!(
            partition,
            records = read,
            seconds = started.elapsed().as_secs_f64(),
            "State restored."
        );
        Ok(Restored { repair })
    }
}

impl Restorer {
    /// The state the changelog holds: per partition, the latest value of every entity key up
    /// to the partition's last marker (what a restore would apply), markers left out. Written
    /// to `out` as `partition<TAB>key hex<TAB>value hex` lines in key order: two runs over
    /// the same input that end with equal exports hold equal state (`fraudstream
    /// state-export`, the chaos run).
    pub fn export(&self, out: &mut impl std::io::Write) -> anyhow::Result<usize> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(&self.changelog), Duration::from_secs(10))
            .map_err(|e| anyhow::anyhow!("cannot read `{}`: {e}", self.changelog))?;
        let partitions = metadata
            .topics()
            .first()
            .map(|t| t.partitions().len() as i32)
            .filter(|n| *n > 0)
            .ok_or_else(|| anyhow::anyhow!("no changelog topic `{}`", self.changelog))?;
        let mut lines = 0;
        for partition in 0..partitions {
            let (low, high) = self.consumer.fetch_watermarks(
                &self.changelog,
                partition,
                Duration::from_secs(10),
            )?;
            let mut state: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = Default::default();
            let mut pending: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
            if low < high {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&self.changelog, partition, Offset::Offset(low))?;
                self.consumer.assign(&tpl)?;
                let mut last = low - 1;
                while last + 1 < high {
                    let Some(r) = self.consumer.poll(Duration::from_millis(500)) else {
                        continue;
                    };
                    let m = r?;
                    last = m.offset();
                    let Some(k) = m.key() else { continue };
                    if k.first() == Some(&b'a') {
                        for (k, v) in pending.drain(..) {
                            match v {
                                Some(v) => state.insert(k, v),
                                None => state.remove(&k),
                            };
                        }
                    } else {
                        pending.push((k.to_vec(), m.payload().map(<[u8]>::to_vec)));
                    }
                }
                self.consumer.unassign()?;
            }
            let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
            for (k, v) in &state {
                writeln!(out, "{partition}\t{}\t{}", hex(k), hex(v))?;
                lines += 1;
            }
        }
        Ok(lines)
    }
}

/// Creates the internal topics that do not exist yet, with `partitions` each (the changelog
/// compacted). Existing ones are left alone; their partition count is checked by the caller.
pub async fn create_internal_topics(
    settings: &Settings,
    topics: &[(String, bool)],
    partitions: i32,
) -> anyhow::Result<()> {
    if topics.is_empty() {
        return Ok(());
    }
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", &settings.brokers);
    for (k, v) in &settings.kafka {
        config.set(k, v.resolve(k)?);
    }
    let admin: AdminClient<DefaultClientContext> = config
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create the admin client: {e}"))?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(name, compacted)| {
            let t = NewTopic::new(name, partitions, TopicReplication::Fixed(-1));
            if *compacted {
                t.set("cleanup.policy", "compact")
            } else {
                t
            }
        })
        .collect();
    for r in admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?
    {
        match r {
            Ok(name) => tracing::info!(topic = %name, partitions, "Internal topic created."),
            Err((name, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic = %name, "Internal topic exists.")
            }
            Err((name, e)) => anyhow::bail!(
                "cannot create the internal topic `{name}` ({e}); create it with {partitions} partitions (the changelog compacted) or give the scorer the right to"
            ),
        }
    }
    Ok(())
}
