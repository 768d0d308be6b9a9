//! The Kafka consumer: group membership, rebalance logging, offset storage.
//!
//! Offsets follow rust-rdkafka's at-least-once pattern: `enable.auto.offset.store=false`,
//! and an offset is stored only once every verdict and dead letter of its batch has been
//! acknowledged by the broker; librdkafka's auto-commit then commits stored offsets only,
//! and shutdown commits them synchronously. The limit of the guarantee: a crash between
//! acknowledgement and commit re-delivers those messages, so a verdict can be produced
//! twice (identical but for `scored_at`).

pub mod global;
pub mod restore;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::telemetry::{Readiness, ASSIGNED_PARTITIONS, CONSUMER_LAG};

/// Consumer callbacks: logs rebalances and commit failures, and keeps readiness current.
pub struct SourceContext {
    /// Set while at least one partition is assigned (served on `/readyz`).
    readiness: Readiness,
    /// Partitions assigned and revoked since the pipeline last looked: it restores the
    /// first and drops what it buffered of the second.
    changes: Arc<Mutex<Changes>>,
}

/// Assignment changes, by partition number (the inputs are co-partitioned, so partition p
/// of every input moves together).
#[derive(Default, Debug)]
pub struct Changes {
    pub assigned: BTreeSet<i32>,
    pub revoked: BTreeSet<i32>,
}

impl ClientContext for SourceContext {
    /// librdkafka statistics (every `statistics.interval.ms`): exports the lag of each
    /// assigned partition.
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // Partition -1 is librdkafka's internal "unassigned" partition; lag -1 means
                // not assigned here or not known yet.
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                // Lag behind what is acknowledged (stored), falling back to behind what is
                // fetched when nothing is stored yet.
                let lag = if p.consumer_lag_stored >= 0 {
                    p.consumer_lag_stored
                } else {
                    p.consumer_lag
                };
                metrics::gauge!(CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string())
                    .set(lag as f64);
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            tracing::info!(partitions = %describe(tpl), "Partitions revoked.");
            if let Ok(mut c) = self.changes.lock() {
                for e in tpl.elements() {
                    c.assigned.remove(&e.partition());
                    c.revoked.insert(e.partition());
                }
            }
            // Their lag is the new owner's to report; summed over instances it stays right.
            for e in tpl.elements() {
                metrics::gauge!(CONSUMER_LAG, "topic" => e.topic().to_string(), "partition" => e.partition().to_string())
                    .set(0.0);
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = %describe(tpl), "Partitions assigned.");
                if let Ok(mut c) = self.changes.lock() {
                    c.assigned
                        .extend(tpl.elements().iter().map(|e| e.partition()));
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "Rebalance failed."),
            Rebalance::Revoke(_) => {}
        }
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        metrics::gauge!(ASSIGNED_PARTITIONS).set(assigned as f64);
        self.readiness.set(assigned > 0);
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            // Not data loss: the offsets are committed again with the next commit, and at
            // worst messages are re-delivered.
            tracing::warn!(error = %e, offsets = %describe(offsets), "Offset commit failed.");
        }
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{}[{}]", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}

pub type Source = StreamConsumer<SourceContext>;

/// The consumer's librdkafka configuration: fraudstream's defaults, then `[kafka]`, then
/// `[kafka-consumer]`, then the settings fraudstream's guarantees depend on.
pub fn client_config(settings: &Settings) -> anyhow::Result<ClientConfig> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &settings.brokers)
        .set("group.id", &settings.group_id)
        .set("auto.offset.reset", "earliest")
        // Low fetch wait: verdict latency matters more than fetch request count, and some
        // brokers do not answer a waiting fetch early when data arrives.
        .set("fetch.wait.max.ms", "10")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        // Feeds fraudstream_consumer_lag_messages.
        .set("statistics.interval.ms", "5000")
        // Partition p of every input (transactions, navigation, repartition) must go to the
        // same instance: the range assignor does that for co-partitioned topics.
        .set("partition.assignment.strategy", "range");
    // queued.min.messages stays librdkafka's (100,000 per partition): a shallow prefetch
    // keeps one input's backlog from sitting in front of the other's in librdkafka's single
    // delivery queue (fewer merge waits under lag), but cost 4x the throughput here
    // (README, "Inputs and their order").
    for (k, v) in settings.kafka.iter().chain(&settings.kafka_consumer) {
        c.set(k, v.resolve(k)?);
    }
    c.set("enable.auto.offset.store", "false");
    Ok(c)
}

/// A consumer outside the group (global tables, restore): the group consumer's settings,
/// its own `group.id` (never committed to), and no statistics (the group consumer's lag is
/// the one exported; these would only be logged).
pub fn side_client_config(settings: &Settings, role: &str) -> anyhow::Result<ClientConfig> {
    let mut c = client_config(settings)?;
    c.set("group.id", format!("{}-{role}", settings.group_id))
        .set("enable.auto.commit", "false")
        .set("statistics.interval.ms", "0")
        // Tables and restores are not latency-critical to the 10 ms: at the end of a topic,
        // a fetch every 250 ms instead of every 10 ms spares a broker that does not wake a
        // waiting fetch (each idle 10 ms poll costs it CPU).
        .set("fetch.wait.max.ms", "250");
    Ok(c)
}

pub fn consumer(
    settings: &Settings,
    readiness: Readiness,
) -> anyhow::Result<(Source, Arc<Mutex<Changes>>)> {
    let changes = Arc::new(Mutex::new(Changes::default()));
    let consumer: Source = client_config(settings)?
        .create_with_context(SourceContext {
            readiness,
            changes: changes.clone(),
        })
        .map_err(|e| anyhow::anyhow!("cannot create the Kafka consumer: {e}"))?;
    Ok((consumer, changes))
}

/// The high watermark of a partition as of the consumer's last fetch response, without a
/// request to the broker (librdkafka's cache); `None` before the first fetch.
pub fn cached_high_watermark(consumer: &Source, topic: &str, partition: i32) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid for the consumer's lifetime, `topic` is a valid
    // NUL-terminated string for the call, and the out-pointers point to live locals.
    // rd_kafka_get_watermark_offsets only reads librdkafka's cached values.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

/// The partition count of each topic (`None` if it does not exist).
pub fn partition_counts(consumer: &Source, topics: &[&str]) -> anyhow::Result<Vec<Option<usize>>> {
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("cannot read topic metadata: {e}"))?;
    Ok(topics
        .iter()
        .map(|t| {
            md.topics()
                .iter()
                .find(|m| m.name() == *t && m.error().is_none() && !m.partitions().is_empty())
                .map(|m| m.partitions().len())
        })
        .collect())
}

/// Waits until the brokers answer, then checks that every topic exists. Retries with
/// backoff while the brokers are unreachable; a missing topic is fatal.
pub async fn check_topics(
    consumer: &Source,
    topics: &[&str],
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match consumer.fetch_metadata(None, Duration::from_secs(5)) {
            Ok(md) => {
                for t in topics {
                    let found = md.topics().iter().find(|m| m.name() == *t);
                    match found {
                        Some(m) if m.error().is_none() && !m.partitions().is_empty() => {}
                        _ => anyhow::bail!(
                            "topic `{t}` does not exist on {}; create it first (scripts/broker topics)",
                            md.orig_broker_name()
                        ),
                    }
                }
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "Brokers not reachable yet.");
                tokio::select! {
                    _ = shutdown.cancelled() => anyhow::bail!("stopped before the brokers answered"),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
