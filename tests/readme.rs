//! The README's quickstart, run as written: it starts a broker, creates the topics, builds
//! and starts fraudstream, sends a transaction with Kafka's console producer, another with
//! confluent-kafka and a third with kcat, reads the verdicts back, and stops everything. If a
//! README command stops working, this fails.

use std::process::Command;

use crate::util::*;

/// The first ```sh block after `heading` in the README.
fn block_after(heading: &str) -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let from = readme
        .find(heading)
        .unwrap_or_else(|| panic!("README has no `{heading}`"));
    let rest = &readme[from..];
    let start = rest.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let end = rest[start..].find("\n```").expect("the block's end");
    rest[start..start + end].to_string()
}

#[test]
fn readme_quickstart_runs_as_written() {
    let script = block_after("## Quickstart");
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(repo())
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // The three verdicts, each a JSON object naming its transaction.
    for id in ["tx-0001", "tx-0002", "tx-0003"] {
        let line = stdout
            .lines()
            .find(|l| l.contains(&format!("\"transaction_id\":\"{id}\"")))
            .unwrap_or_else(|| panic!("no verdict for {id}:\n{stdout}\n{stderr}"));
        let v: fraudstream::decision::Verdict = serde_json::from_str(line).expect("a verdict");
        assert_eq!(v.model_version, "sparkov-xgb-v1");
    }
}
