//! `fraudstream validate`: the checks to run before a deploy. Everything `run` would refuse
//! at start, reported as one list instead of the first error: the model (and shadow)
//! against the feature registry, the rules file, the Avro schemas, broker reachability, and
//! the topics (the same check `run` makes: [`topology::check`]).

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::Settings;
use crate::decision::rules::RuleSet;
use crate::decode::Decoder;
use crate::features::REGISTRY_VERSION;
use crate::model::{self, Model};
use crate::pipeline::topology;
use crate::source;

pub use crate::pipeline::topology::{Finding, Level};

fn ok(message: String) -> Finding {
    Finding::ok(message)
}
fn problem(message: String) -> Finding {
    Finding::problem(message)
}

/// Runs every check; `brokers` bounds the wait for the brokers (`None`: offline, no Kafka
/// checks).
pub fn validate(settings: &Settings, brokers: Option<Duration>) -> Vec<Finding> {
    let mut out = Vec::new();
    match settings.state.secret() {
        Ok(s) if s == crate::config::DEV_HMAC_SECRET => out.push(Finding::warning(
            "state: the built-in development HMAC key (state.development-secret)".into(),
        )),
        Ok(_) => out.push(ok("state: HMAC key configured".into())),
        Err(e) => out.push(problem(format!("state: {e}"))),
    }
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

    let Some(metadata_timeout) = brokers else {
        out.push(Finding::warning(
            "brokers and topics: not checked (--offline)".to_string(),
        ));
        return out;
    };
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
    // The topics, exactly as `run` checks them at start.
    out.extend(topology::check(settings, &md).1);
    out
}
