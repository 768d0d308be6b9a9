//! The Kafka clients' side of the inputs: the group consumer's configuration, a consumer's
//! position and watermarks, topic metadata, the internal topics, the consumer-lag metric.
//!
//! Offsets are not committed here: under both guarantees they go into the processing
//! transaction (`pipeline::commit`), so the consumer never commits on its own and reads only
//! committed records (`read_committed`).

pub mod global;
pub mod partitioner;

use std::ffi::c_void;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::metadata::Metadata;
use rdkafka::statistics::Statistics;
use rdkafka::TopicPartitionList;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::telemetry::CONSUMER_LAG;

/// Exports the lag of each assigned partition from librdkafka statistics (every
/// `statistics.interval.ms`): its last stable offset (what `read_committed` may read) minus
/// the consumer's position. librdkafka's own `consumer_lag` is measured from offsets the
/// consumer committed, and this one commits none (the transactions do).
pub fn export_lag(statistics: &Statistics) {
    for (topic, t) in &statistics.topics {
        for (partition, p) in &t.partitions {
            // Partition -1 is librdkafka's internal "unassigned" partition.
            if *partition < 0 || !p.desired || p.ls_offset < 0 {
                continue;
            }
            let position = if p.app_offset >= 0 {
                p.app_offset
            } else if p.committed_offset >= 0 {
                p.committed_offset
            } else {
                continue;
            };
            metrics::gauge!(CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string())
                .set((p.ls_offset - position).max(0) as f64);
        }
    }
}

/// The consumer's librdkafka configuration: fraudstream's defaults, then `[kafka]`, then
/// `[kafka-consumer]`, then the settings fraudstream's guarantees depend on.
pub fn client_config(settings: &Settings) -> anyhow::Result<ClientConfig> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &settings.brokers)
        .set("group.id", &settings.group_id)
        .set("auto.offset.reset", "earliest")
        // Feeds fraudstream_consumer_lag_messages.
        .set("statistics.interval.ms", "5000")
        // Partition p of every input (transactions, navigation, repartition) must go to the
        // same instance: the range assignor does that for co-partitioned topics.
        .set("partition.assignment.strategy", "range");
    for (k, v) in settings.kafka.iter().chain(&settings.kafka_consumer) {
        c.set(k, v.resolve(k)?);
    }
    // What the guarantees rest on (config validation refuses to let these be set): offsets
    // are committed in the processing transaction only, and records of aborted (or still
    // open) transactions upstream are never read.
    c.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed");
    Ok(c)
}

/// Prefetch limits of librdkafka that hold per partition once each partition has a queue of
/// its own (the group consumer's: `pipeline::intake`), with their defaults for the
/// consumer's one queue.
const PREFETCH: [(&str, usize, usize); 2] = [
    ("queued.max.messages.kbytes", 65_536, 1_024),
    ("queued.min.messages", 100_000, 1_000),
];

/// librdkafka settings of the group consumer that its queue per partition needs (see
/// [`group_consumer_config`]). A busy partition reaches the divided prefetch limits at every
/// fetch, and is left out of fetches until the loop takes from its queue. With librdkafka's
/// defaults it is then not looked at again for a second (`fetch.queue.backoff.ms`), and
/// when it is, it waits for the fetch in flight, which may be held at the broker for half a
/// second (`fetch.wait.max.ms`) when it asks only for partitions that are caught up. The
/// loop empties a queue in tens of milliseconds, so it sat idle for the records of a
/// backlog, and the event-time merge, which waits for an input whose records are on the
/// broker, held the task's other inputs meanwhile (when it waited at most 50 ms, purchases
/// were scored before their browsing: tests/stateful.rs, bench/RESULTS.md). Both waits are
/// kept to tens of milliseconds; librdkafka's documentation asks for the lower backoff when
/// the queue limits are low. The cost is an empty fetch every 20 ms per worker when idle.
const FETCH_PACE: [(&str, &str); 2] = [
    ("fetch.queue.backoff.ms", "10"),
    ("fetch.wait.max.ms", "20"),
];

/// The group consumer's configuration: [`client_config`], and librdkafka's prefetch limits
/// (64 MiB, 100,000 messages), which apply per partition queue, divided among the
/// `partition_queues` it may read (at least 1 MiB and 1,000 messages each), with
/// [`FETCH_PACE`], unless `[kafka]` or `[kafka-consumer]` sets them.
pub fn group_consumer_config(
    settings: &Settings,
    partition_queues: usize,
) -> anyhow::Result<ClientConfig> {
    let mut c = client_config(settings)?;
    let unset =
        |key: &str| !settings.kafka.contains_key(key) && !settings.kafka_consumer.contains_key(key);
    for (key, total, least) in PREFETCH {
        if unset(key) {
            c.set(
                key,
                (total / partition_queues.max(1)).max(least).to_string(),
            );
        }
    }
    for (key, value) in FETCH_PACE {
        if unset(key) {
            c.set(key, value);
        }
    }
    Ok(c)
}

/// A consumer outside the group (global tables, restore): the group consumer's settings,
/// its own `group.id` (never committed to), and no statistics (the group consumer's lag is
/// the one exported; these would only be logged).
pub fn side_client_config(settings: &Settings, role: &str) -> anyhow::Result<ClientConfig> {
    let mut c = client_config(settings)?;
    c.set("group.id", format!("{}-{role}", settings.group_id))
        .set("enable.auto.commit", "false")
        .set("statistics.interval.ms", "0");
    Ok(c)
}

/// The high watermark of a partition as of the consumer's last fetch response, without a
/// request to the broker (librdkafka's cache); `None` before the first fetch.
pub fn cached_high_watermark<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
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

/// The consumer's position in a partition: the offset of the next record it will return.
/// Unlike the offset of the last record returned + 1, it steps over the transaction markers
/// that a transactional producer leaves in the log and that no consumer ever receives, so
/// a partition whose last record is a commit marker can be seen to be read to its end.
/// `None` before anything was read from the partition.
pub fn position<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let mut tpl = TopicPartitionList::with_capacity(1);
    tpl.add_partition(topic, partition);
    // SAFETY: the client pointer is valid for the consumer's lifetime and `tpl` outlives the
    // call; rd_kafka_position only fills in the list's offsets.
    let err =
        unsafe { rdkafka::bindings::rd_kafka_position(consumer.client().native_ptr(), tpl.ptr()) };
    if err != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return None;
    }
    match tpl.find_partition(topic, partition)?.offset() {
        rdkafka::Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// A reference to one of a client's librdkafka queues, for its length.
///
/// - [`QueueLength::consumer`]: the consumer's own queue: events (rebalances, errors,
///   statistics) and the records of partitions whose queue is not split off. `poll` with
///   no timeout returns `None` both for an empty queue and after serving an event, so its
///   length is how the caller knows the queue is drained.
/// - [`QueueLength::partition`]: a partition's fetch queue: what a split partition queue
///   holds (records, and transaction markers, which `poll` serves and returns `None` for).
/// - [`QueueLength::main`]: a producer's queue of delivery reports and errors, with a
///   [`Wake`] for when it turns non-empty.
pub struct QueueLength {
    queue: std::ptr::NonNull<rdkafka::bindings::rd_kafka_queue_t>,
    /// Notified by librdkafka when the queue turns non-empty; kept here as long as the
    /// callback that points at it is registered.
    wake: Option<Arc<Wake>>,
}

// SAFETY: librdkafka queues are thread-safe; the reference is only read and released, and
// the callback's `Wake` is itself `Send + Sync`.
unsafe impl Send for QueueLength {}
unsafe impl Sync for QueueLength {}

impl QueueLength {
    fn new(queue: *mut rdkafka::bindings::rd_kafka_queue_t) -> Option<QueueLength> {
        std::ptr::NonNull::new(queue).map(|queue| QueueLength { queue, wake: None })
    }

    /// The consumer's queue; `None` for a consumer without a group.
    pub fn consumer<C: rdkafka::consumer::ConsumerContext>(
        consumer: &impl Consumer<C>,
    ) -> Option<QueueLength> {
        // SAFETY: the client pointer is valid for the consumer's lifetime; the queue
        // returned is a new reference (or null without a group), released in `drop`.
        QueueLength::new(unsafe {
            rdkafka::bindings::rd_kafka_queue_get_consumer(consumer.client().native_ptr())
        })
    }

    /// `topic`'s partition `partition`; `None` when librdkafka has no queue for it.
    pub fn partition<C: rdkafka::consumer::ConsumerContext>(
        consumer: &impl Consumer<C>,
        topic: &str,
        partition: i32,
    ) -> Option<QueueLength> {
        let topic = std::ffi::CString::new(topic).ok()?;
        // SAFETY: the client pointer is valid for the consumer's lifetime and `topic` for the
        // call; the queue returned is a new reference, released in `drop`.
        QueueLength::new(unsafe {
            rdkafka::bindings::rd_kafka_queue_get_partition(
                consumer.client().native_ptr(),
                topic.as_ptr(),
                partition,
            )
        })
    }

    /// The client's main queue (a producer's delivery reports), notifying `wake` whenever it
    /// turns non-empty (on librdkafka's threads). Must be dropped before the client.
    pub fn main<C: rdkafka::ClientContext>(
        client: &rdkafka::client::Client<C>,
        wake: Arc<Wake>,
    ) -> Option<QueueLength> {
        unsafe extern "C" fn nonempty(_: *mut rdkafka::bindings::rd_kafka_t, wake: *mut c_void) {
            // SAFETY: `wake` is the `Arc<Wake>` the queue holds while this is registered.
            unsafe { &*(wake as *const Wake) }.notify();
        }
        // SAFETY: the client pointer is valid for the client's lifetime; the queue returned
        // is a new reference, released in `drop`.
        let mut q = QueueLength::new(unsafe {
            rdkafka::bindings::rd_kafka_queue_get_main(client.native_ptr())
        })?;
        // SAFETY: the pointer stays valid while registered: `drop` unregisters the callback
        // before the `Arc` goes.
        unsafe {
            rdkafka::bindings::rd_kafka_queue_cb_event_enable(
                q.queue.as_ptr(),
                Some(nonempty),
                Arc::as_ptr(&wake) as *mut c_void,
            )
        };
        q.wake = Some(wake);
        Some(q)
    }

    pub fn get(&self) -> usize {
        // SAFETY: the reference is held until `drop`.
        unsafe { rdkafka::bindings::rd_kafka_queue_length(self.queue.as_ptr()) }
    }
}

impl Drop for QueueLength {
    fn drop(&mut self) {
        // SAFETY: unregisters the callback (under the queue's lock, so none runs after it),
        // then releases the reference taken at construction, once.
        unsafe {
            if self.wake.is_some() {
                rdkafka::bindings::rd_kafka_queue_cb_event_enable(
                    self.queue.as_ptr(),
                    None,
                    std::ptr::null_mut(),
                );
            }
            rdkafka::bindings::rd_kafka_queue_destroy(self.queue.as_ptr())
        }
    }
}

/// Wakes a waiting thread when a librdkafka queue turns non-empty: the consumer's (its own,
/// or a partition's) for the pipeline's loop, a producer's delivery reports for a commit
/// waiting for them. Notified on librdkafka's threads.
#[derive(Default)]
pub struct Wake {
    woken: Mutex<bool>,
    cv: Condvar,
}

impl Wake {
    pub fn notify(&self) {
        *self.woken.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_one();
    }

    /// Forgets earlier wake-ups: called before looking into the queues, so that whatever
    /// arrives after the look wakes the next wait.
    pub fn clear(&self) {
        *self.woken.lock().unwrap_or_else(|e| e.into_inner()) = false;
    }

    /// Waits until woken since the last [`Wake::clear`], or until `until`.
    pub fn wait_until(&self, until: Instant) {
        let mut woken = self.woken.lock().unwrap_or_else(|e| e.into_inner());
        while !*woken {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            woken = self
                .cv
                .wait_timeout(woken, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Waits until the brokers answer a metadata request, retrying with backoff; returns the
/// cluster's metadata.
pub async fn wait_for_metadata(
    client: &BaseConsumer,
    brokers: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Metadata> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match client.fetch_metadata(None, Duration::from_secs(5)) {
            Ok(md) => return Ok(md),
            Err(e) => {
                tracing::warn!(brokers, error = %e, retry_in_ms = backoff.as_millis() as u64, "Brokers not reachable yet.");
                tokio::select! {
                    _ = shutdown.cancelled() => anyhow::bail!("stopped before the brokers answered"),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn admin_client(settings: &Settings) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.brokers);
    for (k, v) in &settings.kafka {
        config.set(k, v.resolve(k)?);
    }
    config
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create the admin client: {e}"))
}

/// A topic's `max.message.bytes` (the largest record batch its partitions accept), or
/// `None` when the broker does not say (no right to describe it: the limit is then found
/// at the first record too large, which stops the instance with the reason).
pub async fn topic_max_message_bytes(settings: &Settings, topic: &str) -> Option<usize> {
    let admin = admin_client(settings).ok()?;
    let results = admin
        .describe_configs(
            &[ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await;
    let resource = match results.map(|mut r| r.pop()) {
        Ok(Some(Ok(resource))) => resource,
        other => {
            tracing::warn!(topic, result = ?other.map(|r| r.map(|r| r.map(|_| ()))), "Cannot read the topic's max.message.bytes.");
            return None;
        }
    };
    resource
        .get("max.message.bytes")?
        .value
        .as_ref()?
        .parse()
        .ok()
}

/// Creates the internal topics (name, compacted) with `partitions` each. One that was
/// created meanwhile (another instance starting) is fine.
pub async fn create_internal_topics(
    settings: &Settings,
    topics: &[(String, bool)],
    partitions: i32,
) -> anyhow::Result<()> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin = admin_client(settings)?;
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
