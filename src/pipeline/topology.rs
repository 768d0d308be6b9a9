//! What `run` needs of the cluster, checked the same way by `run` (which refuses to start
//! on any problem) and by `validate` (which lists them all): the topics exist, the inputs
//! are co-partitioned, and the internal topics, where they exist already, match.

use rdkafka::metadata::Metadata;

use crate::config::Settings;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warning,
    Problem,
}

/// One line of a check's report.
#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    pub message: String,
}

impl Finding {
    pub fn ok(message: String) -> Finding {
        Finding {
            level: Level::Ok,
            message,
        }
    }
    pub fn warning(message: String) -> Finding {
        Finding {
            level: Level::Warning,
            message,
        }
    }
    pub fn problem(message: String) -> Finding {
        Finding {
            level: Level::Problem,
            message,
        }
    }
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

/// The topics of a running scorer, as checked.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Partitions of every input (transactions, navigation, repartition, changelog).
    pub partitions: u32,
    /// Internal topics that do not exist yet: created at start (name, compacted).
    pub missing_internal: Vec<(String, bool)>,
}

/// Checks `md` against the settings. The topology is `Some` only when nothing is a problem.
pub fn check(settings: &Settings, md: &Metadata) -> (Option<Topology>, Vec<Finding>) {
    let partitions = |name: &str| {
        md.topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len())
    };
    let mut out = Vec::new();
    let topics = &settings.topics;
    for (key, name) in [
        ("transactions", &topics.transactions),
        ("verdicts", &topics.verdicts),
        ("dead-letter", &topics.dead_letter),
    ] {
        match partitions(name) {
            Some(n) => out.push(Finding::ok(format!("topic {key} `{name}`: {n} partitions"))),
            None => out.push(Finding::problem(format!(
                "topic {key} `{name}`: does not exist; create it first"
            ))),
        }
    }
    let n = partitions(&topics.transactions);
    if !topics.navigation.is_empty() {
        match (partitions(&topics.navigation), n) {
            (Some(m), Some(t)) if m != t => out.push(Finding::problem(format!(
                "topic navigation `{}`: {m} partitions, but transactions has {t}; they must be co-partitioned (same key, same partition count)",
                topics.navigation
            ))),
            (Some(m), _) => out.push(Finding::ok(format!(
                "topic navigation `{}`: {m} partitions, co-partitioned with transactions",
                topics.navigation
            ))),
            (None, _) => out.push(Finding::problem(format!(
                "topic navigation `{}`: does not exist; create it with as many partitions as transactions, or set topics.navigation = \"\"",
                topics.navigation
            ))),
        }
    }
    for (key, name) in [("labels", &topics.labels), ("blocklist", &topics.blocklist)] {
        if name.is_empty() {
            continue;
        }
        match partitions(name) {
            Some(m) => out.push(Finding::ok(format!(
                "topic {key} `{name}`: {m} partitions (global table)"
            ))),
            None => out.push(Finding::problem(format!(
                "topic {key} `{name}`: does not exist; create it first, or set topics.{key} = \"\""
            ))),
        }
    }
    let mut missing_internal = Vec::new();
    for (name, compacted) in [
        (settings.repartition_topic(), false),
        (settings.changelog_topic(), true),
    ] {
        match (partitions(&name), n) {
            (Some(m), Some(t)) if m != t => out.push(Finding::problem(format!(
                "internal topic `{name}`: {m} partitions, but transactions has {t}; recreate it with {t}"
            ))),
            (Some(m), _) => out.push(Finding::ok(format!("internal topic `{name}`: {m} partitions"))),
            (None, _) => {
                out.push(Finding::ok(format!(
                    "internal topic `{name}`: created at start{}",
                    if compacted { " (compacted)" } else { "" }
                )));
                missing_internal.push((name, compacted));
            }
        }
    }
    let ok = !out.iter().any(|f| f.level == Level::Problem);
    let topology = match n {
        Some(n) if ok => Some(Topology {
            partitions: n as u32,
            missing_internal,
        }),
        _ => None,
    };
    (topology, out)
}
