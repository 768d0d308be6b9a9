//! The global-table reader: a consumer outside the group that reads every partition of the
//! labels and blocklist topics from the beginning, on its own thread, into
//! [`GlobalTables`]. [`GlobalReader::wait_loaded`] returns once everything that was on the
//! topics at start has been read; the reader then keeps the tables current.
//!
//! A record that does not decode is logged and counted as a dead letter and skipped: these
//! topics are written by operators and back-office tools, and a bad entry must not stop
//! scoring (it is still on the topic to fix and re-send).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::{InputFormat, Settings};
use crate::decode::{decode_block_entry, decode_label};
use crate::state::global::GlobalTables;
use crate::state::Hasher;
use crate::telemetry::{DEAD_LETTERS, GLOBAL_ENTRIES, GLOBAL_REFUSED};

pub struct GlobalReader {
    pub tables: Arc<RwLock<GlobalTables>>,
    loaded: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GlobalReader {
    /// Starts reading. Topics named "" are not read. Fails if a named topic does not exist.
    pub fn start(
        settings: &Settings,
        hasher: Hasher,
        shutdown: CancellationToken,
    ) -> anyhow::Result<GlobalReader> {
        let tables = Arc::new(RwLock::new(GlobalTables::with_limit(
            settings.state.max_global_entries,
        )));
        let loaded = Arc::new(AtomicBool::new(false));
        let labels = settings.topics.labels.clone();
        let blocklist = settings.topics.blocklist.clone();
        let consumer: BaseConsumer = super::side_client_config(settings, "global")?
            .create()
            .map_err(|e| anyhow::anyhow!("cannot create the global-table consumer: {e}"))?;
        let mut tpl = TopicPartitionList::new();
        // Offset to reach per (topic, partition) before the tables count as loaded.
        let mut targets: HashMap<(String, i32), i64> = HashMap::new();
        for topic in [&labels, &blocklist] {
            if topic.is_empty() {
                continue;
            }
            let md = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .map_err(|e| anyhow::anyhow!("cannot read metadata of `{topic}`: {e}"))?;
            let t = md
                .topics()
                .iter()
                .find(|t| t.name() == topic.as_str())
                .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "topic `{topic}` does not exist; create it first (scripts/broker topics), or set it to \"\" to run without it"
                    )
                })?;
            for p in t.partitions() {
                let (low, high) = consumer
                    .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                    .map_err(|e| anyhow::anyhow!("cannot read the end of `{topic}`: {e}"))?;
                if high > low {
                    targets.insert((topic.clone(), p.id()), high);
                }
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl)?;
        let format = settings.input.format;
        let max_bytes = settings.input.max_message_bytes;
        let t = tables.clone();
        let l = loaded.clone();
        let thread = std::thread::Builder::new()
            .name("global-tables".into())
            .spawn(move || {
                let mut ctx = Reading {
                    hasher,
                    tables: t,
                    loaded: l,
                    targets,
                    labels,
                    format,
                    max_bytes,
                    refused: 0,
                };
                ctx.run(&consumer, &shutdown);
            })?;
        Ok(GlobalReader {
            tables,
            loaded,
            thread: Some(thread),
        })
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Waits until the tables hold everything that was on the topics at start.
    pub async fn wait_loaded(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        while !self.is_loaded() {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                anyhow::bail!("the global-table reader stopped before the tables were loaded");
            }
            tokio::select! {
                _ = shutdown.cancelled() => anyhow::bail!("stopped before the global tables were loaded"),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        Ok(())
    }
}

impl Drop for GlobalReader {
    fn drop(&mut self) {
        // The thread stops with the shutdown token; do not wait for it here.
        self.thread.take();
    }
}

struct Reading {
    hasher: Hasher,
    tables: Arc<RwLock<GlobalTables>>,
    loaded: Arc<AtomicBool>,
    targets: HashMap<(String, i32), i64>,
    labels: String,
    format: InputFormat,
    max_bytes: usize,
    /// Records refused by a full table so far.
    refused: u64,
}

impl Reading {
    fn run(&mut self, consumer: &BaseConsumer, shutdown: &CancellationToken) {
        self.check_loaded();
        while !shutdown.is_cancelled() {
            let Some(r) = consumer.poll(Duration::from_millis(100)) else {
                // A poll that returned nothing may still have stepped over a final marker.
                if !self.targets.is_empty() {
                    self.reached(consumer);
                }
                continue;
            };
            let m = match r {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "Global-table consumer error.");
                    continue;
                }
            };
            let topic = m.topic().to_string();
            self.apply(&topic, m.key(), m.payload(), m.offset());
            if !self.targets.is_empty() {
                self.reached(consumer);
            }
        }
    }

    /// Drops the targets the consumer's position has reached. The position, not the offset of
    /// the last record read: a table written by a transactional producer ends with a commit
    /// marker that is never delivered.
    fn reached(&mut self, consumer: &BaseConsumer) {
        let before = self.targets.len();
        self.targets.retain(|(topic, partition), target| {
            super::position(consumer, topic, *partition).is_none_or(|pos| pos < *target)
        });
        if self.targets.len() < before {
            self.check_loaded();
        }
    }

    fn check_loaded(&mut self) {
        if self.targets.is_empty() && !self.loaded.load(Ordering::Acquire) {
            let (labels, blocked) = self.tables.read().map(|t| t.sizes()).unwrap_or((0, 0));
            tracing::info!(
                labelled_entities = labels,
                blocked_entities = blocked,
                "Global tables loaded."
            );
            self.loaded.store(true, Ordering::Release);
        }
    }

    fn apply(&mut self, topic: &str, key: Option<&[u8]>, payload: Option<&[u8]>, offset: i64) {
        use crate::decode::{DecodeError, ErrorKind};
        use crate::state::global::GlobalError;
        let Ok(mut tables) = self.tables.write() else {
            return;
        };
        let mut full = None;
        let result = if topic == self.labels {
            decode_label(self.format, payload, self.max_bytes).map(|l| {
                full = tables.apply_label(&self.hasher, &l).err();
            })
        } else {
            let entry = match payload {
                None => Ok(None),
                Some(bytes) => decode_block_entry(self.format, bytes, self.max_bytes).map(Some),
            };
            entry.and_then(|entry| {
                let key = key.ok_or_else(|| {
                    DecodeError::new(
                        ErrorKind::MissingField,
                        "a blocklist record needs a key (`email:…`, `card:…`, …)",
                    )
                })?;
                match tables.apply_block(&self.hasher, key, entry.as_ref()) {
                    Ok(()) => Ok(()),
                    Err(GlobalError::Full(f)) => {
                        full = Some(f);
                        Ok(())
                    }
                    Err(GlobalError::BadKey(e)) => {
                        Err(DecodeError::new(ErrorKind::InvalidValue, e.to_string()))
                    }
                }
            })
        };
        let (labels, blocked) = tables.sizes();
        drop(tables);
        metrics::gauge!(GLOBAL_ENTRIES, "table" => "labels").set(labels as f64);
        metrics::gauge!(GLOBAL_ENTRIES, "table" => "blocklist").set(blocked as f64);
        if let Err(e) = result {
            tracing::warn!(topic, offset, kind = e.kind.as_str(), error = %e.message, "Global-table record skipped.");
            metrics::counter!(DEAD_LETTERS, "kind" => e.kind.as_str()).increment(1);
        }
        if let Some(f) = full {
            self.refused += 1;
            metrics::counter!(GLOBAL_REFUSED, "table" => f.0).increment(1);
            // The first refusal, then one in 10,000: a full table is one problem, not a
            // line per record.
            if self.refused % 10_000 == 1 {
                tracing::warn!(topic, offset, refused = self.refused, error = %f, "Global table full: raise state.max-global-entries, or compact or expire the topic.");
            }
        }
    }
}
