//! The service: consume a batch, decode, score per partition, produce verdicts and dead
//! letters, wait for the broker's acknowledgements, store offsets. Repeat until shutdown.
//!
//! Guarantees: every consumed transaction gets a verdict or a dead letter before its offset
//! is stored (at-least-once); a re-delivered transaction gets the same verdict again, since
//! its score depends on the message and the model only. Shutdown (the token is cancelled on
//! SIGTERM/SIGINT): stop polling, finish the batch in hand, flush the producer, commit the
//! stored offsets synchronously, return `Ok`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::{Settings, VerdictFormat};
use crate::decision::{Decision, Verdict};
use crate::decode::{DecodeError, Decoder, ErrorKind, Transaction};
use crate::features::{self, Context as FeatureContext, FeatureSet, Ids};
use crate::model::{self, Model};
use crate::sink::{OutRecord, Sink, Topic};
use crate::source::{self, Source};
use crate::state::{keys, Hasher, StateBatch, Store};
use crate::telemetry::{self, Readiness};

/// Dead-letter header names.
pub mod headers {
    pub const ERROR_KIND: &str = "fraudstream.error.kind";
    pub const ERROR_MESSAGE: &str = "fraudstream.error.message";
    pub const SOURCE_TOPIC: &str = "fraudstream.source.topic";
    pub const SOURCE_PARTITION: &str = "fraudstream.source.partition";
    pub const SOURCE_OFFSET: &str = "fraudstream.source.offset";
}

/// Runs fraudstream until `shutdown` is cancelled. Errors are fatal: the caller exits
/// non-zero, and nothing unacknowledged was committed.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
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
    metrics::counter!(telemetry::MESSAGES_CONSUMED, "topic" => settings.topics.transactions.clone()).increment(0);
    let (addr, http) = telemetry::serve(
        settings.metrics.listen,
        prometheus,
        readiness.clone(),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%addr, "Metrics endpoint listening.");

    let env = model::init_runtime(settings.onnxruntime_library().as_deref())?;
    let model = Model::load(env, &settings.model.manifest)?;
    metrics::gauge!(telemetry::MODEL_INFO, "model_version" => model.manifest.model_version.clone())
        .set(1.0);
    tracing::info!(
        model_version = %model.manifest.model_version,
        features = model.features.len(),
        "Model loaded."
    );
    let decoder = Decoder::new(&settings.input, model.features.requirements())?;
    let store = Store::open(&settings.state.path)?;
    let secret = settings.state.hmac_secret.resolve("state.hmac-secret")?;
    if secret == crate::config::DEV_HMAC_SECRET {
        tracing::warn!("Using the development HMAC secret for state keys; set state.hmac-secret in production.");
    }
    let audit = if settings.output.audit_features {
        let mut names = model.features.names().to_vec();
        for n in FeatureSet::all_named().names() {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        Some(FeatureSet::resolve(&names)?)
    } else {
        None
    };
    let sink = Sink::new(&settings)?;
    let consumer = source::consumer(&settings, readiness)?;
    let topics = &settings.topics;
    source::check_topics(
        &consumer,
        &[&topics.transactions, &topics.verdicts, &topics.dead_letter],
        &shutdown,
    )
    .await?;
    consumer
        .subscribe(&[&topics.transactions])
        .context("cannot subscribe")?;
    tracing::info!(topic = %topics.transactions, group = %settings.group_id, "Consuming.");

    let mut worker = Worker {
        decoder,
        model,
        store,
        hasher: Hasher::new(secret.as_bytes()),
        audit,
        state: StateBatch::default(),
        input_topic: settings.topics.transactions.clone(),
        applied: std::collections::HashMap::new(),
        rows: Vec::new(),
        audit_rows: Vec::new(),
        verdict_format: settings.output.verdict_format,
        verdict_schema_id: settings.output.verdict_schema_id,
        records: Vec::new(),
        scores: Vec::new(),
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
    let mut batch: Vec<OwnedMessage> = Vec::with_capacity(max_records);
    loop {
        batch.clear();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            m = consumer.recv() => match m {
                Ok(m) => batch.push(m.detach()),
                Err(e) => {
                    tracing::warn!(error = %e, "Consumer error.");
                    continue;
                }
            },
        }
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + max_wait;
        while batch.len() < max_records {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(deadline) => break,
                m = consumer.recv() => match m {
                    Ok(m) => batch.push(m.detach()),
                    Err(e) => tracing::warn!(error = %e, "Consumer error."),
                },
            }
        }
        metrics::counter!(telemetry::MESSAGES_CONSUMED, "topic" => settings.topics.transactions.clone())
            .increment(batch.len() as u64);

        worker.process(&batch)?;
        sink.deliver(&worker.records, shutdown).await?;
        let acked_ms = now_ms();
        worker.record_delivered(acked_ms);
        // State after the output: a crash in between re-delivers the batch, which is then
        // scored again from the old state into identical verdicts. After this write, messages
        // at or below the applied offsets are skipped, so state is applied exactly once.
        worker.commit_state()?;
        store_offsets(consumer, &batch);
        metrics::histogram!(telemetry::BATCH_DURATION).record(started.elapsed().as_secs_f64());
    }
}

/// Stores `offset + 1` of the last message of each partition in the batch.
fn store_offsets(consumer: &Source, batch: &[OwnedMessage]) {
    let mut last: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for m in batch {
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

/// The per-batch work, with buffers reused across batches.
struct Worker {
    decoder: Decoder,
    model: Model,
    store: Store,
    /// Turns entity identifiers into state keys.
    hasher: Hasher,
    /// With `output.audit-features`: the features put into each verdict.
    audit: Option<FeatureSet>,
    /// The batch's state changes and applied offsets, written after its output is acked.
    state: StateBatch,
    /// The one topic consumed (the transactions topic), whose partitions `applied` keys.
    input_topic: String,
    /// Applied offset per partition, read from the store once, then kept current.
    applied: std::collections::HashMap<i32, Option<i64>>,
    rows: Vec<f32>,
    audit_rows: Vec<f32>,
    verdict_format: VerdictFormat,
    verdict_schema_id: Option<u32>,
    /// What the batch produces: verdicts and dead letters, in consumption order per partition.
    records: Vec<OutRecord>,
    scores: Vec<f32>,
    /// (decision, event time) of each verdict in `records`, counted once acknowledged.
    decisions: Vec<(Decision, i64)>,
}

impl Worker {
    /// Decodes, computes features from state, scores and encodes a batch into
    /// `self.records`, collecting state changes in `self.state`. An error (model, state) is
    /// fatal, and the batch's offsets are not stored.
    fn process(&mut self, batch: &[OwnedMessage]) -> anyhow::Result<()> {
        self.records.clear();
        self.decisions.clear();
        self.state.clear();
        let mut valid: BTreeMap<i32, Vec<Transaction>> = BTreeMap::new();
        let mut dead: [u64; ErrorKind::ALL.len()] = [0; ErrorKind::ALL.len()];
        let mut skipped = 0u64;
        // Highest offset per partition in this batch, keyed without a per-message allocation.
        let mut last: BTreeMap<i32, i64> = BTreeMap::new();
        for m in batch {
            let p = m.partition();
            let applied = match self.applied.get(&p) {
                Some(a) => *a,
                None => {
                    let a = self.store.applied_offset(&self.input_topic, p)?;
                    self.applied.insert(p, a);
                    a
                }
            };
            if applied.is_some_and(|a| m.offset() <= a) {
                // Applied to state, and its output acknowledged, before a restart.
                skipped += 1;
                continue;
            }
            let e = last.entry(p).or_insert(m.offset());
            *e = (*e).max(m.offset());
            match self.decoder.decode(m.payload()) {
                Ok(tx) => valid.entry(m.partition()).or_default().push(tx),
                Err(e) => {
                    dead[ErrorKind::ALL
                        .iter()
                        .position(|k| *k == e.kind)
                        .unwrap_or(0)] += 1;
                    self.records.push(dead_letter(m, &e));
                }
            }
        }
        for (p, offset) in last {
            self.state
                .applied
                .insert((self.input_topic.clone(), p), offset);
        }
        if skipped > 0 {
            tracing::info!(
                count = skipped,
                "Skipped messages already applied before a restart."
            );
        }
        for (kind, n) in ErrorKind::ALL.iter().zip(dead) {
            if n > 0 {
                tracing::warn!(kind = kind.as_str(), count = n, "Messages dead-lettered.");
                metrics::counter!(telemetry::DEAD_LETTERS, "kind" => kind.as_str()).increment(n);
            }
        }
        let scored_at = now_ms();
        for (partition, txs) in &valid {
            self.rows.clear();
            self.audit_rows.clear();
            for tx in txs {
                self.features_and_apply(*partition, tx)?;
            }
            let t = Instant::now();
            self.model.score_rows(&self.rows, &mut self.scores)?;
            metrics::histogram!(telemetry::SCORING_DURATION).record(t.elapsed().as_secs_f64());
            metrics::histogram!(telemetry::SCORING_BATCH_ROWS).record(txs.len() as f64);
            let manifest = &self.model.manifest;
            for (i, (tx, &score)) in txs.iter().zip(&self.scores).enumerate() {
                let mut verdict = Verdict::new(
                    tx,
                    score,
                    &manifest.thresholds,
                    &manifest.model_version,
                    scored_at,
                );
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
                    key: Some(verdict.transaction_id.into_bytes()),
                    payload: Some(payload),
                    headers: None,
                });
            }
        }
        Ok(())
    }

    /// Appends the transaction's model row (and audit row) computed from its customer's and
    /// merchant's state, then applies the transaction to that state.
    fn features_and_apply(&mut self, partition: i32, tx: &Transaction) -> anyhow::Result<()> {
        let h = &self.hasher;
        let ck = keys::key(partition, &h.entity("customer", &tx.customer_id));
        let mk = keys::key(partition, &h.entity("merchant", &tx.merchant_id));
        let ids = Ids {
            card: tx.card_id.as_deref().map(|v| h.short("card", v)),
            device: tx.device_id.as_deref().map(|v| h.short("device", v)),
            ip: tx.ip.as_deref().map(|v| h.short("ip", v)),
        };
        if !self.state.customers.contains_key(&ck) {
            let c = self.store.customer(&ck)?.unwrap_or_default();
            self.state.customers.insert(ck, c);
        }
        if !self.state.merchants.contains_key(&mk) {
            let m = self.store.merchant(&mk)?.unwrap_or_default();
            self.state.merchants.insert(mk, m);
        }
        let customer = self.state.customers.get_mut(&ck).expect("inserted above");
        let merchant = self.state.merchants.get_mut(&mk).expect("inserted above");
        let ctx = FeatureContext {
            customer,
            merchant,
            ids,
        };
        self.model.features.extend_row(tx, &ctx, &mut self.rows);
        if let Some(audit) = &self.audit {
            audit.extend_row(tx, &ctx, &mut self.audit_rows);
        }
        features::apply(tx, &ids, customer, merchant);
        Ok(())
    }

    /// Writes the batch's state and applied offsets in one RocksDB write.
    fn commit_state(&mut self) -> anyhow::Result<()> {
        self.store.commit(&self.state)?;
        for ((_, p), offset) in &self.state.applied {
            self.applied.insert(*p, Some(*offset));
        }
        Ok(())
    }

    /// Counts the acknowledged verdicts and records their end-to-end latency.
    fn record_delivered(&self, acked_ms: i64) {
        let mut counts = [0u64; 3];
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
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers: Some(headers),
    }
}
