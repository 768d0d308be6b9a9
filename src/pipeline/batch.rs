//! Processing a batch of merged records, in order: a navigation event into its session, a
//! transaction into its feature rows (from the state before it) and then into state, a bad
//! record into a dead letter, a mis-partitioned one into a forward; then each partition's
//! transactions are scored together and decided into verdicts.
//!
//! No I/O: state comes from the uncommitted [`StateBatch`] and, below it, a [`Loader`] (the
//! store); what is produced is collected in an [`Output`] for the commit to send.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};

use super::intake::{Event, Record};
use super::merge::Queued;
use super::score::Scoring;
use crate::config::{Guarantee, Settings, VerdictFormat};
use crate::decision::rules::{self, RuleSet};
use crate::decision::{assemble, Decision, Facts, Reason, ShadowScore, Verdict};
use crate::decode::{DecodeError, ErrorKind, NavigationEvent, Transaction};
use crate::features::{engine, FeatureSet};
use crate::model::reload::{Candidates, Role};
use crate::model::{self, ModelView};
use crate::sink::{OutRecord, Topic};
use crate::state::global::GlobalTables;
use crate::state::{Hasher, Loader, StateBatch, StateError};
use crate::telemetry;

/// Header names of dead letters, and of forwarded records (their source partition and offset).
pub mod headers {
    pub const ERROR_KIND: &str = "fraudstream.error.kind";
    pub const ERROR_MESSAGE: &str = "fraudstream.error.message";
    pub const SOURCE_TOPIC: &str = "fraudstream.source.topic";
    pub const SOURCE_PARTITION: &str = "fraudstream.source.partition";
    pub const SOURCE_OFFSET: &str = "fraudstream.source.offset";
    /// On the dead letter of a forwarded record: its forward's frame line, `<kind>
    /// <partition> <offset>`, what it is and where it was first read ([`super::intake::frame`]).
    pub const FORWARD: &str = "fraudstream.forward";
    /// On a dead letter whose payload was cut to fit: the payload's original length.
    pub const PAYLOAD_TRUNCATED: &str = "fraudstream.payload.truncated";
    /// On a dead letter whose key was cut to fit: the key's original length.
    pub const KEY_TRUNCATED: &str = "fraudstream.key.truncated";
    /// On a dead letter whose original headers were dropped to fit: how many there were.
    pub const HEADERS_DROPPED: &str = "fraudstream.headers.dropped";
}

/// Longest value of `output.trace-header` copied to a verdict (bytes).
const TRACE_HEADER_MAX: usize = 512;

/// Longest error message a dead letter's header carries (bytes).
const ERROR_MESSAGE_MAX: usize = 1024;

/// What a batch produced, for the commit to send.
#[derive(Default)]
pub struct Output {
    pub verdicts: Vec<OutRecord>,
    pub dead_letters: Vec<OutRecord>,
    pub forwards: Vec<OutRecord>,
    /// (decision, event time) of each verdict, counted once committed.
    pub decisions: Vec<(Decision, i64)>,
}

impl Output {
    pub fn clear(&mut self) {
        self.verdicts.clear();
        self.dead_letters.clear();
        self.forwards.clear();
        self.decisions.clear();
    }
}

/// Everything that turns records into verdicts, with buffers reused across batches.
pub struct Processor {
    /// The primary model in service (its session is with the scoring runner).
    pub model: ModelView,
    pub scoring: Scoring,
    rules: RuleSet,
    /// Merchants that are scored; `None`: all.
    enabled: Option<HashSet<String>>,
    /// With `output.audit-features`: the features put into each verdict.
    audit: Option<FeatureSet>,
    hasher: Hasher,
    /// Labels and blocklist, kept current by their reader thread.
    global: Arc<RwLock<GlobalTables>>,
    model_reasons: usize,
    verdict_format: VerdictFormat,
    verdict_schema_id: Option<u32>,
    /// `output.trace-header`: copied from a transaction's record to its verdict's.
    trace_header: String,
    /// `input.max-future-skew-ms` (as i64; 0: no limit).
    max_future_skew_ms: i64,
    /// Most bytes of a dead letter (see [`dead_letter`]).
    dead_letter_max_bytes: usize,
    /// At-least-once: records are forwarded outside the transaction, so a crash forwards
    /// some again; the copies are skipped ([`StateBatch::first_forward`]).
    skip_forwarded_copies: bool,
    rows: Vec<f32>,
    audit_rows: Vec<f32>,
    shadow_rows: Vec<f32>,
    /// Per scored transaction: whether it carries what the shadow reads (a passthrough
    /// shadow cannot score a transaction without its vector; it is left out).
    shadow_ok: Vec<bool>,
    /// One row of `rules.features` per transaction of the partition being processed.
    rule_rows: Vec<f32>,
    /// Per transaction of the partition being processed: merchant not enabled.
    rejected: Vec<bool>,
    fired: Vec<Decision>,
    contributions: Vec<f64>,
}

impl Processor {
    pub fn new(
        settings: &Settings,
        model: ModelView,
        scoring: Scoring,
        rules: RuleSet,
        hasher: Hasher,
        global: Arc<RwLock<GlobalTables>>,
        dead_letter_max_bytes: usize,
    ) -> anyhow::Result<Processor> {
        let enabled = &settings.decision.enabled_merchants;
        let audit = if settings.output.audit_features {
            Some(audit_set(&model.features)?)
        } else {
            None
        };
        Ok(Processor {
            model,
            scoring,
            rules,
            enabled: (!enabled.is_empty()).then(|| enabled.iter().cloned().collect()),
            audit,
            hasher,
            global,
            model_reasons: settings.decision.model_reasons,
            verdict_format: settings.output.verdict_format,
            verdict_schema_id: settings.output.verdict_schema_id,
            trace_header: settings.output.trace_header.clone(),
            max_future_skew_ms: i64::try_from(settings.input.max_future_skew_ms)
                .unwrap_or(i64::MAX),
            dead_letter_max_bytes,
            skip_forwarded_copies: settings.processing.guarantee == Guarantee::AtLeastOnce,
            rows: Vec::new(),
            audit_rows: Vec::new(),
            shadow_rows: Vec::new(),
            shadow_ok: Vec::new(),
            rule_rows: Vec::new(),
            rejected: Vec::new(),
            fired: Vec::new(),
            contributions: Vec::new(),
        })
    }

    /// Puts in service the models and rules the watcher has checked; between two batches,
    /// so that every batch is scored by one model. Returns the new primary's requirements
    /// for the decoder, if it changed.
    pub fn swap(&mut self, new: Candidates) -> anyhow::Result<Option<crate::decode::Requirements>> {
        let mut requirements = None;
        if let Some(m) = new.primary {
            let old = std::mem::replace(&mut self.model, m.view());
            self.scoring.runner.swap(m);
            model_info(Role::Primary, &old.manifest, 0.0);
            model_info(Role::Primary, &self.model.manifest, 1.0);
            requirements = Some(self.model.features.requirements());
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
        if let Some(m) = new.shadow {
            if let Some(old) = self.scoring.shadow.replace(m) {
                model_info(Role::Shadow, &old.manifest, 0.0);
            }
            if let Some(shadow) = &self.scoring.shadow {
                model_info(Role::Shadow, &shadow.manifest, 1.0);
                tracing::info!(to = %shadow.manifest.model_version, "Shadow model swapped in.");
            }
        }
        Ok(requirements)
    }

    /// Processes `ready` in order into `state` (read through to `loader`) and `out`.
    /// `stream_time` gives a partition's committed stream time. An error is a state error:
    /// fatal for the batch (its transaction is not committed).
    pub fn process(
        &mut self,
        ready: &[Queued<Record>],
        state: &mut StateBatch,
        loader: &impl Loader,
        stream_time: &HashMap<i32, i64>,
        scored_at: i64,
        out: &mut Output,
    ) -> Result<(), StateError> {
        let mut dead = [0u64; ErrorKind::ALL.len()];
        let (mut forwarded, mut copies) = (0u64, 0u64);
        let global = self.global.clone();
        let tables = global.read().unwrap_or_else(|e| e.into_inner());
        // Transactions of the current partition, scored together.
        let mut txs: Vec<(&Transaction, &OwnedMessage)> = Vec::new();
        let mut current: Option<i32> = None;
        for q in ready {
            let p = q.partition;
            if current != Some(p) {
                if current.is_some() {
                    self.score_partition(&txs, &tables, scored_at, out);
                }
                txs.clear();
                current = Some(p);
            }
            let rec = &q.item;
            if let Some((source, offset)) = rec.forwarded_from {
                if self.skip_forwarded_copies && !state.first_forward(p, source, offset, loader)? {
                    copies += 1;
                    continue;
                }
            }
            if let Some(e) = self.too_far_ahead(p, q.time, state, stream_time) {
                dead[e.kind as usize] += 1;
                out.dead_letters.push(dead_letter(
                    &rec.msg,
                    rec.frame,
                    &e,
                    self.dead_letter_max_bytes,
                ));
                continue;
            }
            match &rec.event {
                Event::Tx(tx) => match self.model.features.requirements().check(tx) {
                    Ok(()) => {
                        state.advance(p, tx.event_time_ms, stream_time.get(&p).copied());
                        self.features_and_apply(p, tx, &tables, state, loader)?;
                        txs.push((tx, &rec.msg));
                    }
                    // Decoded for a model swapped out since, and not what this one reads.
                    Err(e) => {
                        dead[e.kind as usize] += 1;
                        out.dead_letters.push(dead_letter(
                            &rec.msg,
                            rec.frame,
                            &e,
                            self.dead_letter_max_bytes,
                        ));
                    }
                },
                Event::Nav(n) => {
                    state.advance(p, n.event_time_ms, stream_time.get(&p).copied());
                    self.apply_navigation(p, n, state, loader)?;
                }
                Event::Bad(e) => {
                    dead[e.kind as usize] += 1;
                    out.dead_letters.push(dead_letter(
                        &rec.msg,
                        rec.frame,
                        e,
                        self.dead_letter_max_bytes,
                    ));
                }
                Event::Forward {
                    kind,
                    customer,
                    partition,
                } => {
                    forwarded += 1;
                    out.forwards
                        .push(forward(&rec.msg, kind, customer, *partition));
                }
            }
        }
        if current.is_some() {
            self.score_partition(&txs, &tables, scored_at, out);
        }
        if forwarded > 0 {
            metrics::counter!(telemetry::REPARTITIONED).increment(forwarded);
        }
        if copies > 0 {
            tracing::warn!(
                count = copies,
                "Forwarded records skipped: applied already (forwarded again after a crash; if an input's offsets went back, its state needs a reset too)."
            );
            metrics::counter!(telemetry::REPARTITION_COPIES).increment(copies);
        }
        for (kind, n) in ErrorKind::ALL.iter().zip(dead) {
            if n > 0 {
                tracing::warn!(kind = kind.as_str(), count = n, "Messages dead-lettered.");
                metrics::counter!(telemetry::DEAD_LETTERS, "kind" => kind.as_str()).increment(n);
            }
        }
        Ok(())
    }

    /// An event further ahead than `input.max-future-skew-ms` of both its partition's stream
    /// time and the wall clock: one bad clock must not move the partition's windows and
    /// expiry. (Not the stream time alone: a partition quiet for days is behind the clock.)
    fn too_far_ahead(
        &self,
        p: i32,
        time: i64,
        state: &StateBatch,
        committed: &HashMap<i32, i64>,
    ) -> Option<DecodeError> {
        if self.max_future_skew_ms == 0 || time == i64::MIN {
            return None;
        }
        let stream = state
            .stream_time
            .get(&p)
            .or(committed.get(&p))
            .copied()
            .unwrap_or(i64::MIN);
        let limit = stream
            .max(super::now_ms())
            .saturating_add(self.max_future_skew_ms);
        (time > limit).then(|| {
            DecodeError::new(
                ErrorKind::EventTimeSkew,
                format!(
                    "event time {time} ms is more than input.max-future-skew-ms = {} ahead of its partition's stream time and of the clock",
                    self.max_future_skew_ms
                ),
            )
        })
    }

    fn apply_navigation(
        &mut self,
        partition: i32,
        n: &NavigationEvent,
        state: &mut StateBatch,
        loader: &impl Loader,
    ) -> Result<(), StateError> {
        engine::navigation(partition, n, &self.hasher, state, loader)
    }

    /// Appends the transaction's model row (and audit, shadow and rule rows) computed from
    /// its customer's, merchant's and session's state and the global tables, then applies
    /// the transaction to that state.
    fn features_and_apply(
        &mut self,
        partition: i32,
        tx: &Transaction,
        tables: &GlobalTables,
        state: &mut StateBatch,
        loader: &impl Loader,
    ) -> Result<(), StateError> {
        let rejected = self
            .enabled
            .as_ref()
            .is_some_and(|e| !e.contains(&tx.merchant_id));
        self.rejected.push(rejected);
        let mut rows: Vec<(&FeatureSet, &mut Vec<f32>)> = Vec::with_capacity(4);
        if !rejected {
            rows.push((&self.model.features, &mut self.rows));
            if let Some(shadow) = &self.scoring.shadow {
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
            state,
            loader,
            &mut rows,
        )
    }

    /// Scores the rows collected for one partition's transactions, decides each with the
    /// rules, and encodes their verdicts into `out`. Never fails: without the model, rules
    /// decide.
    fn score_partition(
        &mut self,
        txs: &[(&Transaction, &OwnedMessage)],
        tables: &GlobalTables,
        scored_at: i64,
        out: &mut Output,
    ) {
        if txs.is_empty() {
            return;
        }
        let n = self.rejected.iter().filter(|r| !**r).count();
        let scored = self.scoring.score(&mut self.rows, n, &self.shadow_rows);
        let manifest = &self.model.manifest;
        let width = self.model.features.len();
        let rule_width = self.rules.features.len();
        let (scores, degraded) = match &scored.primary {
            Ok(s) => (Some(s.as_slice()), None),
            Err(reason) => (None, Some(reason)),
        };
        if let Some(scores) = scores {
            let h = metrics::histogram!(telemetry::SCORES, "model_version" => manifest.model_version.clone());
            for &s in scores {
                h.record(f64::from(s));
            }
        }
        // Row `j` of the model's rows: transactions of enabled merchants, in order.
        let mut j = 0;
        for (i, (tx, msg)) in txs.iter().enumerate() {
            let mut verdict = if self.rejected[i] {
                Verdict::rejected(tx, scored_at)
            } else {
                let inputs = rules::Inputs {
                    tx,
                    features: &self.rule_rows[i * rule_width..(i + 1) * rule_width],
                };
                let mut rule_reasons = Vec::new();
                self.fired.clear();
                for rule in self.rules.fired(&inputs) {
                    self.fired.push(rule.action);
                    metrics::counter!(telemetry::RULE_HITS, "rule" => rule.code.clone())
                        .increment(1);
                    rule_reasons.push(Reason {
                        code: rule.code.clone(),
                        text: rule
                            .render(&inputs, |e| blocklist_entry(&self.hasher, tables, tx, e)),
                    });
                }
                let score = scores.map(|s| s[j]);
                let facts = Facts {
                    tx,
                    scored_at,
                    model_version: &manifest.model_version,
                    thresholds: &manifest.thresholds,
                    score,
                    degraded,
                    fired: &self.fired,
                    rule_reasons,
                    on_model_failure: self.rules.on_model_failure,
                };
                let (explainer, k, contributions, rows) = (
                    &self.model.explainer,
                    self.model_reasons,
                    &mut self.contributions,
                    &self.rows,
                );
                let names = self.model.features.names();
                // Only called with a score, so the model's rows are there.
                let mut v = assemble(facts, || match explainer {
                    Some(ex) if k > 0 => {
                        let row = &rows[j * width..(j + 1) * width];
                        contributions.resize(width, 0.0);
                        ex.contributions(row, contributions);
                        top_contributions(contributions, row, names, k)
                    }
                    _ => Vec::new(),
                });
                if let Some((s, shadow_scores)) = scored.shadow {
                    if self.shadow_ok[j] {
                        let score = shadow_scores[j];
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
            out.decisions.push((verdict.decision, verdict.event_time));
            let trace = (!self.trace_header.is_empty())
                .then(|| header_bytes(msg, &self.trace_header))
                .flatten()
                // A trace context is tens of bytes; a sender's megabyte is not copied.
                .filter(|v| v.len() <= TRACE_HEADER_MAX)
                .map(|v| {
                    OwnedHeaders::new_with_capacity(1).insert(Header {
                        key: self.trace_header.as_str(),
                        value: Some(v),
                    })
                });
            out.verdicts.push(OutRecord {
                topic: Topic::Verdicts,
                partition: None,
                key: Some(verdict.transaction_id.into_bytes()),
                payload: Some(payload),
                headers: trace,
                // As Kafka Streams does: the output record carries its input's timestamp,
                // so a reader measures produced -> verdict from the record alone.
                timestamp: msg.timestamp().to_millis(),
            });
        }
        self.rows.clear();
        self.audit_rows.clear();
        self.rule_rows.clear();
        self.rejected.clear();
        self.shadow_rows.clear();
        self.shadow_ok.clear();
    }
}

/// The value of header `name` of `m`, as bytes.
fn header_bytes<'m>(m: &'m OwnedMessage, name: &str) -> Option<&'m [u8]> {
    use rdkafka::message::Headers;
    m.headers()?.iter().find(|h| h.key == name)?.value
}

/// Sets the info metric of a model: 1 in service, 0 replaced.
pub fn model_info(role: Role, manifest: &model::Manifest, value: f64) {
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
    Some(format!(
        "blocklist entry {}:{}, {reason}",
        entity.name(),
        crate::state::global::mask(entity, id)
    ))
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

/// A record re-keyed by its customer, to the repartition topic's partition for it, with its
/// timestamp, its headers (a trace context among them; not the sender's `fraudstream.*` ones)
/// and its value framed by what it is and where it was read ([`super::intake::frame`]).
fn forward(m: &OwnedMessage, kind: &str, customer: &str, partition: i32) -> OutRecord {
    use rdkafka::message::Headers;
    let original = m.headers().into_iter().flat_map(|h| h.iter());
    let mut kept = original
        .filter(|h| !h.key.starts_with("fraudstream."))
        .peekable();
    let headers = kept
        .peek()
        .is_some()
        .then(|| kept.fold(OwnedHeaders::new(), |headers, h| headers.insert(h)));
    let value = m.payload().unwrap_or_default();
    OutRecord {
        topic: Topic::Repartition,
        partition: Some(partition),
        key: Some(customer.as_bytes().to_vec()),
        payload: Some(super::intake::frame(kind, m.partition(), m.offset(), value)),
        headers,
        timestamp: m.timestamp().to_millis(),
    }
}

/// The original key, bytes, timestamp and headers, unchanged, with headers of its own saying
/// what was wrong and where the message came from (as Kafka Connect's dead-letter queue does).
/// A forwarded record's (`frame` > 0) is its original value, its frame line in a header
/// ([`headers::FORWARD`]).
///
/// A dead letter never exceeds `max_bytes` (key, value and headers, as the producer counts
/// them), whatever the sender put in: the payload is cut first, then the original headers
/// are dropped, then the key is cut, each with a header holding the original length or
/// count. Its own headers (what was wrong, the source topic, partition and offset) always
/// fit, so the original can be read again from its source.
fn dead_letter(m: &OwnedMessage, frame: usize, e: &DecodeError, max_bytes: usize) -> OutRecord {
    use rdkafka::message::Headers;
    let partition = m.partition().to_string();
    let offset = m.offset().to_string();
    let (framing, value) = m.payload().unwrap_or_default().split_at(frame);
    let framing = String::from_utf8_lossy(framing);
    let mut ours = vec![
        (headers::ERROR_KIND, e.kind.as_str()),
        (
            headers::ERROR_MESSAGE,
            truncate_utf8(&e.message, ERROR_MESSAGE_MAX),
        ),
        (headers::SOURCE_TOPIC, m.topic()),
        (headers::SOURCE_PARTITION, partition.as_str()),
        (headers::SOURCE_OFFSET, offset.as_str()),
    ];
    if frame > 0 {
        ours.push((headers::FORWARD, framing.trim_end()));
    }
    let size = |k: &str, v: &[u8]| k.len() + v.len();
    // Room for the sender's bytes once ours and three truncation headers (names and values of
    // at most 20 digits) are counted.
    let mut room = max_bytes.saturating_sub(
        ours.iter()
            .map(|(k, v)| size(k, v.as_bytes()))
            .sum::<usize>()
            + [
                headers::PAYLOAD_TRUNCATED,
                headers::HEADERS_DROPPED,
                headers::KEY_TRUNCATED,
            ]
            .iter()
            .map(|k| k.len() + 20)
            .sum::<usize>(),
    );
    let mut notes: Vec<(&str, String)> = Vec::new();
    let mut key = m.key().map(<[u8]>::to_vec);
    if let Some(k) = key.as_mut().filter(|k| k.len() > room) {
        notes.push((headers::KEY_TRUNCATED, k.len().to_string()));
        k.truncate(room);
    }
    room -= key.as_ref().map_or(0, Vec::len);
    let original: Vec<_> = m.headers().into_iter().flat_map(|h| h.iter()).collect();
    let original_bytes: usize = original
        .iter()
        .map(|h| size(h.key, h.value.unwrap_or_default()))
        .sum();
    let keep_headers = original_bytes <= room;
    if keep_headers {
        room -= original_bytes;
    } else {
        notes.push((headers::HEADERS_DROPPED, original.len().to_string()));
    }
    let mut payload = m.payload().map(|_| value.to_vec());
    if let Some(p) = payload.as_mut().filter(|p| p.len() > room) {
        notes.push((headers::PAYLOAD_TRUNCATED, p.len().to_string()));
        p.truncate(room);
    }
    let mut out = OwnedHeaders::new_with_capacity(original.len() + ours.len() + notes.len());
    if keep_headers {
        for h in original {
            out = out.insert(h);
        }
    }
    for (key, value) in ours {
        out = out.insert(Header {
            key,
            value: Some(value),
        });
    }
    for (key, value) in &notes {
        out = out.insert(Header {
            key,
            value: Some(value.as_str()),
        });
    }
    OutRecord {
        topic: Topic::DeadLetter,
        partition: None,
        key,
        payload,
        headers: Some(out),
        timestamp: m.timestamp().to_millis(),
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;
    use rdkafka::Timestamp;

    fn message(key: usize, payload: usize, header_values: &[usize]) -> OwnedMessage {
        let mut h = OwnedHeaders::new();
        for (i, n) in header_values.iter().enumerate() {
            let name = format!("h{i}");
            h = h.insert(Header {
                key: &name,
                value: Some(&vec![b'v'; *n]),
            });
        }
        OwnedMessage::new(
            Some(vec![b'p'; payload]),
            Some(vec![b'k'; key]),
            "transactions".into(),
            Timestamp::CreateTime(1),
            3,
            42,
            Some(h),
        )
    }

    /// Key, value and headers, as the producer counts a record against its limit.
    fn size(r: &OutRecord) -> usize {
        let h = r.headers.as_ref().unwrap();
        r.key.as_ref().map_or(0, Vec::len)
            + r.payload.as_ref().map_or(0, Vec::len)
            + h.iter()
                .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
                .sum::<usize>()
    }

    fn header(r: &OutRecord, name: &str) -> Option<String> {
        r.headers
            .as_ref()?
            .iter()
            .find(|h| h.key == name)
            .map(|h| String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
    }

    fn error() -> DecodeError {
        DecodeError::new(ErrorKind::Oversized, "x".repeat(5000))
    }

    #[test]
    fn a_forward_says_what_it_is_and_where_it_was_read_and_keeps_the_senders_headers() {
        let sent = OwnedHeaders::new()
            .insert(Header {
                key: "h0",
                value: Some("vvvvvvv"),
            })
            .insert(Header {
                key: "fraudstream.sender",
                value: Some("dropped"),
            });
        let m = OwnedMessage::new(
            Some(b"{\"a\":1}".to_vec()),
            None,
            "navigation".into(),
            Timestamp::CreateTime(1),
            3,
            42,
            Some(sent),
        );
        let r = forward(&m, "navigation", "c1", 1);
        assert_eq!(r.partition, Some(1));
        assert_eq!(r.key.as_deref(), Some(&b"c1"[..]));
        assert_eq!(header(&r, "h0").as_deref(), Some("vvvvvvv"));
        assert_eq!(header(&r, "fraudstream.sender"), None);
        assert_eq!(
            r.payload.as_deref(),
            Some(&b"navigation 3 42\n{\"a\":1}"[..])
        );
        let read = OwnedMessage::new(
            r.payload,
            r.key,
            "repartition".into(),
            Timestamp::CreateTime(r.timestamp.unwrap()),
            1,
            7,
            r.headers,
        );
        let (input, source, frame) = super::super::intake::unframe(read.payload());
        assert_eq!(input, super::super::merge::NAV);
        let (source, offset) = source.expect("source");
        assert_eq!((source.partition, offset), (3, 42));
        assert_eq!(&read.payload().unwrap()[frame..], b"{\"a\":1}");

        // Its dead letter is the original value, the frame in a header.
        let r = dead_letter(&read, frame, &error(), 8192);
        assert_eq!(r.payload.as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(
            header(&r, headers::FORWARD).as_deref(),
            Some("navigation 3 42")
        );
        assert_eq!(header(&r, "h0").as_deref(), Some("vvvvvvv"));
    }

    #[test]
    fn a_forward_without_the_senders_headers_has_none_and_an_unframed_value_is_a_transaction() {
        let m = OwnedMessage::new(
            Some(b"{}".to_vec()),
            None,
            "transactions".into(),
            Timestamp::CreateTime(1),
            0,
            9,
            None,
        );
        let r = forward(&m, "transaction", "c1", 2);
        assert!(r.headers.is_none(), "no header to build, copy and free");
        let (input, source, frame) = super::super::intake::unframe(r.payload.as_deref());
        assert_eq!(input, super::super::merge::TX);
        assert_eq!(source.map(|(s, o)| (s.partition, o)), Some((0, 9)));
        assert_eq!(&r.payload.as_deref().unwrap()[frame..], b"{}");
        for unframed in [
            &b"{\"customer_id\":\"c\"}"[..],
            b"transaction 1\n{}",
            b"x 1 2\n",
        ] {
            assert_eq!(
                super::super::intake::unframe(Some(unframed)),
                (super::super::merge::TX, None, 0),
                "{}",
                String::from_utf8_lossy(unframed)
            );
        }
    }

    #[test]
    fn a_dead_letter_that_fits_is_the_original_with_its_reason_and_source() {
        let r = dead_letter(&message(8, 500, &[10, 20]), 0, &error(), 4096);
        assert_eq!(r.payload.as_deref(), Some(&[b'p'; 500][..]));
        assert_eq!(r.key.as_deref(), Some(&[b'k'; 8][..]));
        assert_eq!(header(&r, "h1").as_deref(), Some(&"v".repeat(20)[..]));
        assert_eq!(header(&r, headers::SOURCE_OFFSET).as_deref(), Some("42"));
        assert_eq!(header(&r, headers::SOURCE_PARTITION).as_deref(), Some("3"));
        assert_eq!(
            header(&r, headers::ERROR_MESSAGE).map(|m| m.len()),
            Some(ERROR_MESSAGE_MAX)
        );
        assert_eq!(header(&r, headers::PAYLOAD_TRUNCATED), None);
        assert_eq!(header(&r, headers::HEADERS_DROPPED), None);
    }

    #[test]
    fn a_large_payload_is_cut_to_fit_and_says_so() {
        let r = dead_letter(&message(8, 1_000_000, &[10]), 0, &error(), 100_000);
        assert!(size(&r) <= 100_000, "{} bytes", size(&r));
        assert!(r.payload.as_ref().unwrap().len() > 90_000);
        assert_eq!(
            header(&r, headers::PAYLOAD_TRUNCATED).as_deref(),
            Some("1000000")
        );
        assert_eq!(header(&r, "h0").as_deref(), Some(&"v".repeat(10)[..]));
    }

    #[test]
    fn huge_headers_and_keys_are_dropped_or_cut_and_the_source_always_fits() {
        for (key, headers_each) in [(10, 300_000), (2_000_000, 10), (2_000_000, 300_000)] {
            let m = message(key, 50_000, &[headers_each, headers_each]);
            let r = dead_letter(&m, 0, &error(), 8192);
            assert!(size(&r) <= 8192, "{} bytes", size(&r));
            assert_eq!(header(&r, headers::SOURCE_OFFSET).as_deref(), Some("42"));
            assert_eq!(
                header(&r, headers::SOURCE_TOPIC).as_deref(),
                Some("transactions")
            );
            if headers_each > 8192 {
                assert_eq!(header(&r, headers::HEADERS_DROPPED).as_deref(), Some("2"));
            }
            if key > 8192 {
                assert_eq!(header(&r, headers::KEY_TRUNCATED), Some(key.to_string()));
            }
        }
    }
}
