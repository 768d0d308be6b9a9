//! `fraudstream validate` lists every problem of a deployment, and passes a good one.

use std::process::Command;

use crate::util::*;

fn validate(env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fraudstream"));
    cmd.current_dir(repo())
        .args([
            "validate",
            "--config",
            "docs/fraudstream.toml",
            "--timeout",
            "5",
        ])
        .env("FRAUDSTREAM__BROKERS", brokers())
        .env("FRAUDSTREAM__STATE__HMAC_SECRET", HMAC_SECRET)
        // Not the default `fraudstream-state` in the checkout.
        .env(
            "FRAUDSTREAM__STATE__PATH",
            std::env::temp_dir().join(unique("state")),
        );
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run validate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_good_deployment_passes() {
    let t = topics("validate-ok", 3).await;
    let navigation = unique("validate-nav");
    create_topics(&[(&navigation, 3)]).await;
    let (ok, out) = validate(&[
        ("FRAUDSTREAM__TOPICS__TRANSACTIONS", &t.transactions),
        ("FRAUDSTREAM__TOPICS__VERDICTS", &t.verdicts),
        ("FRAUDSTREAM__TOPICS__DEAD_LETTER", &t.dead_letter),
        ("FRAUDSTREAM__TOPICS__NAVIGATION", &navigation),
        ("FRAUDSTREAM__TOPICS__LABELS", &t.labels),
        ("FRAUDSTREAM__TOPICS__BLOCKLIST", &t.blocklist),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("No problems."), "{out}");
    assert!(out.contains("rules rules-2026-11-22"), "{out}");
    assert!(out.contains("co-partitioned with transactions"), "{out}");
    assert!(!out.contains("problem "), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_problem_is_listed() {
    let t = topics("validate-bad", 3).await;
    let navigation = unique("validate-nav");
    create_topics(&[(&navigation, 2)]).await;
    let missing = unique("validate-missing");

    let bad_manifest = manifest_with_feature(0, "customer_velocity_1m");
    let bad_rules = std::env::temp_dir().join(unique("rules.toml"));
    std::fs::write(
        &bad_rules,
        "version = \"x\"\n[[rule]]\ncode = \"big\"\nwhen = \"amount >\"\naction = \"decline\"\ntext = \"t\"\n",
    )
    .unwrap();

    let (ok, out) = validate(&[
        ("FRAUDSTREAM__TOPICS__TRANSACTIONS", &t.transactions),
        ("FRAUDSTREAM__TOPICS__VERDICTS", &t.verdicts),
        ("FRAUDSTREAM__TOPICS__DEAD_LETTER", &missing),
        ("FRAUDSTREAM__TOPICS__NAVIGATION", &navigation),
        ("FRAUDSTREAM__TOPICS__LABELS", &t.labels),
        ("FRAUDSTREAM__TOPICS__BLOCKLIST", &t.blocklist),
        (
            "FRAUDSTREAM__MODEL__MANIFEST",
            bad_manifest.to_str().unwrap(),
        ),
        ("FRAUDSTREAM__DECISION__RULES", bad_rules.to_str().unwrap()),
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("unknown feature `customer_velocity_1m`"),
        "{out}"
    );
    assert!(
        out.contains(&format!("`{missing}`: does not exist")),
        "{out}"
    );
    assert!(
        out.contains("2 partitions, but transactions has 3"),
        "{out}"
    );
    assert!(out.contains("rule `big`: `when`"), "{out}");
    assert!(out.contains("4 problem(s)."), "{out}");

    let (ok, out) = validate(&[("FRAUDSTREAM__BROKERS", "127.0.0.1:1")]);
    assert!(!ok);
    assert!(out.contains("127.0.0.1:1: not reachable"), "{out}");
}
