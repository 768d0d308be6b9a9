//! The chaos runs' short variants (the long one is `scripts/chaos`): 40,000 transactions
//! (keyed, keyed on another partition, unkeyed) with navigation events, scored cleanly and
//! through SIGKILLs (some inside a commit), joins and leaves, and a SIGKILL of the broker,
//! on a broker of the run's own; `scripts/py/chaos.py` checks and prints the figures.

use std::process::Command;

use crate::util::*;

fn chaos(guarantee: &str, transactions: &str, workers: &str) -> serde_json::Value {
    let python =
        std::env::var("FRAUDSTREAM_PYTHON").expect("FRAUDSTREAM_PYTHON (scripts/test sets it)");
    let out = Command::new(python)
        .current_dir(repo())
        .arg("scripts/py/chaos.py")
        .args(["--bin", env!("CARGO_BIN_EXE_fraudstream")])
        .args(["--guarantee", guarantee])
        .args(["--transactions", transactions, "--batch", "50"])
        .args(["--workers", workers])
        .args(["--timeout", "900"])
        .output()
        .expect("run chaos.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "{stdout}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).expect("JSON summary");
    assert_eq!(summary["transactions_without_verdict"], 0, "{summary}");
    assert_eq!(summary["verdicts_differing_from_clean"], 0, "{summary}");
    assert_eq!(summary["differing_duplicates"], 0, "{summary}");
    assert_eq!(summary["state_lines_differing"], 0, "{summary}");
    assert!(summary["kills"].as_u64() >= Some(5), "{summary}");
    assert!(summary["kills_in_commit"].as_u64() >= Some(1), "{summary}");
    assert!(summary["joins_and_leaves"].as_u64() >= Some(5), "{summary}");
    assert_eq!(summary["broker_kills"], 1, "{summary}");
    eprintln!("{summary}");
    summary
}

/// Exactly once: a read_committed reader sees one verdict per transaction, equal to the
/// clean run's, and the final state is the clean run's.
#[test]
fn exactly_once_under_chaos() {
    let summary = chaos("exactly-once", "40000", "1");
    assert_eq!(summary["duplicates"], 0, "{summary}");
    assert_eq!(summary["verdicts"], 40000, "{summary}");
}

/// Exactly once with two workers in each instance (`processing.workers`): partitions move
/// between the workers of a process as between processes, a SIGKILL takes both, and what a
/// read_committed reader sees and the final state are the clean one-worker run's.
#[test]
fn exactly_once_under_chaos_with_two_workers_per_instance() {
    let summary = chaos("exactly-once", "40000", "2");
    assert_eq!(summary["duplicates"], 0, "{summary}");
    assert_eq!(summary["verdicts"], 40000, "{summary}");
}

/// At least once: every transaction has a verdict, duplicates are identical, and state is
/// still the clean run's (never applied twice).
#[test]
fn at_least_once_under_chaos() {
    chaos("at-least-once", "40000", "1");
}
