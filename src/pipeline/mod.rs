//! The service: start-up, then one loop that polls the inputs, merges each task's records in
//! event time, processes them in batches and commits.
//!
//! - [`topology`]: what `run` needs of the cluster (shared with `validate`).
//! - [`intake`]: the partitions' own queues, read in turn; a consumed message → a decoded,
//!   routed record of its task.
//! - [`merge`]: each task's inputs in event-time order (pure, unit-tested).
//! - [`rebalance`]: the consumer's callbacks and the restore of assigned partitions.
//! - [`batch`]: records → state, feature rows, scores, verdicts (no I/O).
//! - [`score`]: the primary and shadow models under one latency budget.
//! - [`commit`]: the transaction; where the order of outputs, state and offsets lives.
//!
//! The loop runs on a thread of its own with a [`GroupConsumer`]; its state is a [`Core`]
//! behind a mutex that the loop holds except while it polls, when the consumer's rebalance
//! callbacks take it (to commit before a revoke, to plan restores after an assign).
//!
//! Errors say what happens next: a bad record is poison (dead letter, move on); an aborted
//! transaction is retried (uncommitted state dropped, consumer rewound to the committed
//! offsets); a state or fatal producer error ends the loop (drain, exit non-zero).

pub mod batch;
pub mod commit;
pub mod intake;
pub mod merge;
pub mod rebalance;
pub mod score;
pub mod topology;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use self::batch::{model_info, Output, Processor};
use self::commit::{CommitError, Committer};
use self::intake::{Queues, Record};
use self::merge::{Merge, Progress, Queued, INPUTS, NAV, REPARTITION, TX};
use self::rebalance::{GroupConsumer, GroupContext, Restorer};
use self::score::Scoring;
use crate::config::Settings;
use crate::decision::rules::RuleSet;
use crate::decision::Decision;
use crate::decode::{Decoder, ErrorKind};
use crate::model::reload::{self, ReloadHandle, Role};
use crate::model::runner::Runner;
use crate::model::{self, Model};
use crate::source::global::GlobalReader;
use crate::source::{self, Wake};
use crate::state::store::{ScanCursor, ENTITY_TTL_MS, EXPIRY_GRACE_MS};
use crate::state::{Hasher, StateBatch, Store};
use crate::telemetry::{self, Readiness, WorkerReadiness};

/// Records of one input partition the merge may hold before its queue is no longer read.
const HOLD_AT: usize = 50_000;

/// The smallest share of `batch.max-buffered-bytes` an input partition may hold.
const MIN_PARTITION_BYTES: usize = 1 << 20;

/// How long a partition's end offset asked of the broker is trusted.
const WATERMARK_TTL: Duration = Duration::from_millis(20);

/// Event time a partition's stream time moves between two expiry scans of its state (the
/// first scan is at its first commit).
const EXPIRY_EVERY_MS: i64 = 3_600_000;

/// Entities the expiry scans look at per commit, over all partitions: a scan of a large
/// partition goes on over several commits instead of holding up the poll loop (400,000
/// entities took 12 s in a debug build on a loaded machine, past `max.poll.interval.ms`).
const EXPIRY_SCAN_BUDGET: usize = 10_000;

/// Fatal producer errors in a row after which the instance gives up (a new producer is
/// made after each: it fences the old one and aborts its transaction).
const MAX_PRODUCER_RESETS: u32 = 5;

/// Bytes kept free under a size limit for a record's framing in its batch.
const RECORD_OVERHEAD: usize = 512;

/// Makes the size limits of what this instance produces consistent, at start: a record the
/// producer or a topic refuses would stop the instance (and every instance after it), so
/// none may be possible. Returns the limit for dead letters (see
/// `output.dead-letter-max-bytes`).
async fn output_limits(settings: &Settings) -> anyhow::Result<usize> {
    let producer = settings.producer_max_message_bytes()?;
    // A transaction forwarded to its customer's partition carries its message whole, and
    // its customer id (from within the message) as key.
    let input = settings.input.max_message_bytes;
    anyhow::ensure!(
        2 * input + RECORD_OVERHEAD <= producer,
        "`input.max-message-bytes` = {input} is too large for the producer's `message.max.bytes` = {producer}: a message forwarded to its customer's partition is produced whole, with its customer id as key. Lower it to at most {} or raise `message.max.bytes` in [kafka-producer] (and the topics' max.message.bytes)",
        (producer - RECORD_OVERHEAD) / 2
    );
    let topic = &settings.topics.dead_letter;
    let configured = settings.output.dead_letter_max_bytes;
    let mut limit = configured.min(producer.saturating_sub(RECORD_OVERHEAD));
    let topic_max = source::topic_max_message_bytes(settings, topic).await;
    if let Some(t) = topic_max {
        limit = limit.min(t.saturating_sub(RECORD_OVERHEAD));
        if t < producer {
            tracing::warn!(topic, topic_max_message_bytes = t, producer_max_message_bytes = producer, "The dead-letter topic accepts smaller batches than the producer builds: several dead letters batched together may be refused, which stops the instance. Raise the topic's max.message.bytes to at least the producer's message.max.bytes.");
        }
    }
    anyhow::ensure!(
        limit >= crate::config::MIN_DEAD_LETTER_BYTES,
        "dead letters would have to fit in {limit} bytes (output.dead-letter-max-bytes {configured}, producer message.max.bytes {producer}, topic `{topic}` max.message.bytes {topic_max:?}): too little for the headers that say where they came from. Raise the topic's max.message.bytes"
    );
    if limit < configured {
        tracing::info!(limit, configured, producer_max_message_bytes = producer, topic_max_message_bytes = ?topic_max, "Dead letters limited below output.dead-letter-max-bytes by the producer or the topic.");
    }
    Ok(limit)
}

/// The wait after the n-th abort in a row: none after the first (a rebalance or a fenced
/// zombie is over at once), then 100 ms doubling to 5 s, each drawn at random from its upper
/// half so that instances failing together do not retry together.
fn abort_backoff(aborts: u32) -> Duration {
    if aborts <= 1 {
        return Duration::ZERO;
    }
    let cap = (100u64 << (aborts - 2).min(6)).min(5_000);
    // Jitter from the clock's nanoseconds: no generator needed for a spread of retries.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    Duration::from_millis(cap / 2 + nanos % (cap / 2 + 1))
}

/// Runs fraudstream until `shutdown` is cancelled. Errors are fatal: the caller exits
/// non-zero, and nothing uncommitted became visible.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    // SIGHUP reloads the model (and would otherwise end the process).
    let workers = settings.processing.workers;
    let reloads = ReloadHandle::new(workers);
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
        let reloads = reloads.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: loading the model files again.");
                reloads.request();
            }
        });
    }
    let readiness = Readiness::new(workers);
    let prometheus = telemetry::install().context("cannot install the metrics recorder")?;
    // Export every counter from the start, at zero, so rates and dashboards work before
    // the first event of each kind.
    for kind in ErrorKind::ALL {
        metrics::counter!(telemetry::DEAD_LETTERS, "kind" => kind.as_str()).increment(0);
    }
    for d in Decision::ALL {
        metrics::counter!(telemetry::VERDICTS, "decision" => d.as_str()).increment(0);
    }
    for result in ["committed", "aborted"] {
        metrics::counter!(telemetry::COMMITS, "result" => result).increment(0);
    }
    metrics::counter!(telemetry::RESTORED_RECORDS).increment(0);
    metrics::counter!(telemetry::REPARTITIONED).increment(0);
    metrics::counter!(telemetry::EXPIRED).increment(0);
    for cause in crate::model::runner::Cause::ALL {
        metrics::counter!(telemetry::DEGRADED, "cause" => cause.as_str()).increment(0);
    }
    metrics::gauge!(
        telemetry::BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "guarantee" => match settings.processing.guarantee {
            crate::config::Guarantee::ExactlyOnce => "exactly-once",
            crate::config::Guarantee::AtLeastOnce => "at-least-once",
        }
    )
    .set(1.0);
    for table in ["labels", "blocklist"] {
        metrics::gauge!(telemetry::GLOBAL_ENTRIES, "table" => table).set(0.0);
        metrics::counter!(telemetry::GLOBAL_REFUSED, "table" => table).increment(0);
    }
    let admin = match &settings.metrics.admin_token {
        Some(t) => {
            let token = t.resolve("metrics.admin-token")?;
            anyhow::ensure!(!token.is_empty(), "`metrics.admin-token` is empty");
            let admin: Arc<dyn telemetry::Admin> = Arc::new(reloads.clone());
            Some((admin, token))
        }
        None => None,
    };
    let endpoint = telemetry::Endpoint {
        metrics: prometheus,
        readiness: readiness.clone(),
        stall: Duration::from_millis(settings.metrics.stall_timeout_ms),
        admin,
    };
    let (addr, http) =
        telemetry::serve(settings.metrics.listen, endpoint, shutdown.clone()).await?;
    tracing::info!(%addr, "Metrics endpoint listening.");

    let env = model::init_runtime(settings.onnxruntime_library().as_deref())?;
    let model = Model::load(env, &settings.model.manifest)?;
    model_info(Role::Primary, &model.manifest, 1.0);
    tracing::info!(
        model_version = %model.manifest.model_version,
        features = model.features.len(),
        "Model loaded."
    );
    let shadow = match &settings.model.shadow {
        Some(path) => {
            let shadow = Model::load(env, path)?;
            model_info(Role::Shadow, &shadow.manifest, 1.0);
            tracing::info!(
                model_version = %shadow.manifest.model_version,
                features = shadow.features.len(),
                "Shadow model loaded: it scores every transaction and never decides."
            );
            Some(shadow)
        }
        None => None,
    };
    let rules = match &settings.decision.rules {
        Some(path) => {
            let r = RuleSet::load(path)?;
            tracing::info!(version = %r.version, rules = r.rules.len(), "Rules loaded.");
            for rule in &r.rules {
                metrics::counter!(telemetry::RULE_HITS, "rule" => rule.code.clone()).increment(0);
            }
            r
        }
        None => RuleSet::empty(),
    };
    let mut watched = vec![(Role::Primary, settings.model.manifest.clone())];
    watched.extend(
        settings
            .decision
            .rules
            .iter()
            .map(|p| (Role::Rules, p.clone())),
    );
    watched.extend(
        settings
            .model
            .shadow
            .iter()
            .map(|p| (Role::Shadow, p.clone())),
    );
    reload::start(
        env,
        watched,
        Duration::from_millis(settings.model.watch_interval_ms),
        reloads.clone(),
        shutdown.clone(),
    )
    .context("cannot start the model watcher")?;
    let mut stores = Vec::with_capacity(workers);
    for w in 0..workers {
        stores.push(Store::open(
            &settings.state.worker_path(w),
            settings.state.cache_bytes,
        )?);
    }
    let secret = settings.state.secret()?;
    if secret == crate::config::DEV_HMAC_SECRET {
        tracing::warn!("USING THE BUILT-IN DEVELOPMENT HMAC KEY (state.development-secret): anyone with the changelog can test identifiers against it. Never with real data.");
    }
    let hasher = Hasher::new(secret.as_bytes());

    // The cluster: topics, co-partitioning, internal topics.
    let topology = {
        let probe: BaseConsumer = source::client_config(&settings)?
            .create()
            .map_err(|e| anyhow::anyhow!("cannot create a Kafka client: {e}"))?;
        let md = source::wait_for_metadata(&probe, &settings.brokers, &shutdown).await?;
        let (topology, findings) = topology::check(&settings, &md);
        for f in &findings {
            tracing::debug!(finding = %f, "Topology.");
        }
        match topology {
            Some(t) => t,
            None => {
                let problems: Vec<String> = findings
                    .iter()
                    .filter(|f| f.level == topology::Level::Problem)
                    .map(|f| f.message.clone())
                    .collect();
                anyhow::bail!("cannot start: {}", problems.join("; "));
            }
        }
    };
    source::create_internal_topics(
        &settings,
        &topology.missing_internal,
        topology.partitions as i32,
    )
    .await?;

    let dead_letter_max_bytes = output_limits(&settings).await?;

    let global = GlobalReader::start(&settings, hasher.clone(), shutdown.clone())?;
    global.wait_loaded(&shutdown).await?;
    readiness.set_global_loaded(true);

    // Each worker scores with a model of its own (an ONNX Runtime session serves one
    // caller at a time): the first is the one loaded and checked above.
    let mut models = vec![(model, shadow)];
    for _ in 1..workers {
        let shadow = match &settings.model.shadow {
            Some(path) => Some(Model::load(env, path)?),
            None => None,
        };
        models.push((Model::load(env, &settings.model.manifest)?, shadow));
    }
    let mut works = Vec::with_capacity(workers);
    for (w, ((model, shadow), store)) in models.into_iter().zip(stores).enumerate() {
        let parts = WorkerParts {
            index: w,
            settings: &settings,
            model,
            shadow,
            rules: rules.clone(),
            hasher: hasher.clone(),
            global: global.tables.clone(),
            partitions: topology.partitions,
            dead_letter_max_bytes,
            store,
            reloads: reloads.clone(),
            readiness: readiness.worker(w),
        };
        works.push(worker(parts)?);
    }
    let mut loops = tokio::task::JoinSet::new();
    for work in works {
        let stop = shutdown.clone();
        loops.spawn_blocking(move || work(&stop));
    }
    // Until every worker has stopped; the first to fail stops the others.
    let mut result = Ok(());
    while let Some(done) = loops.join_next().await {
        let done = done.context("a processing thread panicked").and_then(|r| r);
        if let Err(e) = done {
            shutdown.cancel();
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    shutdown.cancel();
    drop(global);
    let _ = http.await;
    result
}

/// What a worker is made of: its own model, store and (inside) consumer and producer; the
/// rest shared.
struct WorkerParts<'a> {
    index: usize,
    settings: &'a Settings,
    model: Model,
    shadow: Option<Model>,
    rules: RuleSet,
    hasher: Hasher,
    global: Arc<std::sync::RwLock<crate::state::global::GlobalTables>>,
    partitions: u32,
    dead_letter_max_bytes: usize,
    store: Store,
    reloads: ReloadHandle,
    readiness: WorkerReadiness,
}

/// Makes a worker and joins the group with it; returns its loop, to run on a thread of its
/// own until `stop`: polls, processes and commits, then the last commit and leaving.
fn worker(
    parts: WorkerParts<'_>,
) -> anyhow::Result<impl FnOnce(&CancellationToken) -> anyhow::Result<()> + Send + 'static> {
    let WorkerParts {
        index,
        settings,
        model,
        shadow,
        rules,
        hasher,
        global,
        partitions,
        dead_letter_max_bytes,
        store,
        reloads,
        readiness,
    } = parts;
    let decoder = Decoder::new(&settings.input, model.features.requirements())?;
    let transactional_id = format!("{}-{}", settings.group_id, store.instance_id()?);
    tracing::info!(worker = index, %transactional_id, guarantee = ?settings.processing.guarantee, "Processing guarantee.");
    let wake = Arc::new(Wake::default());
    let committer = Committer::new(settings, &transactional_id, wake.clone())?;
    let budget = settings.decision.latency_budget_ms;
    let view = model.view();
    let runner = Runner::start(model, (budget > 0).then(|| Duration::from_millis(budget)))
        .context("cannot start the model thread")?;
    let scoring = Scoring::new(
        runner,
        shadow,
        (budget > 0).then(|| Duration::from_millis(budget)),
    );
    let processor = Processor::new(
        settings,
        view,
        scoring,
        rules,
        hasher,
        global,
        dead_letter_max_bytes,
    )?;

    let topics = &settings.topics;
    let mut inputs: [Option<String>; INPUTS] = [None, None, None];
    inputs[NAV] = (!topics.navigation.is_empty()).then(|| topics.navigation.clone());
    inputs[REPARTITION] = Some(settings.repartition_topic());
    inputs[TX] = Some(topics.transactions.clone());
    let core = Core {
        inputs: inputs.clone(),
        worker: index,
        partitions,
        max_records: settings.batch.max_records,
        max_wait: Duration::from_millis(settings.batch.max_wait_ms),
        decoder,
        reloads,
        processor,
        merge: Merge::new(
            inputs.clone().map(|i| i.is_some()),
            Duration::from_millis(settings.batch.max_task_idle_ms),
            Duration::from_millis(settings.batch.max_fetch_wait_ms),
        ),
        state: StateBatch::default(),
        store,
        committer,
        transactional_id,
        settings: settings.clone(),
        producer_resets: 0,
        aborts: 0,
        restorer: Restorer::new(settings)?,
        offsets: source::side_client_config(settings, "offsets")?
            .create()
            .map_err(|e| anyhow::anyhow!("cannot create the Kafka client for end offsets: {e}"))?,
        readiness,
        assigned: BTreeSet::new(),
        stream_time: HashMap::new(),
        scanned_at: HashMap::new(),
        scans: HashMap::new(),
        next_offset: HashMap::new(),
        committed: HashMap::new(),
        watermarks: HashMap::new(),
        held: BTreeSet::new(),
        queues: Queues::new(wake.clone()),
        wake: wake.clone(),
        ready: Vec::new(),
        output: Output::default(),
        processed: HashMap::new(),
        rewind: false,
    };
    let core = Arc::new(Mutex::new(core));
    // Each input partition it may be given has a queue of its own (`intake`).
    let partition_queues = inputs.iter().flatten().count() * partitions as usize;
    let mut consumer: GroupConsumer = source::group_consumer_config(settings, partition_queues)?
        .create_with_context(GroupContext { core: core.clone() })
        .map_err(|e| anyhow::anyhow!("cannot create the Kafka consumer: {e}"))?;
    let woken = wake.clone();
    consumer.set_nonempty_callback(move || woken.notify());
    let consumer = Arc::new(consumer);
    let subscribed: Vec<&str> = inputs.iter().flatten().map(String::as_str).collect();
    for t in &subscribed {
        metrics::counter!(telemetry::MESSAGES_CONSUMED, "topic" => t.to_string()).increment(0);
    }
    consumer
        .subscribe(&subscribed)
        .context("cannot subscribe")?;
    tracing::info!(worker = index, topics = ?subscribed, group = %settings.group_id, "Consuming.");

    Ok(move |stop: &CancellationToken| {
        // Every line the worker logs (its callbacks' too: they run in its polls) says which.
        let _worker = tracing::info_span!("worker", worker = index).entered();
        let result = process_loop(&consumer, &core, &wake, stop);
        // Drain: the last commit, then leave the group (its revoke callback finds nothing
        // open), then the store closes with the core. After an error the open transaction
        // may hold half a batch: it is aborted instead.
        let last = {
            let mut core = core.lock().unwrap_or_else(|e| e.into_inner());
            let last = if result.is_ok() {
                core.commit(&consumer, false)
            } else {
                core.committer.abort();
                core.state.clear();
                Ok(())
            };
            // The partition queues hold the consumer: released before it closes.
            core.queues.clear();
            last
        };
        match &last {
            Ok(()) if result.is_ok() => tracing::info!("Committed; leaving the group."),
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "Final commit failed; the last records are processed again after a restart.")
            }
        }
        consumer.unsubscribe();
        drop(consumer);
        result.and(last)
    })
}

/// Polls, processes and commits until `shutdown` is cancelled or a fatal error.
fn process_loop(
    consumer: &Arc<GroupConsumer>,
    core: &Mutex<Core>,
    wake: &Wake,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut msgs: Vec<OwnedMessage> = Vec::new();
    let events = source::QueueLength::consumer(consumer.as_ref());
    let (max_records, max_wait) = {
        let c = core.lock().unwrap_or_else(|e| e.into_inner());
        (c.max_records, c.max_wait)
    };
    while !shutdown.is_cancelled() {
        let wait = core.lock().unwrap_or_else(|e| e.into_inner()).poll_wait();
        msgs.clear();
        gather(
            consumer,
            events.as_ref(),
            core,
            wake,
            wait,
            (max_records, max_wait),
            &mut msgs,
        );
        let mut core = core.lock().unwrap_or_else(|e| e.into_inner());
        core.readiness.beat();
        core.accept(msgs.drain(..));
        core.step(consumer)?;
    }
    Ok(())
}

/// Takes the records of one turn of the loop: waits up to `wait` for the first, then up to
/// `batch.max-wait-ms` for `batch.max-records`. The consumer's own queue is served first,
/// without the core: the rebalance callbacks run inside its `poll` and take it; `events` is
/// its length (`None`: nothing to serve there).
fn gather(
    consumer: &GroupConsumer,
    events: Option<&source::QueueLength>,
    core: &Mutex<Core>,
    wake: &Wake,
    wait: Duration,
    (max_records, max_wait): (usize, Duration),
    msgs: &mut Vec<OwnedMessage>,
) {
    let start = Instant::now();
    let mut fill_until = None;
    loop {
        wake.clear();
        let from = msgs.len();
        let mut polls = 0;
        while msgs.len() < max_records && polls < max_records && events.is_some_and(|q| q.get() > 0)
        {
            if let Some(r) = consumer.poll(Duration::ZERO) {
                intake::take(r, msgs);
            }
            polls += 1;
        }
        let settle = {
            let mut core = core.lock().unwrap_or_else(|e| e.into_inner());
            core.fill(msgs, from, max_records);
            core.committer.finished()
        };
        // A commit done beside the batches is settled without waiting for records.
        if msgs.len() >= max_records || (settle && msgs.is_empty()) {
            return;
        }
        let now = Instant::now();
        let until = match (msgs.is_empty(), fill_until) {
            (true, _) => start + wait,
            (false, Some(until)) => until,
            (false, None) => *fill_until.insert(now + max_wait),
        };
        if now >= until {
            return;
        }
        wake.wait_until(until);
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Everything the loop and the rebalance callbacks share.
pub struct Core {
    /// Which worker of the process this is.
    worker: usize,
    /// Input topic names by [`NAV`], [`REPARTITION`], [`TX`]; `None` when not read.
    inputs: [Option<String>; INPUTS],
    /// Partitions of each input.
    partitions: u32,
    max_records: usize,
    max_wait: Duration,
    decoder: Decoder,
    /// Where the model watcher leaves newly checked models.
    reloads: ReloadHandle,
    processor: Processor,
    merge: Merge<Record>,
    /// State changed since the last commit: read first, written to the store at the commit.
    state: StateBatch,
    store: Store,
    committer: Committer,
    transactional_id: String,
    settings: Settings,
    /// Producers made anew after fatal errors, in a row.
    producer_resets: u32,
    /// Transactions aborted in a row (reset by a commit): the wait before the next attempt
    /// grows with it.
    aborts: u32,
    restorer: Restorer,
    /// Asks the broker for partitions' end offsets on a connection of its own: the group
    /// consumer's may be holding a fetch for up to `fetch.wait.max.ms`, and a request sent
    /// behind it waits as long.
    offsets: BaseConsumer,
    readiness: WorkerReadiness,
    assigned: BTreeSet<i32>,
    /// Committed stream time per partition.
    stream_time: HashMap<i32, i64>,
    /// Stream time at the end of a partition's last expiry scan.
    scanned_at: HashMap<i32, i64>,
    /// Expiry scans under way: where each goes on at the next commit.
    scans: HashMap<i32, ScanCursor>,
    /// Next offset to arrive per (input, partition): the last delivered + 1, or where the
    /// partition resumed.
    next_offset: HashMap<(usize, i32), i64>,
    /// Committed input offset per (input, partition): where a rewind goes.
    committed: HashMap<(usize, i32), i64>,
    /// End offset per (input, partition) asked of the broker, and when.
    watermarks: HashMap<(usize, i32), (i64, Instant)>,
    /// Input partitions whose queue is not read (or, without a queue of their own, which
    /// are paused) because the merge holds too many of their records.
    held: BTreeSet<(usize, i32)>,
    /// Each assigned input partition's own queue.
    queues: Queues,
    /// Wakes the loop: records arrived, or a commit beside the batches is done.
    wake: Arc<Wake>,
    ready: Vec<Queued<Record>>,
    output: Output,
    /// Next offset per (input, partition) processed in the current batch.
    processed: HashMap<(usize, i32), i64>,
    /// A transaction was aborted: rewind to the committed offsets before going on.
    rewind: bool,
}

impl Core {
    /// How long the next poll may wait: until a commit is due, or a held-back record may go.
    fn poll_wait(&self) -> Duration {
        let mut wait = Duration::from_millis(100);
        if let Some(due) = self.committer.due_in() {
            wait = wait.min(due);
        }
        if self.merge.buffered() > 0 || self.restorer.restoring() > 0 {
            wait = wait.min(self.max_wait.max(Duration::from_millis(1)));
        }
        wait
    }

    fn input_of(&self, topic: &str) -> Option<usize> {
        self.inputs.iter().position(|t| t.as_deref() == Some(topic))
    }

    /// Takes records from the partitions' own queues into `msgs`, up to `max`; drops those
    /// that came through the consumer's queue (from index `from` on) for a partition whose
    /// queue is split off: fetched before its restore, and read again from the committed
    /// offset since.
    fn fill(&mut self, msgs: &mut Vec<OwnedMessage>, from: usize, max: usize) {
        if msgs.len() > from {
            let polled = msgs.split_off(from);
            msgs.extend(polled.into_iter().filter(|m| {
                self.input_of(m.topic())
                    .is_none_or(|i| !self.queues.is_split(i, m.partition()))
            }));
        }
        self.queues.fill(msgs, max, &self.held);
    }

    /// Decodes and buffers consumed messages.
    fn accept(&mut self, msgs: impl Iterator<Item = OwnedMessage>) {
        let mut consumed = [0u64; INPUTS];
        let now = Instant::now();
        for msg in msgs {
            let Some(input) = self.input_of(msg.topic()) else {
                continue;
            };
            let p = msg.partition();
            // Fetched before the partition was paused for its restore: read again from the
            // committed offset once restored.
            if !self.assigned.contains(&p) || self.restorer.is_restoring(p) {
                continue;
            }
            consumed[input] += 1;
            self.next_offset.insert((input, p), msg.offset() + 1);
            let q = intake::accept(&self.decoder, input, self.partitions, msg, now);
            self.merge.push(q);
        }
        for (i, n) in consumed.into_iter().enumerate() {
            if n > 0 {
                if let Some(topic) = &self.inputs[i] {
                    metrics::counter!(telemetry::MESSAGES_CONSUMED, "topic" => topic.clone())
                        .increment(n);
                }
            }
        }
    }

    /// One turn of the loop after a poll: restores, the merge, a batch, maybe a commit.
    fn step(&mut self, consumer: &Arc<GroupConsumer>) -> anyhow::Result<()> {
        if self.committer.finished() || self.committer.must_settle() {
            self.settle(consumer)?;
        }
        if self.rewind {
            self.rewind(consumer);
        }
        self.restore_step(consumer)?;
        self.flow_control(consumer);
        self.select(consumer);
        if !self.ready.is_empty() {
            // Between batches: a model checked by the watcher takes over here, so that
            // every batch is scored by one model.
            if let Some(new) = self.reloads.take(self.worker) {
                if let Some(requirements) = self.processor.swap(new)? {
                    self.decoder.set_requirements(requirements);
                }
            }
            let started = Instant::now();
            self.process_batch(consumer)?;
            metrics::histogram!(telemetry::BATCH_DURATION).record(started.elapsed().as_secs_f64());
        }
        if self.committer.due_in() == Some(Duration::ZERO) {
            self.commit(consumer, true)?;
        }
        Ok(())
    }

    fn select(&mut self, consumer: &GroupConsumer) {
        self.ready.clear();
        let mut progress = ConsumerProgress {
            consumer,
            offsets: &self.offsets,
            inputs: &self.inputs,
            next_offset: &self.next_offset,
            watermarks: &mut self.watermarks,
        };
        let seen = self.merge.select(
            &mut progress,
            self.max_records,
            Instant::now(),
            &mut self.ready,
        );
        let merge_wait = metrics::histogram!(telemetry::MERGE_WAIT);
        for w in seen.tx_waits {
            merge_wait.record(w.as_secs_f64());
        }
        for g in seen.gave_up {
            let waited_ms = g.waited.as_millis() as u64;
            if g.behind {
                tracing::warn!(
                    partition = g.partition,
                    waited_ms,
                    "An input of this partition has records on the broker that were not fetched in time; processing without them, they will count late (batch.max-fetch-wait-ms)."
                );
            } else {
                tracing::info!(
                    partition = g.partition,
                    waited_ms,
                    "An input of this partition brought nothing new in time; processing without it (batch.max-task-idle-ms)."
                );
            }
        }
    }

    fn process_batch(&mut self, consumer: &GroupConsumer) -> anyhow::Result<()> {
        self.processed.clear();
        for q in &self.ready {
            let e = self.processed.entry((q.input, q.partition)).or_insert(0);
            *e = (*e).max(q.item.msg.offset() + 1);
        }
        let ready = std::mem::take(&mut self.ready);
        let loader = crate::state::Committing {
            batch: self.committer.committing(),
            below: &self.store,
        };
        let result = self.processor.process(
            &ready,
            &mut self.state,
            &loader,
            &self.stream_time,
            now_ms(),
            &mut self.output,
        );
        self.ready = ready;
        result?;
        let inputs = &self.inputs;
        let processed = self
            .processed
            .iter()
            .filter_map(|(&(i, p), &next)| inputs[i].as_ref().map(|t| (t.clone(), p, next)));
        let sent = self
            .committer
            .send(&mut self.output, processed.collect::<Vec<_>>());
        if let Err(e) = sent {
            self.output.clear();
            self.failed(consumer, e)?;
        }
        Ok(())
    }

    /// Commits what was processed, expiring idle state first where due; with `behind`, the
    /// commit runs beside the next batches (settled by a later step), else it is waited for.
    /// A commit in flight is settled first.
    fn commit(
        &mut self,
        consumer: &BaseConsumer<GroupContext>,
        behind: bool,
    ) -> anyhow::Result<()> {
        self.settle(consumer)?;
        if !self.committer.is_open() {
            return Ok(());
        }
        self.expire();
        // The batches after this one take its stream time as known (a failure reads the
        // committed one back from the store).
        let moved = self.state.stream_time.clone();
        self.stream_time.extend(moved);
        let done = if behind {
            self.committer
                .start(consumer, &mut self.state)
                .map(|()| None)
        } else {
            self.committer
                .commit(consumer, &mut self.state, &self.store)
        };
        self.committed(consumer, done)
    }

    /// Waits for the commit in flight, if any, and takes its outcome.
    fn settle(&mut self, consumer: &BaseConsumer<GroupContext>) -> anyhow::Result<()> {
        let done = self.committer.settle(&self.store);
        self.committed(consumer, done)
    }

    fn committed(
        &mut self,
        consumer: &BaseConsumer<GroupContext>,
        done: Result<Option<commit::Committed>, CommitError>,
    ) -> anyhow::Result<()> {
        match done {
            Ok(Some(done)) => {
                self.advance(done);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => self.failed(consumer, e),
        }
    }

    /// A commit is done: its offsets are where a rewind goes.
    fn advance(&mut self, done: commit::Committed) {
        self.producer_resets = 0;
        self.aborts = 0;
        for ((topic, p), next) in done.offsets {
            if let Some(i) = self.input_of(&topic) {
                self.committed.insert((i, p), next);
            }
        }
    }

    /// After a failed send or commit: drop what is uncommitted and rewind; a fatal producer
    /// error makes a new producer (which fences the old one), a few times at most.
    fn failed(
        &mut self,
        consumer: &BaseConsumer<GroupContext>,
        e: CommitError,
    ) -> anyhow::Result<()> {
        // A commit still in flight is dropped with the rest, unless it succeeded.
        match self.committer.settle(&self.store) {
            Ok(Some(done)) => self.advance(done),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "The commit in flight failed too."),
        }
        match e {
            CommitError::Aborted(why) => {
                self.aborts += 1;
                let wait = abort_backoff(self.aborts);
                tracing::warn!(reason = %why, aborts_in_row = self.aborts, wait_ms = wait.as_millis() as u64, "Transaction aborted; processing again from the last commit.");
                self.committer.abort();
                std::thread::sleep(wait);
            }
            CommitError::Permanent(why) => {
                self.committer.abort();
                anyhow::bail!(why);
            }
            CommitError::Fatal(why) => {
                self.producer_resets += 1;
                if self.producer_resets > MAX_PRODUCER_RESETS {
                    anyhow::bail!("the transactional producer keeps failing ({why}); stopping");
                }
                tracing::warn!(reason = %why, "The transactional producer failed for good (fenced?); making a new one and processing again from the last commit.");
                self.committer =
                    Committer::new(&self.settings, &self.transactional_id, self.wake.clone())?;
            }
            CommitError::State(e) => return Err(e.into()),
        }
        self.state.clear();
        self.merge.clear();
        self.ready.clear();
        let partitions: Vec<i32> = self.stream_time.keys().copied().collect();
        for p in partitions {
            match self.store.stream_time(p) {
                Ok(Some(t)) => {
                    self.stream_time.insert(p, t);
                }
                Ok(None) => {
                    self.stream_time.remove(&p);
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.rewind = true;
        self.rewind(consumer);
        Ok(())
    }

    /// Seeks every assigned input partition back to its committed offset.
    fn rewind(&mut self, consumer: &BaseConsumer<GroupContext>) {
        self.rewind = false;
        for &p in &self.assigned {
            if self.restorer.is_restoring(p) {
                continue;
            }
            for (i, t) in self.inputs.iter().enumerate() {
                let Some(t) = t else { continue };
                let to = match self.committed.get(&(i, p)) {
                    Some(&o) => Offset::Offset(o),
                    None => Offset::Beginning,
                };
                if let Err(e) = consumer.seek(t, p, to, Duration::from_secs(10)) {
                    tracing::warn!(topic = %t, partition = p, error = %e, "Cannot rewind; retrying.");
                    self.rewind = true;
                }
                if let Offset::Offset(o) = to {
                    self.next_offset.insert((i, p), o);
                }
            }
        }
    }

    /// Drops what is buffered and uncommitted of a partition that is no longer this
    /// instance's.
    fn forget(&mut self, p: i32) {
        self.assigned.remove(&p);
        self.queues.drop_partition(p);
        self.merge.drop_partition(p);
        self.state.drop_partition(p);
        self.stream_time.remove(&p);
        self.scanned_at.remove(&p);
        self.scans.remove(&p);
        for i in 0..INPUTS {
            self.next_offset.remove(&(i, p));
            self.committed.remove(&(i, p));
            self.watermarks.remove(&(i, p));
            self.held.remove(&(i, p));
        }
        self.readiness.set_assigned(self.assigned.len());
    }

    /// Expiry: entities idle, by their own partition's stream time, for longer than the TTL
    /// and the grace for late events are deleted, with a changelog tombstone each. Scans a
    /// partition once its stream time has moved [`EXPIRY_EVERY_MS`] since the last scan
    /// ended (the first at its first commit), [`EXPIRY_SCAN_BUDGET`] entities per commit.
    fn expire(&mut self) {
        let moved: Vec<(i32, i64)> = self
            .state
            .stream_time
            .iter()
            .map(|(&p, &t)| (p, t))
            .collect();
        let mut budget = EXPIRY_SCAN_BUDGET;
        for (p, t) in moved {
            if budget == 0 {
                break;
            }
            let last = self.scanned_at.get(&p).copied();
            let due = last.is_none_or(|last| t.saturating_sub(last) >= EXPIRY_EVERY_MS);
            if !due && !self.scans.contains_key(&p) {
                continue;
            }
            let cutoff = t.saturating_sub(ENTITY_TTL_MS + EXPIRY_GRACE_MS);
            let n = self.state.expire_idle(p, cutoff);
            if n > 0 {
                metrics::counter!(telemetry::EXPIRED).increment(n as u64);
            }
            let cursor = self.scans.entry(p).or_default();
            let mut idle = Vec::new();
            match self.store.idle(p, cutoff, cursor, &mut budget, &mut idle) {
                Ok(done) => {
                    // What the open transaction holds now is live (the idle ones of it were
                    // expired above).
                    let expired: std::collections::HashSet<crate::state::Key> =
                        self.state.expired.iter().map(|(_, k)| *k).collect();
                    let mut n = 0u64;
                    for (kind, key) in idle {
                        let held = match kind {
                            crate::state::EntityKind::Customer => {
                                self.state.customers.contains_key(&key)
                            }
                            crate::state::EntityKind::Merchant => {
                                self.state.merchants.contains_key(&key)
                            }
                            crate::state::EntityKind::Session => {
                                self.state.sessions.contains_key(&key)
                            }
                        };
                        if held || expired.contains(&key) {
                            continue;
                        }
                        self.state.expired.push((kind, key));
                        n += 1;
                    }
                    if n > 0 {
                        metrics::counter!(telemetry::EXPIRED).increment(n);
                    }
                    tracing::debug!(
                        partition = p,
                        stream_time = t,
                        cutoff,
                        expired = n,
                        done,
                        "Expiry scan."
                    );
                    if done {
                        self.scans.remove(&p);
                        self.scanned_at.insert(p, t);
                    }
                }
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "Expiry scan failed; going on at the next commit.")
                }
            }
        }
    }

    /// Stops reading the queue of an input partition whose records pile up in the merge
    /// (the other input of its task is behind, or the pipeline is), and reads it again once
    /// they drain to half: memory bounded in records and in bytes (`batch.max-buffered-bytes`,
    /// shared by the assigned input partitions). librdkafka stops fetching for the partition
    /// at its prefetch limits by itself and keeps what it fetched; pausing the partition
    /// instead made it drop that at the resume, to fetch and parse it again. A partition
    /// that has no queue of its own (its
    /// records come through the consumer's) is paused.
    fn flow_control(&mut self, consumer: &GroupConsumer) {
        let inputs = self.inputs.iter().flatten().count();
        // Shared by the process's workers, then by this worker's input partitions.
        let byte_share = (self.settings.batch.max_buffered_bytes
            / self.settings.processing.workers.max(1)
            / (self.assigned.len() * inputs).max(1))
        .max(MIN_PARTITION_BYTES);
        metrics::gauge!(telemetry::MERGE_BUFFERED_BYTES, "worker" => self.worker.to_string())
            .set(self.merge.buffered_bytes() as f64);
        for &p in &self.assigned {
            if self.restorer.is_restoring(p) {
                continue;
            }
            for (i, topic) in self.inputs.iter().enumerate() {
                let Some(topic) = topic else { continue };
                let (n, bytes) = self.merge.queued(i, p);
                let key = (i, p);
                let held = self.held.contains(&key);
                let hold = if held {
                    n >= HOLD_AT / 2 || bytes >= byte_share / 2
                } else {
                    n >= HOLD_AT || bytes >= byte_share
                };
                if hold == held {
                    continue;
                }
                if !self.queues.is_split(i, p) {
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition(topic, p);
                    let done = if hold {
                        consumer.pause(&tpl)
                    } else {
                        consumer.resume(&tpl)
                    };
                    if done.is_err() {
                        continue;
                    }
                }
                if hold {
                    self.held.insert(key);
                } else {
                    self.held.remove(&key);
                }
            }
        }
    }
}

/// Whether an input partition is read to its end, as the consumer knows it.
struct ConsumerProgress<'a> {
    consumer: &'a GroupConsumer,
    offsets: &'a BaseConsumer,
    inputs: &'a [Option<String>; INPUTS],
    next_offset: &'a HashMap<(usize, i32), i64>,
    watermarks: &'a mut HashMap<(usize, i32), (i64, Instant)>,
}

impl Progress for ConsumerProgress<'_> {
    /// The consumer's position (which steps over transaction markers, never delivered)
    /// has reached the partition's end; not while the position is unknown. The end is
    /// librdkafka's high watermark from its last fetch response; failing that (before the
    /// first fetch, or while a transaction upstream is open, when the high watermark is past
    /// what `read_committed` may read), the last stable offset asked of the broker (by a
    /// client of its own), at most every [`WATERMARK_TTL`].
    fn caught_up(&mut self, input: usize, p: i32) -> bool {
        let Some(topic) = &self.inputs[input] else {
            return true;
        };
        let delivered = self.next_offset.get(&(input, p)).copied();
        let Some(next) = source::position(self.consumer, topic, p).max(delivered) else {
            return false;
        };
        if source::cached_high_watermark(self.consumer, topic, p).is_some_and(|high| next >= high) {
            return true;
        }
        if let Some((high, at)) = self.watermarks.get(&(input, p)) {
            if next < *high {
                return false;
            }
            if at.elapsed() < WATERMARK_TTL {
                return true;
            }
        }
        match self
            .offsets
            .fetch_watermarks(topic, p, Duration::from_secs(2))
        {
            Ok((_, high)) => {
                self.watermarks.insert((input, p), (high, Instant::now()));
                next >= high
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abort_backoff_grows_to_five_seconds_within_its_upper_half() {
        assert_eq!(abort_backoff(1), Duration::ZERO);
        for (aborts, cap) in [(2, 100), (3, 200), (4, 400), (8, 5_000), (40, 5_000)] {
            for _ in 0..50 {
                let ms = abort_backoff(aborts).as_millis() as u64;
                assert!(
                    (cap / 2..=cap).contains(&ms),
                    "abort {aborts}: {ms} ms outside [{}, {cap}]",
                    cap / 2
                );
            }
        }
    }
}
