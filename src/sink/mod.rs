//! The producer for verdicts and dead letters.
//!
//! [`Sink::deliver`] returns only once every record of a batch is acknowledged by the
//! broker, which is what lets the source store the batch's offsets. A record that fails
//! (after librdkafka's own retries) is sent again with backoff; nothing is dropped. If
//! shutdown is requested while records are still undelivered, the batch fails and its
//! offsets are not stored, so a restart processes it again.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::telemetry::PRODUCE_RETRIES;

/// One message to produce.
#[derive(Debug, Clone)]
pub struct OutRecord {
    /// Which of [`Sink`]'s topics.
    pub topic: Topic,
    /// An explicit partition (changelog records go to their input partition); `None`: by key.
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    /// `None` for a tombstone (a dead-lettered null value stays null).
    pub payload: Option<Vec<u8>>,
    pub headers: Option<OwnedHeaders>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Verdicts,
    DeadLetter,
    Changelog,
    Repartition,
}

/// Why a batch could not be delivered. `Undelivered` is retryable by a restart: the
/// batch's offsets were not stored.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{0} records of the batch were not acknowledged before shutdown")]
    Undelivered(usize),
}

pub struct Sink {
    producer: FutureProducer,
    verdicts: String,
    dead_letter: String,
    changelog: String,
    repartition: String,
}

/// The producer's librdkafka configuration: defaults, then `[kafka]`, then `[kafka-producer]`.
pub fn client_config(settings: &Settings) -> anyhow::Result<ClientConfig> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &settings.brokers)
        .set("acks", "all")
        .set("linger.ms", "2")
        // Re-keyed records must land where the Java client (and kafka-producer-perf-test)
        // would put the same key: murmur2, not librdkafka's default CRC32.
        .set("partitioner", "murmur2_random");
    for (k, v) in settings.kafka.iter().chain(&settings.kafka_producer) {
        c.set(k, v.resolve(k)?);
    }
    Ok(c)
}

impl Sink {
    pub fn new(settings: &Settings) -> anyhow::Result<Sink> {
        let producer: FutureProducer = client_config(settings)?
            .create()
            .map_err(|e| anyhow::anyhow!("cannot create the Kafka producer: {e}"))?;
        Ok(Sink {
            producer,
            verdicts: settings.topics.verdicts.clone(),
            dead_letter: settings.topics.dead_letter.clone(),
            changelog: settings.changelog_topic(),
            repartition: settings.repartition_topic(),
        })
    }

    fn topic(&self, t: Topic) -> &str {
        match t {
            Topic::Verdicts => &self.verdicts,
            Topic::DeadLetter => &self.dead_letter,
            Topic::Changelog => &self.changelog,
            Topic::Repartition => &self.repartition,
        }
    }

    /// Produces every record and waits for all acknowledgements, re-sending failures with
    /// backoff until they succeed or `shutdown` is cancelled. Returns the offset of the last
    /// changelog record acknowledged per partition.
    pub async fn deliver(
        &self,
        records: &[OutRecord],
        shutdown: &CancellationToken,
    ) -> Result<BTreeMap<i32, i64>, SinkError> {
        let mut changelog = BTreeMap::new();
        let mut pending: Vec<usize> = (0..records.len()).collect();
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut in_flight = Vec::with_capacity(pending.len());
            let mut failed = Vec::new();
            for &i in &pending {
                let r = &records[i];
                let mut record = FutureRecord::<[u8], [u8]>::to(self.topic(r.topic));
                if let Some(p) = &r.payload {
                    record = record.payload(p);
                }
                if let Some(k) = &r.key {
                    record = record.key(k);
                }
                if let Some(h) = &r.headers {
                    record = record.headers(h.clone());
                }
                if let Some(p) = r.partition {
                    record = record.partition(p);
                }
                loop {
                    match self.producer.send_result(record) {
                        Ok(f) => {
                            in_flight.push((i, f));
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            // The local queue is full: let librdkafka drain it.
                            record = back;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        Err((e, _)) => {
                            tracing::warn!(error = %e, "Produce failed; will retry.");
                            failed.push(i);
                            break;
                        }
                    }
                }
            }
            for (i, f) in in_flight {
                match f.await {
                    Ok(Ok(d)) => {
                        if records[i].topic == Topic::Changelog {
                            let e = changelog.entry(d.partition).or_insert(d.offset);
                            *e = (*e).max(d.offset);
                        }
                    }
                    Ok(Err((e, _))) => {
                        tracing::warn!(error = %e, "Delivery failed; will retry.");
                        failed.push(i);
                    }
                    Err(_) => failed.push(i),
                }
            }
            if failed.is_empty() {
                return Ok(changelog);
            }
            metrics::counter!(PRODUCE_RETRIES).increment(failed.len() as u64);
            tokio::select! {
                _ = shutdown.cancelled() => return Err(SinkError::Undelivered(failed.len())),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            pending = failed;
        }
    }

    /// Waits for everything queued to be delivered (shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}

/// The value of a message header, as text.
pub fn header<M: rdkafka::Message>(m: &M, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    let h = m.headers()?;
    h.iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}
