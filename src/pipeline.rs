//! The service: consume a batch, decode, score per partition, produce verdicts and dead
//! letters, wait for the broker's acknowledgements, store offsets. Repeat until shutdown.
//!
//! Guarantees: every consumed transaction gets a verdict or a dead letter before its offset
//! is stored (at-least-once); a re-delivered transaction gets the same verdict again, since
//! its score depends on the message and the model only. Shutdown (the token is cancelled on
//! SIGTERM/SIGINT): stop polling, finish the batch in hand, flush the producer, commit the
//! stored offsets synchronously, return `Ok`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::{Settings, VerdictFormat};
use crate::decision::rules::{self, RuleSet};
use crate::decision::{combine, Decision, Reason, ShadowScore, Verdict};
use crate::decode::{DecodeError, Decoder, ErrorKind, NavigationEvent, Transaction};
use crate::features::{engine, FeatureSet};
use crate::model::reload::{self, ReloadHandle, Role};
use crate::model::runner::{Runner, Unscored};
use crate::model::{self, Model, ModelView};
use crate::sink::{OutRecord, Sink, Topic};
use crate::source::global::GlobalReader;
use crate::source::restore::Restorer;
use crate::source::{self, Changes, Source};
use crate::state::global::GlobalTables;
use crate::state::{marker_record, EntityKind, Hasher, Key, StateBatch, Store};
use crate::telemetry::{self, Readiness};

/// Dead-letter header names.
pub mod headers {
    pub const ERROR_KIND: &str = "fraudstream.error.kind";
    pub const ERROR_MESSAGE: &str = "fraudstream.error.message";
    pub const SOURCE_TOPIC: &str = "fraudstream.source.topic";
    pub const SOURCE_PARTITION: &str = "fraudstream.source.partition";
    pub const SOURCE_OFFSET: &str = "fraudstream.source.offset";
    /// On a repartitioned record: what it is (`transaction` or `navigation`).
    pub const KIND: &str = "fraudstream.kind";
}

/// Records of one input partition the merge may hold before its fetching is paused.
const PAUSE_AT: usize = 50_000;

/// How long a partition's high watermark read from the broker is trusted.
const WATERMARK_TTL: Duration = Duration::from_millis(20);

/// The inputs of a task, in tie-break order: at equal event time, a navigation event is
/// applied before a transaction, so the page view of the same millisecond counts.
const NAV: usize = 0;
const REPARTITION: usize = 1;
const TX: usize = 2;

/// Runs fraudstream until `shutdown` is cancelled. Errors are fatal: the caller exits
/// non-zero, and nothing unacknowledged was committed.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    // SIGHUP reloads the model (and would otherwise end the process).
    let reloads = ReloadHandle::default();
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
    let readiness = Readiness::default();
    let prometheus = telemetry::install().context("cannot install the metrics recorder")?;
    // Export every counter from the start, at zero, so rates and dashboards work before
    // the first event of each kind.
    for kind in ErrorKind::ALL {
        metrics::counter!(telemetry::DEAD_LETTERS, "kind" => kind.as_str()).increment(0);
    }
    for d in Decision::ALL {
        metrics::counter!(telemetry::VERDICTS, "decision" => d.as_str()).increment(0);
    }
    metrics::counter!(telemetry::PRODUCE_RETRIES).increment(0);
    metrics::counter!(telemetry::RESTORED_RECORDS).increment(0);
    metrics::counter!(telemetry::REPARTITIONED).increment(0);
    for table in ["labels", "blocklist"] {
        metrics::gauge!(telemetry::GLOBAL_ENTRIES, "table" => table).set(0.0);
    }
    let (addr, http) = telemetry::serve(
        settings.metrics.listen,
        prometheus,
        readiness.clone(),
        reloads.clone(),
        shutdown.clone(),
    )
    .await?;
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
    let rule_set = match &settings.decision.rules {
        Some(path) => {
            let r = RuleSet::load(path)?;
            tracing::info!(version = %r.version, rules = r.rules.len(), "Rules loaded.");
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
    let decoder = Decoder::new(&settings.input, model.features.requirements())?;
    let store = Store::open(&settings.state.path)?;
    let secret = settings.state.hmac_secret.resolve("state.hmac-secret")?;
    if secret == crate::config::DEV_HMAC_SECRET {
        tracing::warn!("Using the development HMAC secret for state keys; set state.hmac-secret in production.");
    }
    let hasher = Hasher::new(secret.as_bytes());
    let audit = if settings.output.audit_features {
        Some(audit_set(&model.features)?)
    } else {
        None
    };
    let view = model.view();
    let budget = settings.decision.latency_budget_ms;
    let runner = Runner::start(model, (budget > 0).then(|| Duration::from_millis(budget)))
        .context("cannot start the model thread")?;
    let enabled = &settings.decision.enabled_merchants;
    let sink = Sink::new(&settings)?;
    let (consumer, changes) = source::consumer(&settings, readiness.clone())?;
    let topics = &settings.topics;
    let navigation = (!topics.navigation.is_empty()).then(|| topics.navigation.clone());
    let mut required = vec![
        topics.transactions.as_str(),
        &topics.verdicts,
        &topics.dead_letter,
    ];
    required.extend(navigation.as_deref());
    source::check_topics(&consumer, &required, &shutdown).await?;

    // Co-partitioning: partition p of every input is one task, on one instance.
    let repartition = settings.repartition_topic();
    let changelog = settings.state.changelog.then(|| settings.changelog_topic());
    let mut names = vec![topics.transactions.as_str()];
    names.extend(navigation.as_deref());
    let counts = source::partition_counts(&consumer, &names)?;
    let partitions = counts[0].unwrap_or(0);
    if let (Some(nav), Some(n)) = (&navigation, counts.get(1)) {
        let n = n.unwrap_or(0);
        if n != partitions {
            anyhow::bail!(
                "topic `{nav}` (navigation) has {n} partitions but `{}` (transactions) has {partitions}: they must be co-partitioned (same key, same partition count)",
                topics.transactions
            );
        }
    }
    let mut internal = vec![(repartition.clone(), false)];
    internal.extend(changelog.iter().map(|c| (c.clone(), true)));
    source::restore::create_internal_topics(&settings, &internal, partitions as i32).await?;
    let names: Vec<&str> = internal.iter().map(|(n, _)| n.as_str()).collect();
    for (name, n) in names
        .iter()
        .zip(source::partition_counts(&consumer, &names)?)
    {
        let n = n.unwrap_or(0);
        if n != partitions {
            anyhow::bail!(
                "internal topic `{name}` has {n} partitions but `{}` has {partitions}; recreate it with {partitions}",
                topics.transactions
            );
        }
    }

    let global = GlobalReader::start(&settings, hasher.clone(), shutdown.clone())?;
    global.wait_loaded(&shutdown).await?;
    readiness.set_global_loaded(true);
    let restorer = match &changelog {
        Some(_) => Some(Restorer::new(&settings)?),
        None => None,
    };

    let mut inputs: [Option<String>; 3] = [None, None, None];
    inputs[NAV] = navigation;
    inputs[REPARTITION] = Some(repartition);
    inputs[TX] = Some(topics.transactions.clone());
    let subscribed: Vec<&str> = inputs.iter().flatten().map(String::as_str).collect();
    for t in &subscribed {
        metrics::counter!(telemetry::MESSAGES_CONSUMED, "topic" => t.to_string()).increment(0);
    }
    consumer
        .subscribe(&subscribed)
        .context("cannot subscribe")?;
    tracing::info!(topics = ?subscribed, group = %settings.group_id, "Consuming.");

    let mut worker = Worker {
        decoder,
        model: view,
        runner,
        unscored_since: None,
        shadow,
        reloads,
        rules: rule_set,
        rule_rows: Vec::new(),
        fired: Vec::new(),
        contributions: Vec::new(),
        model_reasons: settings.decision.model_reasons,
        enabled: (!enabled.is_empty()).then(|| enabled.iter().cloned().collect()),
        rejected: Vec::new(),
        store,
        hasher,
        audit,
        global: global.tables.clone(),
        restorer,
        readiness,
        changes,
        inputs,
        max_task_idle: Duration::from_millis(settings.batch.max_task_idle_ms),
        tasks: BTreeMap::new(),
        next_offset: HashMap::new(),
        buffered: 0,
        watermarks: HashMap::new(),
        paused: BTreeSet::new(),
        state: StateBatch::default(),
        applied: HashMap::new(),
        ready: Vec::new(),
        rows: Vec::new(),
        audit_rows: Vec::new(),
        shadow_rows: Vec::new(),
        shadow_ok: Vec::new(),
        shadow_scores: Vec::new(),
        verdict_format: settings.output.verdict_format,
        verdict_schema_id: settings.output.verdict_schema_id,
        records: Vec::new(),
        markers: Vec::new(),
        repair: Vec::new(),
        decisions: Vec::new(),
    };
    let result = consume_loop(&settings, &consumer, &sink, &mut worker, &shutdown).await;

    // Drain: the batch in hand is finished (or failed) by now.
    if let Err(e) = sink.flush(Duration::from_secs(30)) {
        tracing::warn!(error = %e, "Producer flush incomplete.");
    }
    if result.is_ok() {
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => tracing::info!("Offsets committed."),
            // Nothing stored since the last commit.
            Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => {}
            Err(e) => {
                tracing::warn!(error = %e, "Final commit failed; the last batches will be re-delivered.")
            }
        }
    }
    consumer.unsubscribe();
    shutdown.cancel();
    let _ = http.await;
    result
}

async fn consume_loop(
    settings: &Settings,
    consumer: &Source,
    sink: &Sink,
    worker: &mut Worker,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let max_records = settings.batch.max_records;
    let max_wait = Duration::from_millis(settings.batch.max_wait_ms);
    let mut consumed: HashMap<usize, u64> = HashMap::new();
    loop {
        // Wait for a message; with records held back by the merge, only until one of them
        // may go regardless.
        let first_wait = if worker.buffered > 0 {
            worker
                .max_task_idle
                .min(max_wait.max(Duration::from_millis(1)))
        } else {
            Duration::from_secs(3600)
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(first_wait) => {}
            m = consumer.recv() => {
                worker.handle_changes(consumer)?;
                match m {
                    Ok(m) => worker.accept(m.detach(), &mut consumed),
                    Err(e) => tracing::warn!(error = %e, "Consumer error."),
                }
            }
        }
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + max_wait;
        // Count what arrives, not what is buffered: records held back by the merge must not
        // stop the consumer from reading the other input's records queued behind them.
        let mut received = 1;
        while received < max_records {
            received += 1;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(deadline) => break,
                m = consumer.recv() => {
                    worker.handle_changes(consumer)?;
                    match m {
                        Ok(m) => worker.accept(m.detach(), &mut consumed),
                        Err(e) => tracing::warn!(error = %e, "Consumer error."),
                    }
                }
            }
        }
        for (input, n) in consumed.drain() {
            if let Some(topic) = &worker.inputs[input] {
                metrics::counter!(telemetry::MESSAGES_CONSUMED, "topic" => topic.clone())
                    .increment(n);
            }
        }

        // A rebalance callback may have run inside a recv that the deadline then cut short:
        // drop what was revoked before processing anything (its new owner may be restoring).
        worker.handle_changes(consumer)?;
        worker.select_ready(consumer, max_records);
        worker.flow_control(consumer);
        if worker.ready.is_empty() {
            continue;
        }
        // Between batches: a model checked by the watcher takes over here, so that every
        // batch is scored by one model.
        worker.swap_models()?;
        worker.process()?;
        sink.deliver(&worker.records, shutdown).await?;
        let acked_ms = now_ms();
        worker.record_delivered(acked_ms);
        // The changelog markers only once the verdicts and the entity records are acked: a
        // restore applies nothing after the last marker, so restored state never includes a
        // transaction whose verdict might be missing.
        let changelog = sink.deliver(&worker.markers, shutdown).await?;
        // State after the output: a crash in between re-delivers the batch, which is then
        // scored again from the old state into identical verdicts. After this write, messages
        // at or below the applied offsets are skipped, so state is applied exactly once.
        worker.state.changelog = changelog;
        worker.commit_state()?;
        store_offsets(consumer, &worker.ready);
        metrics::histogram!(telemetry::BATCH_DURATION).record(started.elapsed().as_secs_f64());
    }
}

/// Stores `offset + 1` of the last message of each partition in the batch.
fn store_offsets(consumer: &Source, batch: &[Pending]) {
    let mut last: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for p in batch {
        let m = &p.msg;
        let e = last.entry((m.topic(), m.partition())).or_insert(m.offset());
        *e = (*e).max(m.offset());
    }
    let mut tpl = TopicPartitionList::with_capacity(last.len());
    for ((topic, partition), offset) in last {
        // add_partition_offset only fails for an invalid offset, which +1 of a real one is not.
        let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(offset + 1));
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        // The partition was revoked while the batch was in flight: its new owner starts
        // from the last commit and produces the same verdicts again.
        tracing::info!(error = %e, "Offsets not stored (partition revoked); the new owner re-scores them.");
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A consumed message waiting for its turn in its partition's timestamp order.
struct Pending {
    msg: OwnedMessage,
    input: usize,
    event: Event,
    /// Event time; `i64::MIN` for records that touch no state (they go first).
    ts: i64,
    arrived: Instant,
}

enum Event {
    Tx(Box<Transaction>),
    Nav(NavigationEvent),
    /// Poison: dead-lettered.
    Bad(DecodeError),
    /// Not keyed by its customer: re-keyed through the repartition topic (`kind` header).
    Forward {
        kind: &'static str,
        customer: String,
    },
}

/// Partition p of each input.
#[derive(Default)]
struct Task {
    queues: [VecDeque<Pending>; 3],
    /// Since when the task has been waiting for an input that is not caught up.
    blocked_since: Option<Instant>,
    /// The wait ran out (logged once per episode).
    idle_expired: bool,
}

/// The per-batch work, with buffers reused across batches.
struct Worker {
    decoder: Decoder,
    /// The primary model in service (its session is on the runner's thread).
    model: ModelView,
    runner: Runner,
    /// Since when batches have been decided without the model (logged at the transitions).
    unscored_since: Option<Instant>,
    rules: RuleSet,
    /// One row of `rules.features` per transaction of the partition being processed.
    rule_rows: Vec<f32>,
    /// The actions of the rules that fired for one transaction (reused).
    fired: Vec<Decision>,
    /// Per-feature contributions of one transaction (reused).
    contributions: Vec<f64>,
    /// How many features go into a verdict's reasons.
    model_reasons: usize,
    /// Merchants that are scored; `None`: all.
    enabled: Option<HashSet<String>>,
    /// Per transaction of the partition being processed: merchant not enabled.
    rejected: Vec<bool>,
    /// The challenger (`model.shadow`): scores, never decides.
    shadow: Option<Model>,
    /// Where the model watcher leaves newly checked models.
    reloads: ReloadHandle,
    store: Store,
    /// Turns entity identifiers into state keys.
    hasher: Hasher,
    /// With `output.audit-features`: the features put into each verdict.
    audit: Option<FeatureSet>,
    /// Labels and blocklist, kept current by their reader thread.
    global: Arc<RwLock<GlobalTables>>,
    /// With the changelog on: rebuilds a newly assigned partition's state.
    restorer: Option<Restorer>,
    readiness: Readiness,
    /// Assignment changes reported by the consumer's rebalance callbacks.
    changes: Arc<Mutex<Changes>>,
    /// Input topic names by [`NAV`], [`REPARTITION`], [`TX`]; `None` when not read.
    inputs: [Option<String>; 3],
    max_task_idle: Duration,
    /// Buffered records per partition.
    tasks: BTreeMap<i32, Task>,
    /// Next offset to arrive per (input, partition): with the high watermark, whether an
    /// input with nothing buffered is caught up.
    next_offset: HashMap<(usize, i32), i64>,
    /// Records buffered in `tasks`.
    buffered: usize,
    /// Input partitions paused because the merge holds too many of their records.
    paused: BTreeSet<(usize, i32)>,
    /// High watermark per (input, partition) and when it was read.
    watermarks: HashMap<(usize, i32), (i64, Instant)>,
    /// The batch's state changes and applied offsets, written after its output is acked.
    state: StateBatch,
    /// Applied offset per (input, partition), read from the store once, then kept current.
    applied: HashMap<(usize, i32), Option<i64>>,
    /// This batch's records, in processing order.
    ready: Vec<Pending>,
    rows: Vec<f32>,
    audit_rows: Vec<f32>,
    shadow_rows: Vec<f32>,
    /// Per transaction of `shadow_rows`: whether it carries what the shadow reads (a
    /// passthrough shadow cannot score a transaction without its vector; it is left out).
    shadow_ok: Vec<bool>,
    shadow_scores: Vec<f32>,
    verdict_format: VerdictFormat,
    verdict_schema_id: Option<u32>,
    /// What the batch produces: verdicts, dead letters, repartitioned records, changelog.
    records: Vec<OutRecord>,
    /// The batch's changelog markers, produced once `records` are acknowledged.
    markers: Vec<OutRecord>,
    /// Entities whose changelog value may be ahead of the restored state: re-written by
    /// the next batch.
    repair: Vec<(EntityKind, Key)>,
    /// (decision, event time) of each verdict in `records`, counted once acknowledged.
    decisions: Vec<(Decision, i64)>,
}

impl Worker {
    /// Applies rebalances reported since the last call: drops what was buffered for revoked
    /// partitions (their new owner reads them again from the last commit) and restores the
    /// state of assigned ones before any of their records is processed.
    fn handle_changes(&mut self, consumer: &Source) -> anyhow::Result<()> {
        let changes = match self.changes.lock() {
            Ok(mut c) if !c.assigned.is_empty() || !c.revoked.is_empty() => std::mem::take(&mut *c),
            _ => return Ok(()),
        };
        for p in &changes.revoked {
            if let Some(task) = self.tasks.remove(p) {
                self.buffered -= task.queues.iter().map(VecDeque::len).sum::<usize>();
            }
            self.applied.retain(|(_, q), _| q != p);
            self.next_offset.retain(|(_, q), _| q != p);
            self.watermarks.retain(|(_, q), _| q != p);
            self.paused.retain(|(_, q)| q != p);
        }
        let inputs: Vec<(usize, String)> = self
            .inputs
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.clone().map(|t| (i, t)))
            .collect();
        let mut pending = changes.assigned.len();
        self.readiness.set_restoring(pending);
        let names: Vec<&str> = inputs.iter().map(|(_, t)| t.as_str()).collect();
        for &p in &changes.assigned {
            self.applied.retain(|(_, q), _| *q != p);
            if let Some(r) = &self.restorer {
                let restored = r.restore(&self.store, p, &names)?;
                self.repair.extend(restored.repair);
            }
            pending -= 1;
            self.readiness.set_restoring(pending);
        }
        if changes.assigned.is_empty() {
            return Ok(());
        }
        // Where each input resumes: with the high watermark, whether it is caught up.
        let mut tpl = TopicPartitionList::new();
        for &p in &changes.assigned {
            for (_, t) in &inputs {
                tpl.add_partition(t, p);
            }
        }
        if let Ok(committed) = consumer.committed_offsets(tpl, Duration::from_secs(10)) {
            for &p in &changes.assigned {
                for (i, t) in &inputs {
                    let next = match committed.find_partition(t, p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => Some(o),
                        _ => consumer
                            .fetch_watermarks(t, p, Duration::from_secs(10))
                            .ok()
                            .map(|(low, _)| low),
                    };
                    if let Some(o) = next {
                        self.next_offset.insert((*i, p), o);
                    }
                }
            }
        }
        Ok(())
    }

    /// Pauses fetching an input partition whose records pile up in the merge (the other
    /// input of its task is behind), and resumes it once they drain: bounded memory, and
    /// the consumer's queue keeps room for the input being waited for.
    fn flow_control(&mut self, consumer: &Source) {
        for (&p, task) in &self.tasks {
            for i in 0..3 {
                let Some(topic) = &self.inputs[i] else {
                    continue;
                };
                let n = task.queues[i].len();
                let key = (i, p);
                let paused = self.paused.contains(&key);
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(topic, p);
                if !paused && n >= PAUSE_AT {
                    if consumer.pause(&tpl).is_ok() {
                        self.paused.insert(key);
                    }
                } else if paused && n < PAUSE_AT / 2 && consumer.resume(&tpl).is_ok() {
                    self.paused.remove(&key);
                }
            }
        }
    }

    fn input_of(&self, topic: &str) -> Option<usize> {
        self.inputs.iter().position(|t| t.as_deref() == Some(topic))
    }

    /// Decodes a consumed message and buffers it in its task.
    fn accept(&mut self, msg: OwnedMessage, consumed: &mut HashMap<usize, u64>) {
        let Some(input) = self.input_of(msg.topic()) else {
            return;
        };
        *consumed.entry(input).or_default() += 1;
        let p = msg.partition();
        self.next_offset.insert((input, p), msg.offset() + 1);
        let kind = if input == REPARTITION {
            match crate::sink::header(&msg, headers::KIND).as_deref() {
                Some("navigation") => NAV,
                _ => TX,
            }
        } else {
            input
        };
        let keyed_by =
            |customer: &str| input == REPARTITION || msg.key() == Some(customer.as_bytes());
        let event = if kind == NAV {
            match self.decoder.decode_navigation(msg.payload()) {
                Ok(n) if keyed_by(&n.customer_id) => Event::Nav(n),
                Ok(n) => Event::Forward {
                    kind: "navigation",
                    customer: n.customer_id,
                },
                Err(e) => Event::Bad(e),
            }
        } else {
            match self.decoder.decode(msg.payload()) {
                Ok(tx) if keyed_by(&tx.customer_id) => Event::Tx(Box::new(tx)),
                Ok(tx) => Event::Forward {
                    kind: "transaction",
                    customer: tx.customer_id,
                },
                Err(e) => Event::Bad(e),
            }
        };
        let ts = match &event {
            Event::Tx(tx) => tx.event_time_ms,
            Event::Nav(n) => n.event_time_ms,
            Event::Bad(_) | Event::Forward { .. } => i64::MIN,
        };
        self.tasks.entry(p).or_default().queues[input].push_back(Pending {
            msg,
            input,
            event,
            ts,
            arrived: Instant::now(),
        });
        self.buffered += 1;
    }

    /// Whether `input`'s partition `p` has nothing more to deliver right now: everything up
    /// to its high watermark has arrived. The watermark is librdkafka's, from its last fetch
    /// response; before the first one it is asked of the broker (ListOffsets), at most every
    /// [`WATERMARK_TTL`] per partition.
    fn caught_up(&mut self, consumer: &Source, input: usize, p: i32) -> bool {
        let Some(topic) = self.inputs[input].clone() else {
            return true;
        };
        let Some(&next) = self.next_offset.get(&(input, p)) else {
            return false;
        };
        // librdkafka's watermark from the last fetch response: no round trip, current to
        // within one fetch (fetch.wait.max.ms).
        if let Some(high) = source::cached_high_watermark(consumer, &topic, p) {
            return next >= high;
        }
        if let Some((high, at)) = self.watermarks.get(&(input, p)) {
            if next < *high {
                return false;
            }
            if at.elapsed() < WATERMARK_TTL {
                return true;
            }
        }
        match consumer.fetch_watermarks(&topic, p, Duration::from_secs(2)) {
            Ok((_, high)) => {
                self.watermarks.insert((input, p), (high, Instant::now()));
                next >= high
            }
            Err(_) => false,
        }
    }

    /// Moves records that may be processed into `self.ready`, in each partition's
    /// event-time order across its inputs (Kafka Streams' rule): the earliest head goes
    /// first, unless an input with nothing buffered may still deliver an earlier record, in
    /// which case the partition waits, at most `batch.max-task-idle-ms`.
    fn select_ready(&mut self, consumer: &Source, max_records: usize) {
        self.ready.clear();
        let partitions: Vec<i32> = self.tasks.keys().copied().collect();
        let merge_wait = metrics::histogram!(telemetry::MERGE_WAIT);
        for p in partitions {
            loop {
                if self.ready.len() >= max_records {
                    return;
                }
                let task = &self.tasks[&p];
                let head = (0..3)
                    .filter_map(|i| task.queues[i].front().map(|h| (h.ts, i)))
                    .min();
                let Some((ts, i)) = head else { break };
                if ts != i64::MIN {
                    let arrived = task.queues[i].front().expect("head").arrived;
                    let empty: Vec<usize> = (0..3)
                        .filter(|&j| {
                            j != i && self.inputs[j].is_some() && task.queues[j].is_empty()
                        })
                        .collect();
                    let waiting_for_other =
                        empty.into_iter().any(|j| !self.caught_up(consumer, j, p));
                    let task = self.tasks.get_mut(&p).expect("task");
                    if waiting_for_other {
                        // Idle time counts from when the task started waiting, not from the
                        // record's arrival: a record can sit long in a backlog of its own
                        // input without any input being idle.
                        let since = *task.blocked_since.get_or_insert_with(Instant::now);
                        if since.elapsed() < self.max_task_idle {
                            break;
                        }
                        if !task.idle_expired {
                            task.idle_expired = true;
                            let behind: Vec<&str> = (0..3)
                                .filter(|&j| j != i && task.queues[j].is_empty())
                                .filter_map(|j| self.inputs[j].as_deref())
                                .collect();
                            tracing::info!(
                                partition = p,
                                waited_ms = since.elapsed().as_millis() as u64,
                                inputs = ?behind,
                                next = ?(0..3).map(|j| self.next_offset.get(&(j, p)).copied()).collect::<Vec<_>>(),
                                watermarks = ?(0..3).map(|j| self.watermarks.get(&(j, p)).map(|w| w.0)).collect::<Vec<_>>(),
                                "An input of this partition is behind and idle; processing without it (batch.max-task-idle-ms)."
                            );
                        }
                    } else {
                        task.blocked_since = None;
                        task.idle_expired = false;
                    }
                    if i == TX {
                        merge_wait.record(arrived.elapsed().as_secs_f64());
                    }
                }
                let rec = self.tasks.get_mut(&p).expect("task").queues[i]
                    .pop_front()
                    .expect("head");
                self.buffered -= 1;
                self.ready.push(rec);
            }
        }
    }

    fn applied_offset(&mut self, input: usize, p: i32) -> anyhow::Result<Option<i64>> {
        if let Some(a) = self.applied.get(&(input, p)) {
            return Ok(*a);
        }
        let topic = self.inputs[input].as_deref().unwrap_or_default();
        let a = self.store.applied_offset(topic, p)?;
        self.applied.insert((input, p), a);
        Ok(a)
    }

    /// Processes `self.ready` in order: navigation events into sessions, transactions into
    /// features (from the state before them) and then into state, bad records into dead
    /// letters, mis-keyed ones into the repartition topic; then scores each partition's
    /// transactions and encodes verdicts into `self.records`, and the state changes into
    /// changelog records. An error (model, state) is fatal, and no offset is stored.
    fn process(&mut self) -> anyhow::Result<()> {
        self.records.clear();
        self.markers.clear();
        self.decisions.clear();
        self.state.clear();
        for (kind, key) in std::mem::take(&mut self.repair) {
            match kind {
                EntityKind::Customer => {
                    if let Some(v) = self.store.customer(&key)? {
                        self.state.customers.insert(key, v);
                    }
                }
                EntityKind::Merchant => {
                    if let Some(v) = self.store.merchant(&key)? {
                        self.state.merchants.insert(key, v);
                    }
                }
                EntityKind::Session => {
                    if let Some(v) = self.store.session(&key)? {
                        self.state.sessions.insert(key, v);
                    }
                }
            }
        }
        let mut dead: [u64; ErrorKind::ALL.len()] = [0; ErrorKind::ALL.len()];
        let (mut skipped, mut forwarded) = (0u64, 0u64);
        let ready = std::mem::take(&mut self.ready);
        let global = self.global.clone();
        let tables = global
            .read()
            .map_err(|_| anyhow::anyhow!("global tables poisoned"))?;
        let scored_at = now_ms();
        // Transactions of the current partition, scored together.
        let mut txs: Vec<&Transaction> = Vec::new();
        let mut current: Option<i32> = None;
        for rec in &ready {
            let p = rec.msg.partition();
            if current != Some(p) {
                if current.is_some() {
                    self.score_partition(&txs, &tables, scored_at);
                }
                txs.clear();
                current = Some(p);
            }
            let topic = self.inputs[rec.input].clone().unwrap_or_default();
            let applied = self.applied_offset(rec.input, p)?;
            if applied.is_some_and(|a| rec.msg.offset() <= a) {
                // Applied to state, and its output acknowledged, before a restart. (Not
                // recorded as applied again: that would move the applied offset back.)
                skipped += 1;
                continue;
            }
            let e = self
                .state
                .applied
                .entry((topic, p))
                .or_insert(rec.msg.offset());
            *e = (*e).max(rec.msg.offset());
            match &rec.event {
                Event::Tx(tx) => match self.model.features.requirements().check(tx) {
                    Ok(()) => {
                        self.features_and_apply(p, tx, &tables)?;
                        txs.push(tx);
                    }
                    // Decoded for a model swapped out since, and not what this one reads.
                    Err(e) => {
                        dead[e.kind as usize] += 1;
                        self.records.push(dead_letter(&rec.msg, &e));
                    }
                },
                Event::Nav(n) => self.apply_navigation(p, n)?,
                Event::Bad(e) => {
                    dead[e.kind as usize] += 1;
                    self.records.push(dead_letter(&rec.msg, e));
                }
                Event::Forward { kind, customer } => {
                    forwarded += 1;
                    let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
                        key: headers::KIND,
                        value: Some(*kind),
                    });
                    self.records.push(OutRecord {
                        topic: Topic::Repartition,
                        partition: None,
                        key: Some(customer.clone().into_bytes()),
                        payload: rec.msg.payload().map(<[u8]>::to_vec),
                        headers: Some(headers),
                    });
                }
            }
        }
        if current.is_some() {
            self.score_partition(&txs, &tables, scored_at);
        }
        drop(txs);
        drop(tables);
        self.ready = ready;
        if self.restorer.is_some() {
            let mut partitions: std::collections::BTreeSet<i32> = BTreeSet::new();
            for (p, key, value) in self.state.changelog_records() {
                partitions.insert(p);
                self.records.push(OutRecord {
                    topic: Topic::Changelog,
                    partition: Some(p),
                    key: Some(key),
                    payload: Some(value),
                    headers: None,
                });
            }
            partitions.extend(self.state.applied.keys().map(|(_, p)| *p));
            for p in partitions {
                let mut applied = Vec::new();
                for i in 0..3 {
                    let Some(topic) = self.inputs[i].clone() else {
                        continue;
                    };
                    let offset = match self.state.applied.get(&(topic.clone(), p)) {
                        Some(o) => Some(*o),
                        None => self.applied_offset(i, p)?,
                    };
                    if let Some(o) = offset {
                        applied.push((topic, o));
                    }
                }
                let (key, value) = marker_record(p, &applied);
                self.markers.push(OutRecord {
                    topic: Topic::Changelog,
                    partition: Some(p),
                    key: Some(key),
                    payload: Some(value),
                    headers: None,
                });
            }
        }
        if skipped > 0 {
            tracing::info!(
                count = skipped,
                "Skipped messages already applied before a restart."
            );
        }
        if forwarded > 0 {
            metrics::counter!(telemetry::REPARTITIONED).increment(forwarded);
        }
        for (kind, n) in ErrorKind::ALL.iter().zip(dead) {
            if n > 0 {
                tracing::warn!(kind = kind.as_str(), count = n, "Messages dead-lettered.");
                metrics::counter!(telemetry::DEAD_LETTERS, "kind" => kind.as_str()).increment(n);
            }
        }
        Ok(())
    }

    /// Scores the rows collected for one partition's transactions, decides each with the
    /// rules, and encodes their verdicts. Never fails: without the model, rules decide.
    fn score_partition(&mut self, txs: &[&Transaction], tables: &GlobalTables, scored_at: i64) {
        if txs.is_empty() {
            return;
        }
        let scored = self.rejected.iter().filter(|r| !**r).count();
        let t = Instant::now();
        let outcome = if scored == 0 {
            Ok(Vec::new())
        } else {
            match self.runner.score(std::mem::take(&mut self.rows)) {
                Ok((rows, scores)) => {
                    self.rows = rows;
                    Ok(scores)
                }
                Err(u) => Err(u),
            }
        };
        metrics::histogram!(telemetry::SCORING_DURATION).record(t.elapsed().as_secs_f64());
        metrics::histogram!(telemetry::SCORING_BATCH_ROWS).record(scored as f64);
        // Without scores, the reason every verdict of the batch carries.
        let (scores, degraded) = match outcome {
            Ok(scores) => {
                if let Some(since) = self.unscored_since.take() {
                    tracing::info!(
                        after_seconds = since.elapsed().as_secs_f64(),
                        "The model scores again."
                    );
                }
                (Some(scores), None)
            }
            Err(Unscored { cause, message }) => {
                if self.unscored_since.is_none() {
                    self.unscored_since = Some(Instant::now());
                    tracing::warn!(cause = cause.as_str(), error = %message, "The model cannot score; deciding by rules alone (degraded).");
                }
                metrics::counter!(telemetry::DEGRADED, "cause" => cause.as_str())
                    .increment(scored as u64);
                let reason = Reason {
                    code: "model-unavailable".into(),
                    text: format!("The model could not score ({message}); decided by rules alone."),
                };
                (None, Some(reason))
            }
        };
        let shadow = match &mut self.shadow {
            Some(m) if scored > 0 => match m.score_rows(&self.shadow_rows, &mut self.shadow_scores)
            {
                Ok(()) => Some(&m.manifest),
                Err(e) => {
                    tracing::warn!(error = %e, model_version = %m.manifest.model_version, "Shadow model failed; verdicts go out without its score.");
                    metrics::counter!(telemetry::SHADOW_ERRORS).increment(scored as u64);
                    None
                }
            },
            _ => None,
        };
        let manifest = &self.model.manifest;
        let width = self.model.features.len();
        let rule_width = self.rules.features.len();
        // Row `j` of the model's rows: transactions of enabled merchants, in order.
        let mut j = 0;
        for (i, tx) in txs.iter().enumerate() {
            let mut verdict = if self.rejected[i] {
                Verdict::rejected(tx, scored_at)
            } else {
                let inputs = rules::Inputs {
                    tx,
                    features: &self.rule_rows[i * rule_width..(i + 1) * rule_width],
                };
                let mut reasons = Vec::new();
                self.fired.clear();
                for rule in self.rules.fired(&inputs) {
                    self.fired.push(rule.action);
                    metrics::counter!(telemetry::RULE_HITS, "rule" => rule.code.clone())
                        .increment(1);
                    reasons.push(Reason {
                        code: rule.code.clone(),
                        text: rule
                            .render(&inputs, |e| blocklist_entry(&self.hasher, tables, tx, e)),
                    });
                }
                let score = scores.as_ref().map(|s| s[j]);
                let decision = combine(
                    score.map(|s| manifest.thresholds.decide(s)),
                    &self.fired,
                    self.rules.on_model_failure,
                );
                match (score, &self.model.explainer) {
                    (None, _) => reasons.extend(degraded.clone()),
                    // Approvals go without: contributions cost more than the score itself
                    // (bench/RESULTS.md), and 98 % of verdicts are approvals.
                    (Some(_), Some(ex))
                        if self.model_reasons > 0 && decision != Decision::Approve =>
                    {
                        self.contributions.resize(width, 0.0);
                        let row = &self.rows[j * width..(j + 1) * width];
                        ex.contributions(row, &mut self.contributions);
                        reasons.extend(top_contributions(
                            &self.contributions,
                            row,
                            self.model.features.names(),
                            self.model_reasons,
                        ));
                    }
                    _ => {}
                }
                let mut v = Verdict::new(
                    tx,
                    score.unwrap_or(-1.0),
                    &manifest.thresholds,
                    &manifest.model_version,
                    scored_at,
                );
                v.decision = decision;
                v.degraded = score.is_none();
                v.reasons = reasons;
                if let Some(s) = shadow {
                    if self.shadow_ok[j] {
                        let score = self.shadow_scores[j];
                        v.shadow = Some(ShadowScore {
                            model_version: s.model_version.clone(),
                            score,
                            decision: s.thresholds.decide(score),
                        });
                    }
                }
                j += 1;
                v
            };
            if let Some(audit) = &self.audit {
                let row = &self.audit_rows[i * audit.len()..(i + 1) * audit.len()];
                verdict.features = Some(
                    audit
                        .names()
                        .iter()
                        .cloned()
                        .zip(row.iter().copied())
                        .collect(),
                );
            }
            let mut payload = Vec::with_capacity(256);
            match self.verdict_format {
                VerdictFormat::Json => verdict.write_json(&mut payload),
                VerdictFormat::Avro => verdict.write_avro(self.verdict_schema_id, &mut payload),
            }
            self.decisions.push((verdict.decision, verdict.event_time));
            self.records.push(OutRecord {
                topic: Topic::Verdicts,
                partition: None,
                key: Some(verdict.transaction_id.into_bytes()),
                payload: Some(payload),
                headers: None,
            });
        }
        self.rows.clear();
        self.audit_rows.clear();
        self.rule_rows.clear();
        self.rejected.clear();
        self.shadow_rows.clear();
        self.shadow_ok.clear();
    }

    fn apply_navigation(&mut self, partition: i32, n: &NavigationEvent) -> anyhow::Result<()> {
        self.store.advance_watermark(n.event_time_ms);
        engine::navigation(partition, n, &self.hasher, &mut self.state, &self.store)?;
        Ok(())
    }

    /// Appends the transaction's model row (and audit row) computed from its customer's,
    /// merchant's and session's state and the global tables, then applies the transaction
    /// to that state.
    fn features_and_apply(
        &mut self,
        partition: i32,
        tx: &Transaction,
        tables: &GlobalTables,
    ) -> anyhow::Result<()> {
        self.store.advance_watermark(tx.event_time_ms);
        let rejected = self
            .enabled
            .as_ref()
            .is_some_and(|e| !e.contains(&tx.merchant_id));
        self.rejected.push(rejected);
        let mut rows: Vec<(&FeatureSet, &mut Vec<f32>)> = Vec::with_capacity(4);
        if !rejected {
            rows.push((&self.model.features, &mut self.rows));
            if let Some(shadow) = &self.shadow {
                self.shadow_ok
                    .push(shadow.features.requirements().check(tx).is_ok());
                rows.push((&shadow.features, &mut self.shadow_rows));
            }
        }
        if let Some(audit) = &self.audit {
            rows.push((audit, &mut self.audit_rows));
        }
        rows.push((&self.rules.features, &mut self.rule_rows));
        // A transaction of a merchant not enabled still updates state (replay computes the
        // same features) but is not scored.
        engine::transaction(
            partition,
            tx,
            &self.hasher,
            tables,
            &mut self.state,
            &self.store,
            &mut rows,
        )?;
        Ok(())
    }

    /// Puts in service the models the watcher has checked since the last batch.
    fn swap_models(&mut self) -> anyhow::Result<()> {
        let Some(new) = self.reloads.take() else {
            return Ok(());
        };
        if let Some(model) = new.primary {
            let old = std::mem::replace(&mut self.model, model.view());
            self.runner.swap(model);
            model_info(Role::Primary, &old.manifest, 0.0);
            model_info(Role::Primary, &self.model.manifest, 1.0);
            self.decoder
                .set_requirements(self.model.features.requirements());
            if self.audit.is_some() {
                self.audit = Some(audit_set(&self.model.features)?);
            }
            tracing::info!(
                from = %old.manifest.model_version,
                to = %self.model.manifest.model_version,
                "Model swapped in."
            );
        }
        if let Some(rules) = new.rules {
            tracing::info!(from = %self.rules.version, to = %rules.version, "Rules swapped in.");
            self.rules = rules;
        }
        if let Some(model) = new.shadow {
            if let Some(old) = self.shadow.replace(model) {
                model_info(Role::Shadow, &old.manifest, 0.0);
            }
            if let Some(shadow) = &self.shadow {
                model_info(Role::Shadow, &shadow.manifest, 1.0);
                tracing::info!(to = %shadow.manifest.model_version, "Shadow model swapped in.");
            }
        }
        Ok(())
    }

    /// Writes the batch's state and applied offsets in one RocksDB write.
    fn commit_state(&mut self) -> anyhow::Result<()> {
        self.store.commit(&self.state)?;
        for ((topic, p), offset) in &self.state.applied {
            if let Some(i) = self.input_of(topic) {
                self.applied.insert((i, *p), Some(*offset));
            }
        }
        Ok(())
    }

    /// Counts the acknowledged verdicts and records their end-to-end latency.
    fn record_delivered(&self, acked_ms: i64) {
        let mut counts = [0u64; Decision::ALL.len()];
        let latency = metrics::histogram!(telemetry::END_TO_END_LATENCY);
        for (decision, event_time) in &self.decisions {
            counts[*decision as usize] += 1;
            latency.record((acked_ms - event_time).max(0) as f64 / 1000.0);
        }
        for (d, n) in Decision::ALL.iter().zip(counts) {
            if n > 0 {
                metrics::counter!(telemetry::VERDICTS, "decision" => d.as_str()).increment(n);
            }
        }
    }
}

/// Sets the info metric of a model: 1 in service, 0 replaced.
fn model_info(role: Role, manifest: &model::Manifest, value: f64) {
    metrics::gauge!(telemetry::MODEL_INFO, "model" => role.as_str(), "model_version" => manifest.model_version.clone())
        .set(value);
}

/// `{blocklist.<entity>}` in a rule's text: the entry that matched, as its reference and reason.
fn blocklist_entry(
    hasher: &Hasher,
    tables: &GlobalTables,
    tx: &Transaction,
    entity: crate::features::Entity,
) -> Option<String> {
    let id = engine::entity_id(tx, entity)?;
    let hash = crate::state::global::hash(hasher, entity, id);
    let reason = tables.block_reason(entity, hash, tx.event_time_ms)?;
    Some(format!("blocklist entry {}:{id}, {reason}", entity.name()))
}

/// The `k` features with the largest positive contributions, as reasons.
fn top_contributions(
    contributions: &[f64],
    row: &[f32],
    names: &[String],
    k: usize,
) -> Vec<Reason> {
    let mut top: Vec<usize> = (0..contributions.len())
        .filter(|&i| contributions[i] > 0.0)
        .collect();
    top.sort_by(|&a, &b| contributions[b].total_cmp(&contributions[a]));
    top.truncate(k);
    top.into_iter()
        .map(|i| Reason {
            code: format!("feature:{}", names[i]),
            text: format!(
                "{} = {} raised the score (+{:.2} log-odds)",
                crate::features::describe(&names[i]),
                rules::format_number(f64::from(row[i])),
                contributions[i]
            ),
        })
        .collect()
}

/// With `output.audit-features`: the model's features, then every other named one.
fn audit_set(features: &FeatureSet) -> anyhow::Result<FeatureSet> {
    let mut names = features.names().to_vec();
    for n in FeatureSet::all_named().names() {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    Ok(FeatureSet::resolve(&names)?)
}

/// The original key and bytes, unchanged, with headers saying what was wrong and where the
/// message came from.
fn dead_letter(m: &OwnedMessage, e: &DecodeError) -> OutRecord {
    let partition = m.partition().to_string();
    let offset = m.offset().to_string();
    let headers = OwnedHeaders::new_with_capacity(5)
        .insert(Header {
            key: headers::ERROR_KIND,
            value: Some(e.kind.as_str()),
        })
        .insert(Header {
            key: headers::ERROR_MESSAGE,
            value: Some(e.message.as_str()),
        })
        .insert(Header {
            key: headers::SOURCE_TOPIC,
            value: Some(m.topic()),
        })
        .insert(Header {
            key: headers::SOURCE_PARTITION,
            value: Some(partition.as_str()),
        })
        .insert(Header {
            key: headers::SOURCE_OFFSET,
            value: Some(offset.as_str()),
        });
    OutRecord {
        topic: Topic::DeadLetter,
        partition: None,
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers: Some(headers),
    }
}
