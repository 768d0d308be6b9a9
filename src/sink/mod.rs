//! The producers of verdicts, dead letters, repartitioned records and changelog records.
//!
//! A [`Sink`] wraps a librdkafka producer whose delivery reports are served by the
//! pipeline's threads (one a batch, and all of them by a wait for acknowledgements, which
//! sleeps until the producer's queue has some): it remembers
//! the offset of the last changelog record acknowledged per partition (the checkpoint the
//! store is written with after a commit) and counts failed deliveries. The transaction
//! protocol around it (begin, offsets, commit, abort) is the pipeline's commit.
//!
//! Not a producer with a polling thread of its own (rdkafka's `ThreadedProducer`): a flush
//! (and so a commit) there waits in slices of 100 ms for reports the other thread takes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use crate::config::Settings;
use crate::source::{QueueLength, Wake};

/// One message to produce.
#[derive(Debug, Clone)]
pub struct OutRecord {
    /// Which of [`Sink`]'s topics.
    pub topic: Topic,
    /// An explicit partition (changelog records go to their input partition, forwards to
    /// their customer's); `None`: by key.
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    /// `None` for a tombstone (a dead-lettered null value stays null).
    pub payload: Option<Vec<u8>>,
    pub headers: Option<OwnedHeaders>,
    /// The record's timestamp (ms); `None`: the time it is produced.
    pub timestamp: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Verdicts,
    DeadLetter,
    Changelog,
    Repartition,
}

/// What the producer's thread learned from delivery reports since they were last taken.
#[derive(Debug, Default)]
pub struct Deliveries {
    /// Changelog partition → offset of the last record acknowledged.
    pub changelog: BTreeMap<i32, i64>,
    pub failed: u64,
    pub first_error: Option<KafkaError>,
    /// A failure that no retry can mend (see [`is_permanent`]): the topic and the error.
    pub permanent: Option<(String, KafkaError)>,
}

/// Whether a produce error will recur however often the record is sent again: the record is
/// too large for the producer or the topic, or the topic is gone or refused to this client.
/// Everything else (timeouts, leader changes, a broker away) is worth retrying.
pub fn is_permanent(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::MessageBatchTooLarge
                | C::InvalidRecord
                | C::UnknownTopic
                | C::UnknownPartition
                | C::UnknownTopicOrPartition
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::InvalidTopic
        )
    )
}

/// What an operator must do about a permanent produce failure on `topic`.
pub fn explain_permanent(topic: &str, e: &KafkaError) -> String {
    use RDKafkaErrorCode as C;
    let what = match e.rdkafka_error_code() {
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::MessageBatchTooLarge
            | C::InvalidRecord,
        ) => "a record is larger than the producer's `message.max.bytes` or the topic's `max.message.bytes` accept: raise the topic's limit, or lower `output.dead-letter-max-bytes` / `input.max-message-bytes`",
        Some(C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed) => {
            "this instance may not write to the topic: grant it WRITE (and the transactional id's WRITE)"
        }
        _ => "the topic does not exist (deleted?): create it again (`scripts/broker topics`)",
    };
    format!("cannot produce to topic `{topic}` ({e}); {what}. Stopping: retrying cannot succeed, and the records not written are not committed, so nothing is lost")
}

/// The longest a wait for delivery reports ([`Sink::flush`], [`Sink::wait_acknowledged`])
/// sleeps before it looks again.
const REPORT_WAIT_SLICE: Duration = Duration::from_millis(5);

pub struct SinkContext {
    changelog: String,
    deliveries: Arc<Mutex<Deliveries>>,
    /// Records handed to librdkafka and not yet reported, by generation ([`Sink::cut`]).
    pending: Arc<[AtomicU64; 2]>,
}

impl ClientContext for SinkContext {}

impl ProducerContext for SinkContext {
    /// The generation the record was sent in.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, generation: usize) {
        self.pending[generation].fetch_sub(1, Ordering::AcqRel);
        let Ok(mut d) = self.deliveries.lock() else {
            return;
        };
        match result {
            Ok(m) if m.topic() == self.changelog => {
                let e = d.changelog.entry(m.partition()).or_insert(m.offset());
                *e = (*e).max(m.offset());
            }
            Ok(_) => {}
            Err((e, m)) => {
                d.failed += 1;
                d.first_error.get_or_insert_with(|| e.clone());
                if is_permanent(e) {
                    d.permanent
                        .get_or_insert_with(|| (m.topic().to_string(), e.clone()));
                }
            }
        }
    }
}

pub struct Sink {
    /// The producer's queue of delivery reports, which wakes `reports_in` when it turns
    /// non-empty. Declared before `producer`: dropped first.
    reports: QueueLength,
    reports_in: Arc<Wake>,
    producer: BaseProducer<SinkContext>,
    deliveries: Arc<Mutex<Deliveries>>,
    pending: Arc<[AtomicU64; 2]>,
    /// What records sent now belong to: 0 or 1, flipped by [`Sink::cut`].
    generation: AtomicUsize,
    verdicts: String,
    dead_letter: String,
    changelog: String,
    repartition: String,
}

/// The producer's librdkafka configuration: defaults, then `[kafka]`, then
/// `[kafka-producer]`.
pub fn client_config(settings: &Settings) -> anyhow::Result<ClientConfig> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &settings.brokers)
        .set("acks", "all")
        .set("linger.ms", "2")
        // Keyed records land where the Java client (and kafka-producer-perf-test) would put
        // the same key: murmur2, not librdkafka's default CRC32.
        .set("partitioner", "murmur2_random")
        // A deleted output topic is an error to report, never one to re-create silently
        // with the broker's defaults (and no compaction for the changelog).
        .set("allow.auto.create.topics", "false")
        // Kafka Streams' default under exactly-once: a transaction left open by a crashed
        // instance holds back read_committed readers for at most this long.
        .set("transaction.timeout.ms", "10000");
    for (k, v) in settings.kafka.iter().chain(&settings.kafka_producer) {
        c.set(k, v.resolve(k)?);
    }
    Ok(c)
}

impl Sink {
    /// A transactional producer with a stable id: a restart of the same instance fences its
    /// previous incarnation and aborts the transaction it left open.
    pub fn transactional(settings: &Settings, transactional_id: &str) -> anyhow::Result<Sink> {
        let mut c = client_config(settings)?;
        c.set("transactional.id", transactional_id);
        Sink::create(settings, c)
    }

    /// An idempotent producer outside transactions (at-least-once verdicts).
    pub fn idempotent(settings: &Settings) -> anyhow::Result<Sink> {
        let mut c = client_config(settings)?;
        c.set("enable.idempotence", "true");
        Sink::create(settings, c)
    }

    fn create(settings: &Settings, config: ClientConfig) -> anyhow::Result<Sink> {
        let deliveries = Arc::new(Mutex::new(Deliveries::default()));
        let pending = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let changelog = settings.changelog_topic();
        let producer: BaseProducer<SinkContext> = config
            .create_with_context(SinkContext {
                changelog: changelog.clone(),
                deliveries: deliveries.clone(),
                pending: pending.clone(),
            })
            .map_err(|e| anyhow::anyhow!("cannot create the Kafka producer: {e}"))?;
        let reports_in = Arc::new(Wake::default());
        let reports = QueueLength::main(producer.client(), reports_in.clone())
            .ok_or_else(|| anyhow::anyhow!("the Kafka producer has no main queue"))?;
        Ok(Sink {
            reports,
            reports_in,
            producer,
            deliveries,
            pending,
            generation: AtomicUsize::new(0),
            verdicts: settings.topics.verdicts.clone(),
            dead_letter: settings.topics.dead_letter.clone(),
            changelog,
            repartition: settings.repartition_topic(),
        })
    }

    pub fn producer(&self) -> &BaseProducer<SinkContext> {
        &self.producer
    }

    fn topic(&self, t: Topic) -> &str {
        match t {
            Topic::Verdicts => &self.verdicts,
            Topic::DeadLetter => &self.dead_letter,
            Topic::Changelog => &self.changelog,
            Topic::Repartition => &self.repartition,
        }
    }

    /// Hands `r` to librdkafka (its headers move there, not copied), waiting while its
    /// queue is full. An error is the producer's (fenced, fatal, or the transaction needs an
    /// abort). Delivery reports are served by [`Sink::serve_deliveries`], once per batch, not
    /// per record.
    pub fn send(&self, mut r: OutRecord) -> Result<(), KafkaError> {
        let generation = self.generation.load(Ordering::Acquire);
        let mut record =
            BaseRecord::<[u8], [u8], usize>::with_opaque_to(self.topic(r.topic), generation);
        if let Some(h) = r.headers.take() {
            record = record.headers(h);
        }
        if let Some(p) = &r.payload {
            record = record.payload(p);
        }
        if let Some(k) = &r.key {
            record = record.key(k);
        }
        if let Some(p) = r.partition {
            record = record.partition(p);
        }
        if let Some(t) = r.timestamp {
            record = record.timestamp(t);
        }
        self.pending[generation].fetch_add(1, Ordering::AcqRel);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // Serving delivery reports frees the queue.
                    record = back;
                    self.producer.poll(Duration::from_millis(1));
                }
                Err((e, _)) => {
                    self.pending[generation].fetch_sub(1, Ordering::AcqRel);
                    if is_permanent(&e) {
                        if let Ok(mut d) = self.deliveries.lock() {
                            d.permanent.get_or_insert_with(|| {
                                (self.topic(r.topic).to_string(), e.clone())
                            });
                        }
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Serves the delivery reports that are in, without waiting (they free librdkafka's
    /// queue and are counted in [`Sink::take_deliveries`]).
    pub fn serve_deliveries(&self) {
        self.producer.poll(Duration::ZERO);
    }

    /// A permanent failure seen since deliveries were last taken, explained.
    pub fn permanent_failure(&self) -> Option<String> {
        let d = self.deliveries.lock().ok()?;
        d.permanent
            .as_ref()
            .map(|(topic, e)| explain_permanent(topic, e))
    }

    /// Waits until everything sent is acknowledged (or failed), serving delivery reports.
    /// (rdkafka's own flush waits in slices of 100 ms once a report is not in yet: 100 ms
    /// added to nearly every commit.)
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.serve_until(|| self.producer.in_flight_count() == 0, timeout)
    }

    /// Serves delivery reports as they come in until `done`, asleep in between: the queue
    /// wakes the wait when a report arrives. (rdkafka's `poll(timeout)` asks librdkafka for
    /// whole milliseconds and loops until its deadline: `poll(1 ms)` spins for the
    /// millisecond.) The wait is in slices of [`REPORT_WAIT_SLICE`], so that `done` is looked
    /// at again even if what it waits for ended without a report. One thread waits at a
    /// time; the other may serve reports meanwhile (librdkafka's polls are thread-safe).
    fn serve_until(&self, done: impl Fn() -> bool, timeout: Duration) -> Result<(), KafkaError> {
        let deadline = Instant::now() + timeout;
        loop {
            // Whatever arrives after the queue is seen empty wakes the wait below.
            self.reports_in.clear();
            while self.reports.get() > 0 && !done() {
                self.producer.poll(Duration::ZERO);
            }
            if done() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
            }
            self.reports_in
                .wait_until(deadline.min(now + REPORT_WAIT_SLICE));
        }
    }

    /// Ends the generation of the records sent so far (returned) and starts the other: a
    /// commit waits for its own records ([`Sink::wait_acknowledged`]) while the next batches
    /// send theirs. At most two generations are open: the one a commit waits for, and the
    /// one after it. Called on the thread that sends.
    pub fn cut(&self) -> usize {
        self.generation.fetch_xor(1, Ordering::AcqRel)
    }

    /// Waits until every record of `generation` is acknowledged (or failed), serving
    /// delivery reports (this may run beside the thread that sends: librdkafka's polls are
    /// thread-safe).
    pub fn wait_acknowledged(
        &self,
        generation: usize,
        timeout: Duration,
    ) -> Result<(), KafkaError> {
        self.serve_until(
            || self.pending[generation].load(Ordering::Acquire) == 0,
            timeout,
        )
    }

    /// The delivery outcomes since the last call.
    pub fn take_deliveries(&self) -> Deliveries {
        self.deliveries
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default()
    }
}
