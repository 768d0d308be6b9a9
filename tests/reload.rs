//! Hot reload and the shadow model, on a running scorer under load.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fraudstream::decision::Decision;

use crate::util::*;

/// A folder for model files a test rewrites while the scorer runs.
fn model_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(unique("models"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `dir/model.json`: the shipped ULB manifest renamed `version`, reading `onnx`
/// (relative to `dir`, or absolute). Written beside and renamed, as a deploy would.
fn write_manifest(
    dir: &Path,
    version: &str,
    onnx: &Path,
    edit: impl FnOnce(&mut serde_json::Value),
) {
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(manifest_path()).unwrap()).unwrap();
    m["model_version"] = version.into();
    m["onnx"] = onnx.to_str().unwrap().into();
    edit(&mut m);
    let tmp = dir.join(".model.json.tmp");
    std::fs::write(&tmp, m.to_string()).unwrap();
    std::fs::rename(&tmp, dir.join("model.json")).unwrap();
}

/// The value of the first metric line starting with `prefix`.
fn metric(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn models_swapped_under_load_score_every_transaction_once() {
    let t = topics("reload", 3).await;
    let dir = model_dir();
    let shipped = repo().join("models/ulb-xgb.onnx");
    for f in ["a.onnx", "b.onnx", "c.onnx"] {
        std::fs::copy(&shipped, dir.join(f)).unwrap();
    }
    write_manifest(&dir, "ulb-a", Path::new("a.onnx"), |_| {});
    let manifest = dir.join("model.json");
    let rules = dir.join("rules.toml");
    let write_rules = |when: &str| {
        let text = format!(
            "version = \"v\"\n[[rule]]\ncode = \"everything\"\nwhen = \"{when}\"\naction = \"decline\"\ntext = \"all\"\n"
        );
        std::fs::write(dir.join(".rules.tmp"), text).unwrap();
        std::fs::rename(dir.join(".rules.tmp"), &rules).unwrap();
    };
    write_rules("false");
    let mut scorer = Scorer::start_watching(&t, &manifest, &rules).await;

    // About 1,000 transactions a second for 4 s while the model files change.
    let n = 4000;
    let records = sample_stream(n, "r", 50, fraudstream::pipeline::now_ms(), 1);
    let producing = produce_paced(&t.transactions, records);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A broken model is refused, by the endpoint as by the watcher, and scoring goes on.
    std::fs::write(dir.join("broken.onnx"), b"not an ONNX model").unwrap();
    write_manifest(&dir, "broken", Path::new("broken.onnx"), |_| {});
    let (status, body) = scorer.http("POST", "/admin/reload-model").await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("SHA-256"), "{body}");
    write_manifest(&dir, "broken", Path::new("broken.onnx"), |m| {
        m.as_object_mut().unwrap().remove("onnx_sha256");
    });
    let (status, body) = scorer.http("POST", "/admin/reload-model").await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("cannot load ONNX model"), "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Files replaced: the watcher loads them (the rules too).
    write_manifest(&dir, "ulb-b", Path::new("b.onnx"), |_| {});
    write_rules("amount >= 0");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // SIGHUP (which would otherwise end the process) reloads too.
    write_manifest(&dir, "ulb-c", Path::new("c.onnx"), |_| {});
    scorer.signal("HUP");
    producing.await.unwrap();

    let mut reader = Reader::new(&t.verdicts);
    let all = reader
        .read_until_distinct_keys(Duration::from_secs(90), n)
        .await;
    assert!(all, "verdicts missing; log:\n{}", scorer.log_text());
    reader.drain_for(Duration::from_secs(2)).await;
    let log = scorer.log_text();
    assert_eq!(
        reader.messages.len(),
        n,
        "every transaction scored exactly once; log:\n{log}"
    );

    // Each verdict names the model that scored it; the models took over in order, each
    // from a batch boundary on: no verdict of an older model after one of a newer.
    let by_id = verdicts_by_id(&reader.messages);
    let thresholds = fraudstream::model::Manifest::read(&manifest_path())
        .unwrap()
        .thresholds;
    let mut spans: BTreeMap<String, (i64, i64, usize)> = BTreeMap::new();
    let (mut before_rule, mut after_rule) = (i64::MIN, i64::MAX);
    for v in by_id.values().map(|v| &v[0]) {
        if v.reasons.iter().any(|r| r.code == "everything") {
            assert_eq!(v.decision, Decision::Decline);
            after_rule = after_rule.min(v.scored_at);
        } else {
            assert_eq!(v.decision, thresholds.decide(v.score));
            before_rule = before_rule.max(v.scored_at);
        }
        let s = spans
            .entry(v.model_version.clone())
            .or_insert((i64::MAX, i64::MIN, 0));
        s.0 = s.0.min(v.scored_at);
        s.1 = s.1.max(v.scored_at);
        s.2 += 1;
    }
    let versions: Vec<&str> = spans.keys().map(String::as_str).collect();
    assert_eq!(versions, ["ulb-a", "ulb-b", "ulb-c"], "{spans:?}\n{log}");
    assert!(
        spans["ulb-a"].1 <= spans["ulb-b"].0 && spans["ulb-b"].1 <= spans["ulb-c"].0,
        "models overlap in time: {spans:?}"
    );
    assert!(
        before_rule > i64::MIN && after_rule < i64::MAX && before_rule <= after_rule,
        "the new rules apply from one batch on: {before_rule} {after_rule}"
    );
    assert!(log.contains("Reload refused"), "{log}");
    assert!(log.contains("SIGHUP"), "{log}");
    assert!(scorer.running(), "SIGHUP must not end the process");

    let (_, body) = scorer.http_get("/metrics").await;
    let refused = metric(
        &body,
        r#"fraudstream_reloads_total{target="primary",result="refused"}"#,
    );
    assert!(refused.is_some_and(|r| r >= 2.0), "{body}");
    assert_eq!(
        metric(
            &body,
            r#"fraudstream_model_info{model="primary",model_version="ulb-c"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &body,
            r#"fraudstream_model_info{model="primary",model_version="ulb-a"}"#
        ),
        Some(0.0)
    );
    scorer.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn shadow_model_scores_every_transaction_and_never_decides() {
    let t = topics("shadow", 3).await;
    let dir = model_dir();
    // The challenger: the same trees, thresholds that would decline everything.
    write_manifest(
        &dir,
        "ulb-shadow",
        &repo().join("models/ulb-xgb.onnx"),
        |m| m["thresholds"] = serde_json::json!({"review": 0.0, "decline": 0.0}),
    );
    let shadow = dir.join("model.json");
    let n = 300;
    let records = sample_stream(n, "s", 20, fraudstream::pipeline::now_ms(), 1);
    send_all(&producer(), &t.transactions, &records).await;
    let mut scorer = Scorer::start(
        &t,
        &[("FRAUDSTREAM__MODEL__SHADOW", shadow.to_str().unwrap())],
    );
    let mut reader = Reader::new(&t.verdicts);
    let all = reader
        .read_until_distinct_keys(Duration::from_secs(90), n)
        .await;
    assert!(all, "verdicts missing; log:\n{}", scorer.log_text());

    let primary = fraudstream::model::Manifest::read(&manifest_path()).unwrap();
    let by_id = verdicts_by_id(&reader.messages);
    let mut decisions = HashSet::new();
    for v in by_id.values().map(|v| &v[0]) {
        let s = v.shadow.as_ref().expect("shadow score on every verdict");
        assert_eq!(s.model_version, "ulb-shadow");
        assert!((s.score - v.score).abs() < 1e-6, "same trees, same score");
        assert_eq!(s.decision, Decision::Decline);
        // The decision is the primary model's own.
        assert_eq!(v.model_version, primary.model_version);
        assert_eq!(v.decision, primary.thresholds.decide(v.score));
        decisions.insert(v.decision);
    }
    assert!(decisions.contains(&Decision::Approve), "{decisions:?}");
    scorer.stop();
}
