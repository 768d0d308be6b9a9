//! The chaos run's short variant (the long one is `scripts/chaos`): 20,000 transactions with
//! navigation events, scored cleanly and through 5 SIGKILLs and 5 joins/leaves; every
//! transaction answered, duplicates identical, verdicts and final state equal to the clean
//! run's (`scripts/py/chaos.py` checks and prints the figures).

use std::process::Command;

use crate::util::*;

#[test]
fn short_chaos_run() {
    let python =
        std::env::var("FRAUDSTREAM_PYTHON").expect("FRAUDSTREAM_PYTHON (scripts/test sets it)");
    let out = Command::new(python)
        .current_dir(repo())
        .arg("scripts/py/chaos.py")
        .args(["--bin", env!("CARGO_BIN_EXE_fraudstream")])
        .args(["--bootstrap", &brokers()])
        .args([
            "--transactions",
            "20000",
            "--batch",
            "50",
            "--timeout",
            "600",
        ])
        .output()
        .expect("run chaos.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).expect("JSON summary");
    assert_eq!(summary["transactions_without_verdict"], 0);
    assert_eq!(summary["verdicts_differing_from_clean"], 0);
    assert_eq!(summary["state_lines_differing"], 0);
    assert!(summary["kills"].as_u64() >= Some(5), "{summary}");
    assert!(summary["joins_and_leaves"].as_u64() >= Some(5), "{summary}");
    eprintln!("{summary}");
}

/// A broker on durable storage (nisshi with sqlite, started by the script on a free port) is
/// SIGKILLed twice mid-stream and restarted: nothing lost, nothing applied twice.
#[test]
fn broker_restarts_lose_nothing_and_apply_nothing_twice() {
    let python =
        std::env::var("FRAUDSTREAM_PYTHON").expect("FRAUDSTREAM_PYTHON (scripts/test sets it)");
    let nisshi =
        std::env::var("FRAUDSTREAM_NISSHI").expect("FRAUDSTREAM_NISSHI (scripts/test sets it)");
    let out = Command::new(python)
        .current_dir(repo())
        .arg("scripts/py/broker_restart.py")
        .args([
            "--bin",
            env!("CARGO_BIN_EXE_fraudstream"),
            "--nisshi",
            &nisshi,
        ])
        .args(["--transactions", "10000", "--restarts", "2"])
        .output()
        .expect("run broker_restart.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(&stdout).expect("JSON summary");
    assert_eq!(summary["broker_restarts"], 2);
    assert_eq!(summary["transactions_without_verdict"], 0);
    assert_eq!(summary["verdicts_differing_from_clean"], 0);
    assert_eq!(summary["state_lines_differing"], 0);
    eprintln!("{summary}");
}
