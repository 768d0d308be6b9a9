//! Configuration: built-in defaults, then a TOML file, then environment variables.
//!
//! Every key of the file can be overridden by an environment variable named
//! `FRAUDSTREAM__` + the key path, upper-cased, with `__` between table and key and `_` for
//! the `-` inside a key: `group-id` is `FRAUDSTREAM__GROUP_ID`, `[topics] verdicts` is
//! `FRAUDSTREAM__TOPICS__VERDICTS`. In the librdkafka pass-through tables (`[kafka]`,
//! `[kafka-consumer]`, `[kafka-producer]`) the `_` stands for `.`:
//! `FRAUDSTREAM__KAFKA__FETCH_WAIT_MAX_MS=10` sets `fetch.wait.max.ms`.
//!
//! Unknown keys, in the file or from the environment, are an error that names the key.
//! This module owns parsing and validation only; it opens no files other than the config.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The environment prefix for configuration overrides.
pub const ENV_PREFIX: &str = "FRAUDSTREAM__";

/// Tables whose keys are librdkafka property names (with dots), passed through unchanged.
const PASSTHROUGH_TABLES: [&str; 3] = ["kafka", "kafka-consumer", "kafka-producer"];

/// Why the configuration could not be loaded. Always fatal: fix the file, the environment or
/// the `--set` flags.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// In the file: where, and the full path of the key.
    #[error("invalid config {path}:{line}:{column}: {}{message}", key_prefix(.key))]
    File {
        path: PathBuf,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
    /// An override (a `FRAUDSTREAM__` variable or `--set`) that does not fit.
    #[error("invalid setting from {origin}: {}{message}", key_prefix(.key))]
    Override {
        origin: String,
        key: String,
        message: String,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

fn key_prefix(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("key `{key}`: ")
    }
}

/// The validated settings of one fraudstream instance.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Settings {
    /// Kafka bootstrap servers, comma separated (librdkafka `bootstrap.servers`).
    pub brokers: String,
    /// Consumer group: instances with the same id share the transactions topic's partitions.
    pub group_id: String,
    /// Topic names.
    pub topics: Topics,
    /// Which model scores, and where ONNX Runtime is.
    pub model: ModelSettings,
    /// Rules, the merchant enable list, reasons and the model's latency budget.
    pub decision: DecisionSettings,
    /// How input messages are decoded and bounded.
    pub input: InputSettings,
    /// How verdicts are encoded.
    pub output: OutputSettings,
    /// Micro-batching: the unit of scoring.
    pub batch: BatchSettings,
    /// The processing guarantee and how often it commits.
    pub processing: ProcessingSettings,
    /// The HTTP endpoint for `/metrics`, `/healthz` and `/readyz`.
    pub metrics: MetricsSettings,
    /// Where per-entity state lives and how identifiers are hashed.
    pub state: StateSettings,
    /// librdkafka properties for both the consumer and the producer.
    pub kafka: BTreeMap<String, KafkaValue>,
    /// librdkafka properties for the consumer only (applied after `[kafka]`).
    pub kafka_consumer: BTreeMap<String, KafkaValue>,
    /// librdkafka properties for the producer only (applied after `[kafka]`).
    pub kafka_producer: BTreeMap<String, KafkaValue>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            brokers: "127.0.0.1:9092".into(),
            group_id: "fraudstream".into(),
            topics: Topics::default(),
            model: ModelSettings::default(),
            decision: DecisionSettings::default(),
            input: InputSettings::default(),
            output: OutputSettings::default(),
            batch: BatchSettings::default(),
            processing: ProcessingSettings::default(),
            metrics: MetricsSettings::default(),
            state: StateSettings::default(),
            kafka: BTreeMap::new(),
            kafka_consumer: BTreeMap::new(),
            kafka_producer: BTreeMap::new(),
        }
    }
}

/// Topic names. `navigation`, `labels` and `blocklist` may be set to "" to run without
/// them; `changelog` and `repartition` default to `<group-id>-changelog` and
/// `<group-id>-repartition` (internal topics, created at start when missing).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Topics {
    pub transactions: String,
    pub navigation: String,
    pub labels: String,
    pub blocklist: String,
    pub verdicts: String,
    pub dead_letter: String,
    /// "" (the default): `<group-id>-changelog`.
    pub changelog: String,
    /// "" (the default): `<group-id>-repartition`.
    pub repartition: String,
}

/// The smallest `output.dead-letter-max-bytes`.
pub const MIN_DEAD_LETTER_BYTES: usize = 4096;

/// librdkafka's default `message.max.bytes`.
const PRODUCER_MAX_BYTES: usize = 1_000_000;

impl Settings {
    /// The producer's `message.max.bytes` (`[kafka-producer]`, else `[kafka]`, else
    /// librdkafka's default): no record it is given may be larger.
    pub fn producer_max_message_bytes(&self) -> anyhow::Result<usize> {
        const KEY: &str = "message.max.bytes";
        match self.kafka_producer.get(KEY).or_else(|| self.kafka.get(KEY)) {
            None => Ok(PRODUCER_MAX_BYTES),
            Some(v) => {
                let text = v.resolve(KEY)?;
                text.trim()
                    .parse()
                    .map_err(|_| anyhow::anyhow!("`{KEY}` = `{text}` is not a number of bytes"))
            }
        }
    }

    /// The changelog topic's name.
    pub fn changelog_topic(&self) -> String {
        if self.topics.changelog.is_empty() {
            format!("{}-changelog", self.group_id)
        } else {
            self.topics.changelog.clone()
        }
    }

    /// The repartition topic's name.
    pub fn repartition_topic(&self) -> String {
        if self.topics.repartition.is_empty() {
            format!("{}-repartition", self.group_id)
        } else {
            self.topics.repartition.clone()
        }
    }
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            transactions: "transactions".into(),
            navigation: "navigation".into(),
            labels: "labels".into(),
            blocklist: "blocklist".into(),
            verdicts: "verdicts".into(),
            dead_letter: "fraudstream-dlq".into(),
            changelog: String::new(),
            repartition: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ModelSettings {
    /// The model manifest (JSON); the ONNX file it names is found beside it.
    pub manifest: PathBuf,
    /// `libonnxruntime.so`. When unset, the `ORT_DYLIB_PATH` environment variable is used.
    pub onnxruntime_library: Option<PathBuf>,
    /// A challenger model's manifest: it scores every transaction too, its score and version
    /// go into the verdict's `shadow` field, and it never changes the decision.
    pub shadow: Option<PathBuf>,
    /// How often the model files are checked for changes (hot reload); 0 turns watching off
    /// (SIGHUP and `POST /admin/reload-model` still reload).
    pub watch_interval_ms: u64,
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            manifest: PathBuf::from("models/sparkov-xgb.manifest.json"),
            onnxruntime_library: None,
            shadow: None,
            watch_interval_ms: 1000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct DecisionSettings {
    /// The rules file (TOML, `src/decision/rules.rs`); unset: the model alone decides. Hot
    /// reloaded like the model.
    pub rules: Option<PathBuf>,
    /// Merchants whose transactions are scored; others get a `reject` verdict without
    /// scoring. Empty: every merchant is enabled.
    pub enabled_merchants: Vec<String>,
    /// How many of the features that pushed the score up most go into the reasons of review
    /// and decline verdicts (from the model's explanation trees); 0 = none.
    pub model_reasons: usize,
    /// A batch the model has not scored within this many milliseconds is decided by rules
    /// alone (`degraded`); 0 = no budget.
    pub latency_budget_ms: u64,
}

impl Default for DecisionSettings {
    fn default() -> Self {
        DecisionSettings {
            rules: None,
            enabled_merchants: Vec::new(),
            model_reasons: 3,
            latency_budget_ms: 0,
        }
    }
}

/// How the bytes of a transaction are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputFormat {
    /// JSON if the first non-blank byte is `{`, Confluent Avro if it is the magic byte 0,
    /// otherwise a plain Avro datum.
    Auto,
    Json,
    /// A plain Avro datum written with `schemas/transaction.avsc`.
    Avro,
    /// Magic byte 0, a 4-byte big-endian schema id, then an Avro datum.
    ConfluentAvro,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct InputSettings {
    pub format: InputFormat,
    /// Larger messages are dead-lettered without being parsed.
    pub max_message_bytes: usize,
    /// Larger amounts are dead-lettered (`invalid-amount`): one absurd amount must not skew
    /// a merchant's profile for everyone after it.
    pub max_amount: f64,
    /// An event more than this far (ms) ahead of both its partition's stream time and the
    /// wall clock is dead-lettered (`event-time-skew`): one bad clock must not move a
    /// partition's windows and expiry. 0 = no limit.
    pub max_future_skew_ms: u64,
    /// Confluent wire-format schema ids and the writer schema (`.avsc` path) each stands for.
    /// Records are resolved from the writer schema to fraudstream's Transaction schema, so
    /// compatible evolutions (added optional fields, reordering) decode. When empty, id 1 is
    /// fraudstream's own Transaction schema.
    pub schema_ids: BTreeMap<String, PathBuf>,
}

impl Default for InputSettings {
    fn default() -> Self {
        InputSettings {
            format: InputFormat::Auto,
            max_message_bytes: 64 * 1024,
            max_amount: 1e12,
            max_future_skew_ms: 86_400_000,
            schema_ids: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerdictFormat {
    Json,
    /// A plain Avro datum of `schemas/verdict.avsc`, or the Confluent wire format when
    /// `verdict-schema-id` is set.
    Avro,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct OutputSettings {
    pub verdict_format: VerdictFormat,
    /// Put every feature value of the registry (and the model's passthrough inputs) into each
    /// verdict, under `features`: for audits and offline/online parity checks.
    pub audit_features: bool,
    /// With `verdict-format = "avro"`: prefix each verdict with the Confluent magic byte
    /// and this schema id.
    pub verdict_schema_id: Option<u32>,
    /// A header of the transaction record copied to its verdict's record (W3C trace context
    /// by default, or a correlation id of your own); "" = none.
    pub trace_header: String,
    /// Most bytes of a dead letter (key, value and headers, as the producer counts them): a
    /// larger one carries its payload cut to fit, with `fraudstream.payload.truncated`. The
    /// limit in force is the smallest of this, the producer's `message.max.bytes` and the
    /// dead-letter topic's `max.message.bytes` (less their overheads).
    pub dead_letter_max_bytes: usize,
}

impl Default for OutputSettings {
    fn default() -> Self {
        OutputSettings {
            verdict_format: VerdictFormat::Json,
            audit_features: false,
            verdict_schema_id: None,
            trace_header: "traceparent".into(),
            dead_letter_max_bytes: 900_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct BatchSettings {
    /// Most messages taken from the consumer per batch.
    pub max_records: usize,
    /// How long a batch waits to fill once its first message arrived.
    pub max_wait_ms: u64,
    /// Event-time merge of a partition's inputs: how long a buffered record waits for
    /// another input of its partition that has nothing buffered and is read to its end, for
    /// a record still to be produced upstream (Kafka Streams' `max.task.idle.ms`).
    pub max_task_idle_ms: u64,
    /// How long it waits for an input with records on the broker not fetched yet (or
    /// whose position is not known yet); a bound for a broker that does not answer (Kafka
    /// Streams waits without one).
    pub max_fetch_wait_ms: u64,
    /// Bytes of input the merge may hold over all its partitions (messages and what was
    /// decoded from them): an input partition is paused once it holds its share (this over
    /// the assigned input partitions, at least 1 MiB), or 50,000 records.
    pub max_buffered_bytes: usize,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            max_records: 1000,
            max_wait_ms: 5,
            max_task_idle_ms: 0,
            max_fetch_wait_ms: 10_000,
            max_buffered_bytes: 256 * 1024 * 1024,
        }
    }
}

/// What a consumer of the verdicts topic can count on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Guarantee {
    /// Kafka Streams' `exactly_once_v2`: verdicts, dead letters, repartitioned records,
    /// changelog and input offsets are committed in one Kafka transaction; a `read_committed`
    /// reader sees each transaction's verdict once, after its commit.
    ExactlyOnce,
    /// Verdicts and dead letters are visible as soon as produced; after a crash a verdict may
    /// come twice (identical). State, repartitioned records and offsets are still committed
    /// in transactions: state is never applied twice.
    AtLeastOnce,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ProcessingSettings {
    pub guarantee: Guarantee,
    /// How often processed input is committed (one Kafka transaction), in milliseconds; also
    /// on revoke and shutdown. Unset, it follows the guarantee
    /// ([`ProcessingSettings::default_commit_interval_ms`]).
    pub commit_interval_ms: Option<u64>,
    /// Processing loops in this process, each a member of the consumer group with its own
    /// partitions, transactional producer, RocksDB store (`state.path`, then
    /// `state.path/worker-N`) and copy of the model: one per core given to the scorer (Kafka
    /// Streams' `num.stream.threads`).
    pub workers: usize,
}

/// The most `processing.workers`.
pub const MAX_WORKERS: usize = 64;

impl Default for ProcessingSettings {
    fn default() -> Self {
        ProcessingSettings {
            guarantee: Guarantee::ExactlyOnce,
            commit_interval_ms: None,
            workers: 1,
        }
    }
}

impl ProcessingSettings {
    /// The commit interval when none is set: 100 ms under exactly-once, where a verdict
    /// becomes visible at its commit; 1,000 ms under at-least-once, where verdicts go out at
    /// once and nothing waits for the commit (Kafka Streams, likewise, commits less often
    /// under at-least-once: every 30 s). A commit writes each entity its interval changed
    /// once: at 1,000 ms a backlog drained 12–22 % faster at 9–18 % less scorer CPU and half
    /// the broker's (bench/RESULTS.md); a crash replays about a second of input.
    pub fn default_commit_interval_ms(&self) -> u64 {
        match self.guarantee {
            Guarantee::ExactlyOnce => 100,
            Guarantee::AtLeastOnce => 1_000,
        }
    }

    /// `commit-interval-ms`, or the guarantee's default.
    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(
            self.commit_interval_ms
                .unwrap_or_else(|| self.default_commit_interval_ms()),
        )
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct MetricsSettings {
    /// Address of the HTTP endpoint; port 0 picks a free port (logged at start). Loopback by
    /// default: expose it (0.0.0.0) only where a network policy guards it.
    pub listen: SocketAddr,
    /// `/healthz` fails once the processing loop has not turned for this long (it turns at
    /// least every 100 ms; its longest blocking call waits 30 s).
    pub stall_timeout_ms: u64,
    /// Bearer token of `POST /admin/reload-model`, text or `{ file = "PATH" }`; unset: the
    /// admin endpoint is off.
    pub admin_token: Option<KafkaValue>,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            stall_timeout_ms: 60_000,
            admin_token: None,
        }
    }
}

/// The development secret, used only with `state.development-secret = true` (loudly).
pub const DEV_HMAC_SECRET: &str = "fraudstream-development-secret";

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct StateSettings {
    /// The RocksDB directory (created if missing). One per instance.
    pub path: PathBuf,
    /// Key for the HMAC that replaces every customer, merchant, card, e-mail, device and IP
    /// identifier in state. Text, or `{ file = "PATH" }`. Changing it orphans existing state.
    /// Required by `run`: a known key lets anyone with the changelog test every e-mail or IP
    /// address against it.
    pub hmac_secret: Option<KafkaValue>,
    /// Allows the built-in development key when `hmac-secret` is unset (a warning at start).
    /// For a laptop, never for real data.
    pub development_secret: bool,
    /// Most entities each global table (labels, blocklist) holds in memory; a record for a
    /// new entity beyond it is refused, counted and logged.
    pub max_global_entries: usize,
    /// Memory per worker's store for committed customers, merchants and sessions kept
    /// decoded (a third for each kind), in front of RocksDB.
    pub cache_bytes: usize,
}

/// The default `state.max-global-entries`.
pub const DEFAULT_MAX_GLOBAL_ENTRIES: usize = 2_000_000;

impl StateSettings {
    /// The RocksDB directory of worker `index`: `path` for the first, `path/worker-N` for
    /// the others (RocksDB leaves subdirectories of its own alone).
    pub fn worker_path(&self, index: usize) -> PathBuf {
        if index == 0 {
            self.path.clone()
        } else {
            self.path.join(format!("worker-{index}"))
        }
    }
}

impl Default for StateSettings {
    fn default() -> Self {
        StateSettings {
            path: PathBuf::from("fraudstream-state"),
            hmac_secret: None,
            development_secret: false,
            max_global_entries: DEFAULT_MAX_GLOBAL_ENTRIES,
            cache_bytes: crate::state::DEFAULT_CACHE_BYTES,
        }
    }
}

impl StateSettings {
    /// The HMAC key: the configured one, or the development one where allowed.
    pub fn secret(&self) -> anyhow::Result<String> {
        match &self.hmac_secret {
            Some(v) => {
                let s = v.resolve("state.hmac-secret")?;
                anyhow::ensure!(!s.is_empty(), "`state.hmac-secret` is empty");
                Ok(s)
            }
            None if self.development_secret => Ok(DEV_HMAC_SECRET.to_string()),
            None => anyhow::bail!(
                "`state.hmac-secret` is not set: give a random key of your own (text, or {{ file = \"PATH\" }}; `openssl rand -hex 32` makes one), or set `state.development-secret = true` on a development machine"
            ),
        }
    }
}

impl std::fmt::Debug for StateSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = match &self.hmac_secret {
            Some(KafkaValue::File { file }) => format!("(from file {})", file.display()),
            Some(_) => "<redacted>".into(),
            None => "(unset)".into(),
        };
        f.debug_struct("StateSettings")
            .field("path", &self.path)
            .field("hmac_secret", &secret)
            .field("development_secret", &self.development_secret)
            .finish()
    }
}

/// A librdkafka property value. librdkafka takes strings; numbers and booleans are accepted
/// in TOML for convenience and passed on as their text. `{ file = "PATH" }` reads the value
/// from a file at start (a mounted secret), without its trailing newline.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum KafkaValue {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
    File { file: PathBuf },
}

impl KafkaValue {
    /// The text to give librdkafka for property `key`, reading files.
    pub fn resolve(&self, key: &str) -> anyhow::Result<String> {
        match self {
            KafkaValue::File { file } => std::fs::read_to_string(file)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| anyhow::anyhow!("cannot read `{key}` from {}: {e}", file.display())),
            other => Ok(other.to_string()),
        }
    }
}

/// librdkafka properties whose values are secrets: never printed or logged.
pub fn is_secret(key: &str) -> bool {
    [
        "password",
        "secret",
        "key.pem",
        "oauthbearer.config",
        "sasl.username",
    ]
    .iter()
    .any(|s| key.contains(s))
}

impl std::fmt::Display for KafkaValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KafkaValue::Text(s) => f.write_str(s),
            KafkaValue::Integer(i) => write!(f, "{i}"),
            KafkaValue::Float(x) => write!(f, "{x}"),
            KafkaValue::Bool(b) => write!(f, "{b}"),
            KafkaValue::File { file } => write!(f, "(from file {})", file.display()),
        }
    }
}

impl Settings {
    /// Defaults, then `path` (if any), then the `FRAUDSTREAM__*` variables of `env`, then
    /// `sets` (`key.path=value`, the `--set` flags). A value from the environment or a flag
    /// is read as TOML (`10`, `true`) where that fits the key, and as text otherwise, so
    /// `FRAUDSTREAM__GROUP_ID=12345` is the group "12345".
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        sets: &[String],
    ) -> Result<Settings, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            None => String::new(),
        };
        Settings::from_text(path, &text, env, sets)
    }

    /// As [`Settings::load`], with the file's text given (`path` names it in errors).
    pub fn from_text(
        path: Option<&Path>,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        sets: &[String],
    ) -> Result<Settings, ConfigError> {
        // The file alone first, so that its errors carry their line, column and key.
        if let Some(p) = path {
            let de = toml::Deserializer::parse(text).map_err(|e| file_error(p, text, "", e))?;
            if let Err(e) = serde_path_to_error::deserialize::<_, Settings>(de) {
                let key = full_key(&e.path().to_string(), e.inner().message());
                return Err(file_error(p, text, &key, e.into_inner()));
            }
        }
        let table: toml::Table = toml::from_str(text).unwrap_or_default();
        let mut overrides = Vec::new();
        for (var, value) in env {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let key = env_key(rest).map_err(|message| ConfigError::Override {
                origin: var.clone(),
                key: String::new(),
                message,
            })?;
            overrides.push(Override::new(var, key, value));
        }
        for set in sets {
            let (key, value) = set.split_once('=').ok_or_else(|| ConfigError::Override {
                origin: format!("--set {set}"),
                key: String::new(),
                message: "expected `key.path=value`".into(),
            })?;
            overrides.push(Override::new(
                format!("--set {set}"),
                dotted_key(key.trim()),
                value.to_string(),
            ));
        }
        let mut settings = loop {
            let mut merged = table.clone();
            for o in &overrides {
                o.apply(&mut merged)?;
            }
            match serde_path_to_error::deserialize::<_, Settings>(toml::Value::Table(merged)) {
                Ok(s) => break s,
                Err(e) => {
                    let key = full_key(&e.path().to_string(), e.inner().message());
                    // A value read as a number or a boolean where text is wanted: text.
                    if let Some(o) = overrides
                        .iter_mut()
                        .rev()
                        .find(|o| o.key.join(".") == key && !o.as_text)
                    {
                        o.as_text = true;
                        continue;
                    }
                    let origin = overrides
                        .iter()
                        .rev()
                        .find(|o| {
                            key.starts_with(&o.key.join(".")) || o.key.join(".").starts_with(&key)
                        })
                        .map(|o| o.origin.clone());
                    let message = e.inner().message().trim().to_string();
                    return Err(match (origin, path) {
                        (Some(origin), _) => ConfigError::Override {
                            origin,
                            key,
                            message,
                        },
                        (None, Some(p)) => ConfigError::File {
                            path: p.to_path_buf(),
                            line: 0,
                            column: 0,
                            key,
                            message,
                        },
                        (None, None) => ConfigError::Invalid(format!("`{key}`: {message}")),
                    });
                }
            }
        };
        // Resolved here, so that the printed configuration shows the interval in force.
        let default_interval = settings.processing.default_commit_interval_ms();
        settings
            .processing
            .commit_interval_ms
            .get_or_insert(default_interval);
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what serde cannot: ranges and relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.brokers.trim().is_empty() {
            return bad("`brokers` is empty".into());
        }
        if self.group_id.trim().is_empty() {
            return bad("`group-id` is empty".into());
        }
        let t = &self.topics;
        for (key, name) in [
            ("transactions", &t.transactions),
            ("verdicts", &t.verdicts),
            ("dead-letter", &t.dead_letter),
        ] {
            if name.trim().is_empty() {
                return bad(format!("`topics.{key}` is empty"));
            }
        }
        if t.transactions == t.verdicts || t.transactions == t.dead_letter {
            return bad("`topics.transactions` must differ from the output topics".into());
        }
        if self.processing.commit_interval_ms == Some(0) {
            return bad("`processing.commit-interval-ms` must be at least 1".into());
        }
        if self.batch.max_records == 0 {
            return bad("`batch.max-records` must be at least 1".into());
        }
        if !(1..=MAX_WORKERS).contains(&self.processing.workers) {
            return bad(format!(
                "`processing.workers` must be between 1 and {MAX_WORKERS}"
            ));
        }
        if !(self.input.max_amount.is_finite() && self.input.max_amount > 0.0) {
            return bad("`input.max-amount` must be a finite number > 0".into());
        }
        if self.input.max_message_bytes == 0 {
            return bad("`input.max-message-bytes` must be at least 1".into());
        }
        if self.output.dead_letter_max_bytes < MIN_DEAD_LETTER_BYTES {
            return bad(format!(
                "`output.dead-letter-max-bytes` must be at least {MIN_DEAD_LETTER_BYTES} (room for the headers that say where a dead letter came from)"
            ));
        }
        for id in self.input.schema_ids.keys() {
            if id.parse::<u32>().is_err() {
                return bad(format!(
                    "`input.schema-ids` key `{id}` is not a schema id (an unsigned integer)"
                ));
            }
        }
        if self.output.verdict_schema_id.is_some()
            && self.output.verdict_format != VerdictFormat::Avro
        {
            return bad(
                "`output.verdict-schema-id` needs `output.verdict-format = \"avro\"`".into(),
            );
        }
        for (table, map) in [
            ("kafka", &self.kafka),
            ("kafka-consumer", &self.kafka_consumer),
        ] {
            for key in [
                "enable.auto.offset.store",
                "enable.auto.commit",
                "isolation.level",
            ] {
                if map.contains_key(key) {
                    return bad(format!(
                        "`{table}.\"{key}\"` cannot be set: fraudstream commits input offsets in its own transactions and reads committed records only"
                    ));
                }
            }
        }
        for key in ["transactional.id", "enable.idempotence"] {
            for (table, map) in [
                ("kafka", &self.kafka),
                ("kafka-producer", &self.kafka_producer),
            ] {
                if map.contains_key(key) {
                    return bad(format!(
                        "`{table}.\"{key}\"` cannot be set: fraudstream's producers are transactional (processing.guarantee)"
                    ));
                }
            }
        }
        for key in ["bootstrap.servers", "group.id"] {
            for (table, map) in [
                ("kafka", &self.kafka),
                ("kafka-consumer", &self.kafka_consumer),
                ("kafka-producer", &self.kafka_producer),
            ] {
                if map.contains_key(key) {
                    let own = if key == "group.id" {
                        "group-id"
                    } else {
                        "brokers"
                    };
                    return bad(format!("set `{own}` instead of `{table}.\"{key}\"`"));
                }
            }
        }
        Ok(())
    }

    /// A copy safe to print: secret librdkafka values replaced by `<redacted>`.
    pub fn redacted(&self) -> Settings {
        let mut s = self.clone();
        for map in [&mut s.kafka, &mut s.kafka_consumer, &mut s.kafka_producer] {
            for (k, v) in map.iter_mut() {
                if is_secret(k) && !matches!(v, KafkaValue::File { .. }) {
                    *v = KafkaValue::Text("<redacted>".into());
                }
            }
        }
        if let Some(t) = &mut s.metrics.admin_token {
            if !matches!(t, KafkaValue::File { .. }) {
                *t = KafkaValue::Text("<redacted>".into());
            }
        }
        if let Some(v) = &mut s.state.hmac_secret {
            if !matches!(v, KafkaValue::File { .. }) {
                *v = KafkaValue::Text("<redacted>".into());
            }
        }
        s
    }

    /// The ONNX Runtime library: the config key, else `ORT_DYLIB_PATH`.
    pub fn onnxruntime_library(&self) -> Option<PathBuf> {
        self.model
            .onnxruntime_library
            .clone()
            .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
    }
}

/// A setting given outside the file: its origin (the variable or the flag), the key path
/// it sets, and its value.
struct Override {
    origin: String,
    key: Vec<String>,
    value: String,
    /// Taken as text, not parsed as TOML (a librdkafka property always is).
    as_text: bool,
}

impl Override {
    fn new(origin: String, key: Vec<String>, value: String) -> Override {
        let as_text = key
            .first()
            .is_some_and(|t| PASSTHROUGH_TABLES.contains(&t.as_str()));
        Override {
            origin,
            key,
            value,
            as_text,
        }
    }

    fn apply(&self, table: &mut toml::Table) -> Result<(), ConfigError> {
        let mut current = table;
        let (last, parents) = self.key.split_last().expect("a key has a segment");
        for k in parents {
            let entry = current
                .entry(k.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            current = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::Override {
                        origin: self.origin.clone(),
                        key: self.key.join("."),
                        message: format!("`{k}` is a value, not a table"),
                    })
                }
            };
        }
        let value = if self.as_text {
            toml::Value::String(self.value.clone())
        } else {
            parse_value(&self.value)
        };
        current.insert(last.clone(), value);
        Ok(())
    }
}

/// The key path an environment variable names (`TOPICS__VERDICTS` → `topics.verdicts`;
/// in the librdkafka tables `_` is `.`: `KAFKA__SECURITY_PROTOCOL` → `kafka."security.protocol"`).
fn env_key(path: &str) -> Result<Vec<String>, String> {
    let segments: Vec<&str> = path.split("__").collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err("empty key segment (use `__` only between table and key)".into());
    }
    let mut key: Vec<String> = Vec::with_capacity(segments.len());
    for (i, raw) in segments.iter().enumerate() {
        let passthrough = i == 1 && PASSTHROUGH_TABLES.contains(&key[0].as_str());
        key.push(if passthrough {
            raw.to_ascii_lowercase().replace('_', ".")
        } else {
            raw.to_ascii_lowercase().replace('_', "-")
        });
        if passthrough && i + 1 < segments.len() {
            return Err("a librdkafka property is one segment after its table".into());
        }
    }
    Ok(key)
}

/// The key path of `--set` (`batch.max-records`; `kafka.security.protocol` is the property
/// `security.protocol` of `[kafka]`).
fn dotted_key(key: &str) -> Vec<String> {
    match key.split_once('.') {
        Some((table, rest)) if PASSTHROUGH_TABLES.contains(&table) => {
            vec![table.to_string(), rest.to_string()]
        }
        _ => key.split('.').map(str::to_string).collect(),
    }
}

/// Reads a value as a TOML value when it is one (`10`, `true`, `{ file = "x" }`), otherwise
/// as a string, so `FRAUDSTREAM__BROKERS=host:9092` needs no quotes.
fn parse_value(value: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()))
}

/// The full path of the key an error is about: serde's path, plus the field an
/// "unknown field" error names.
fn full_key(path: &str, message: &str) -> String {
    let path = if path == "." { "" } else { path };
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|m| m.split('`').next());
    match (path, unknown) {
        ("", Some(f)) => f.to_string(),
        (p, Some(f)) if p != f && !p.ends_with(&format!(".{f}")) => format!("{p}.{f}"),
        (p, _) => p.to_string(),
    }
}

fn file_error(path: &Path, text: &str, key: &str, e: toml::de::Error) -> ConfigError {
    let (line, column) = match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            (line, column)
        }
        None => (0, 0),
    };
    ConfigError::File {
        path: path.to_path_buf(),
        line,
        column,
        key: key.to_string(),
        message: e.message().trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "fraudstream-config-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, text).unwrap();
        Settings::load(
            Some(&path),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            &[],
        )
    }

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let s = Settings::load(None, Vec::new(), &[]).unwrap();
        assert_eq!(s.topics.transactions, "transactions");
        assert_eq!(s.topics.dead_letter, "fraudstream-dlq");
        assert_eq!(s.metrics.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(s.input.format, InputFormat::Auto);
    }

    #[test]
    fn unknown_key_in_file_is_named() {
        let err = load_str("brokers = \"x:1\"\n[topics]\nverdict = \"v\"\n", &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown field `verdict`"), "{msg}");
    }

    #[test]
    fn unknown_key_from_environment_is_named() {
        let err = Settings::load(
            None,
            vec![("FRAUDSTREAM__TOPICS__VERDICT".into(), "v".into())],
            &[],
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown field `verdict`"), "{msg}");
        assert!(msg.contains("FRAUDSTREAM__TOPICS__VERDICT"), "{msg}");
    }

    #[test]
    fn environment_overrides_file() {
        let s = load_str(
            "group-id = \"a\"\n[batch]\nmax-records = 10\n[kafka]\n\"fetch.wait.max.ms\" = 500\n",
            &[
                ("FRAUDSTREAM__GROUP_ID", "b"),
                ("FRAUDSTREAM__BATCH__MAX_RECORDS", "20"),
                ("FRAUDSTREAM__KAFKA__FETCH_WAIT_MAX_MS", "10"),
                ("FRAUDSTREAM__TOPICS__DEAD_LETTER", "dlq"),
                ("FRAUDSTREAM__BROKERS", "h:9092"),
                ("OTHER", "ignored"),
            ],
        )
        .unwrap();
        assert_eq!(s.group_id, "b");
        assert_eq!(s.batch.max_records, 20);
        assert_eq!(s.kafka["fetch.wait.max.ms"].to_string(), "10");
        assert_eq!(s.topics.dead_letter, "dlq");
        assert_eq!(s.brokers, "h:9092");
    }

    #[test]
    fn file_errors_name_line_column_and_the_key() {
        let err = load_str("group-id = \"g\"\n[batch]\nmax-records = \"many\"\n", &[]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("c.toml:3:15: key `batch.max-records`"),
            "{msg}"
        );
        let err = load_str("[topics]\nverdicts = \"v\"\nverdict = \"v\"\n", &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("c.toml:3:1: key `topics.verdict`"), "{msg}");
        assert!(msg.contains("unknown field `verdict`"), "{msg}");
    }

    #[test]
    fn overrides_from_environment_and_flags() {
        let sets: Vec<String> = [
            "batch.max-records=7",
            "kafka.security.protocol=ssl",
            "topics.verdicts=out",
        ]
        .map(String::from)
        .into();
        let s = Settings::load(
            None,
            vec![
                // Text where text is wanted, though it reads as a number.
                ("FRAUDSTREAM__GROUP_ID".into(), "12345".into()),
                ("FRAUDSTREAM__BATCH__MAX_RECORDS".into(), "3".into()),
            ],
            &sets,
        )
        .unwrap();
        assert_eq!(s.group_id, "12345");
        assert_eq!(s.batch.max_records, 7, "--set over the environment");
        assert_eq!(s.kafka["security.protocol"].to_string(), "ssl");
        assert_eq!(s.topics.verdicts, "out");
        let err = Settings::load(None, Vec::new(), &["batch.max-records=many".into()]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("--set batch.max-records=many"), "{msg}");
        assert!(msg.contains("key `batch.max-records`"), "{msg}");
        let err = Settings::load(None, Vec::new(), &["nothing".into()]).unwrap_err();
        assert!(err.to_string().contains("key.path=value"), "{err}");
    }

    #[test]
    fn the_resolved_config_prints_as_toml_that_loads_back() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/fraudstream.toml");
        let s = Settings::load(Some(&path), Vec::new(), &[]).unwrap();
        let text = toml::to_string(&s).unwrap();
        let dir =
            std::env::temp_dir().join(format!("fraudstream-roundtrip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("r.toml"), &text).unwrap();
        let back = Settings::load(Some(&dir.join("r.toml")), Vec::new(), &[]).unwrap();
        assert_eq!(toml::to_string(&back).unwrap(), text);
    }

    #[test]
    fn the_commit_interval_follows_the_guarantee_unless_set() {
        let interval = |text: &str, env: &[(&str, &str)]| {
            let s = load_str(text, env).unwrap();
            let printed: toml::Table = toml::from_str(&toml::to_string(&s).unwrap()).unwrap();
            let shown = printed["processing"]["commit-interval-ms"].as_integer();
            assert_eq!(
                shown,
                Some(s.processing.commit_interval().as_millis() as i64)
            );
            s.processing.commit_interval().as_millis()
        };
        assert_eq!(interval("", &[]), 100);
        let alo = "[processing]\nguarantee = \"at-least-once\"\n";
        assert_eq!(interval(alo, &[]), 1_000);
        let set = ("FRAUDSTREAM__PROCESSING__COMMIT_INTERVAL_MS", "250");
        assert_eq!(interval(alo, &[set]), 250);
        assert_eq!(interval("", &[set]), 250);
        let zero = ("FRAUDSTREAM__PROCESSING__COMMIT_INTERVAL_MS", "0");
        assert!(load_str(alo, &[zero]).is_err());
    }

    #[test]
    fn wrong_type_is_an_error() {
        let err = load_str("[batch]\nmax-records = \"many\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("invalid type"), "{err}");
    }

    #[test]
    fn relations_are_checked() {
        let err = load_str("[output]\nverdict-schema-id = 3\n", &[]).unwrap_err();
        assert!(err.to_string().contains("verdict-schema-id"), "{err}");
        let err = load_str("[kafka]\n\"group.id\" = \"x\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("group-id"), "{err}");
        let err = load_str(
            "[kafka-consumer]\n\"enable.auto.offset.store\" = true\n",
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("commits input offsets"), "{err}");
        let err = load_str("[kafka-producer]\n\"transactional.id\" = \"x\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("transactional"), "{err}");
        let err = load_str("[input.schema-ids]\nabc = \"x.avsc\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("abc"), "{err}");
    }

    #[test]
    fn an_hmac_key_is_required_unless_development_is_said() {
        let err = Settings::load(None, Vec::new(), &[])
            .unwrap()
            .state
            .secret()
            .unwrap_err();
        assert!(err.to_string().contains("openssl rand -hex 32"), "{err}");
        let dev =
            Settings::load(None, Vec::new(), &["state.development-secret=true".into()]).unwrap();
        assert_eq!(dev.state.secret().unwrap(), DEV_HMAC_SECRET);
        let mine = Settings::load(None, Vec::new(), &["state.hmac-secret=k3y".into()]).unwrap();
        assert_eq!(mine.state.secret().unwrap(), "k3y");
        let printed = toml::to_string(&mine.redacted()).unwrap();
        assert!(!printed.contains("k3y"), "{printed}");
    }

    #[test]
    fn secrets_come_from_files_and_are_redacted() {
        let dir = std::env::temp_dir().join(format!("fraudstream-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("pw");
        std::fs::write(&secret, "hunter2\n").unwrap();
        let s = load_str(
            &format!(
                "[kafka]\n\"sasl.password\" = {{ file = \"{}\" }}\n\"ssl.key.password\" = \"inline-secret\"\n\"client.id\" = \"fs\"\n",
                secret.display()
            ),
            &[("FRAUDSTREAM__KAFKA_PRODUCER__SASL_PASSWORD", "from-env")],
        )
        .unwrap();
        assert_eq!(
            s.kafka["sasl.password"].resolve("sasl.password").unwrap(),
            "hunter2"
        );
        let printed = format!("{:?}", s.redacted());
        for secret in ["hunter2", "inline-secret", "from-env"] {
            assert!(!printed.contains(secret), "{secret} printed: {printed}");
        }
        assert!(printed.contains("\"fs\""));
        let missing = KafkaValue::File {
            file: dir.join("nope"),
        };
        assert!(missing
            .resolve("sasl.password")
            .unwrap_err()
            .to_string()
            .contains("sasl.password"));
    }

    #[test]
    fn shipped_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/fraudstream.toml");
        Settings::load(Some(&path), Vec::new(), &[]).unwrap();
    }
}
