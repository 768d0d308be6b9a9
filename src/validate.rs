//! `fraudstream validate`: the checks to run before a deploy. Everything `run` would refuse
//! at start, plus what it would only discover later, reported as one list instead of the
//! first error: the model (and shadow) against the feature registry, the rules file, the
//! Avro schemas, broker
//! reachability, the topics and their partition counts (navigation must be co-partitioned
//! with transactions).

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::Settings;
use crate::decision::rules::RuleSet;
use crate::decode::Decoder;
use crate::features::REGISTRY_VERSION;
use crate::model::{self, Model};
use crate::source;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warning,
    Problem,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = match self.level {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Problem => "problem",
        };
        write!(f, "{tag:<8} {}", self.message)
    }
}

fn ok(message: String) -> Finding {
    Finding {
        level: Level::Ok,
        message,
    }
}
fn warning(message: String) -> Finding {
    Finding {
        level: Level::Warning,
        message,
    }
}
fn problem(message: String) -> Finding {
    Finding {
        level: Level::Problem,
        message,
    }
}

/// Runs every check; `metadata_timeout` bounds the wait for the brokers.
pub fn validate(settings: &Settings, metadata_timeout: Duration) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Some(path) = &settings.decision.rules {
        match RuleSet::load(path) {
            Ok(r) => out.push(ok(format!(
                "rules {} ({}): {} rule(s) checked, reading {} feature(s)",
                r.version,
                path.display(),
                r.rules.len(),
                r.features.len()
            ))),
            Err(e) => out.push(problem(e.to_string())),
        }
    }
    if let Some(path) = &settings.model.shadow {
        match model::init_runtime(settings.onnxruntime_library().as_deref())
            .and_then(|env| Model::load(env, path))
        {
            Ok(m) => out.push(ok(format!(
                "shadow model {} ({})",
                m.manifest.model_version,
                path.display()
            ))),
            Err(e) => out.push(problem(format!("shadow model: {e}"))),
        }
    }
    let loaded = model::init_runtime(settings.onnxruntime_library().as_deref())
        .and_then(|env| Model::load(env, &settings.model.manifest));
    match loaded {
        Ok(m) => {
            out.push(ok(format!(
                "model {} ({}): {} features, all known to feature registry version {REGISTRY_VERSION}; ONNX input matches",
                m.manifest.model_version,
                settings.model.manifest.display(),
                m.features.len()
            )));
            match Decoder::new(&settings.input, m.features.requirements()) {
                Ok(_) => out.push(ok(format!(
                    "input format {:?}, {} Confluent schema id(s) configured",
                    settings.input.format,
                    settings.input.schema_ids.len().max(1)
                ))),
                Err(e) => out.push(problem(format!("input: {e:#}"))),
            }
        }
        Err(e) => out.push(problem(format!("model: {e}"))),
    }

    let consumer: Result<BaseConsumer, _> = source::client_config(settings).and_then(|c| {
        c.create()
            .map_err(|e| anyhow::anyhow!("cannot create a Kafka client: {e}"))
    });
    let consumer = match consumer {
        Ok(c) => c,
        Err(e) => {
            out.push(problem(format!("kafka: {e:#}")));
            return out;
        }
    };
    let md = match consumer.fetch_metadata(None, metadata_timeout) {
        Ok(md) => md,
        Err(e) => {
            out.push(problem(format!(
                "brokers {}: not reachable within {metadata_timeout:?}: {e}",
                settings.brokers
            )));
            return out;
        }
    };
    out.push(ok(format!(
        "brokers {}: reachable, {} broker(s) in the cluster",
        settings.brokers,
        md.brokers().len()
    )));
    let partitions = |name: &str| {
        md.topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len())
    };
    let topics = &settings.topics;
    let tx_partitions = partitions(&topics.transactions);
    for (key, name) in [
        ("transactions", &topics.transactions),
        ("verdicts", &topics.verdicts),
        ("dead-letter", &topics.dead_letter),
    ] {
        match partitions(name) {
            Some(n) => out.push(ok(format!("topic {key} `{name}`: {n} partitions"))),
            None => out.push(problem(format!(
                "topic {key} `{name}`: does not exist (create it before starting)"
            ))),
        }
    }
    match (partitions(&topics.navigation), tx_partitions) {
        (Some(n), Some(t)) if n != t => out.push(problem(format!(
            "topic navigation `{}`: {n} partitions, but transactions has {t}; they must be co-partitioned (same key, same count)",
            topics.navigation
        ))),
        (Some(n), _) => out.push(ok(format!(
            "topic navigation `{}`: {n} partitions, co-partitioned with transactions",
            topics.navigation
        ))),
        (None, _) => out.push(warning(format!(
            "topic navigation `{}`: does not exist (not read yet; needed by the navigation features)",
            topics.navigation
        ))),
    }
    out
}
