//! The producer for verdicts and dead letters.
//!
//! [`Sink::deliver`] returns only once every record of a batch is acknowledged by the
//! broker, which is what lets the source store the batch's offsets. A record that fails
//! (after librdkafka's own retries) is sent again with backoff; nothing is dropped. If
//! shutdown is requested while records are still undelivered, the batch fails and its
//! offsets are not stored, so a restart processes it again.

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
    /// Index into [`Sink`]'s topic names (verdicts or dead letters).
    pub topic: Topic,
    pub key: Option<Vec<u8>>,
    /// `None` for a tombstone (a dead-lettered null value stays null).
    pub payload: Option<Vec<u8>>,
    pub headers: Option<OwnedHeaders>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Verdicts,
    DeadLetter,
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
}

/// The producer's librdkafka configuration: defaults, then `[kafka]`, then `[kafka-producer]`.
pub fn client_config(settings: &Settings) -> anyhow::Result<ClientConfig> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &settings.brokers)
        .set("acks", "all")
        .set("linger.ms", "2");
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
        })
    }

    fn topic(&self, t: Topic) -> &str {
        match t {
            Topic::Verdicts => &self.verdicts,
            Topic::DeadLetter => &self.dead_letter,
        }
    }

    /// Produces every record and waits for all acknowledgements, re-sending failures with
    /// backoff until they succeed or `shutdown` is cancelled.
    pub async fn deliver(
        &self,
        records: &[OutRecord],
        shutdown: &CancellationToken,
    ) -> Result<(), SinkError> {
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
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => {
                        tracing::warn!(error = %e, "Delivery failed; will retry.");
                        failed.push(i);
                    }
                    Err(_) => failed.push(i),
                }
            }
            if failed.is_empty() {
                return Ok(());
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
