//! The decision engine on a running scorer: rules and the model as one judge, reasons on
//! verdicts, the merchant enable list, and degraded mode when the model fails mid-stream.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use fraudstream::decision::{Decision, Verdict};

use crate::util::*;

const T0: i64 = 1_795_000_000_000;

/// A sample row the ULB model approves, as JSON with `email` and `merchant_id` set.
fn tx_json(id: &str, email: &str, merchant: &str, time: i64) -> String {
    let rows = sample();
    let mut model = model();
    let mut scores = Vec::new();
    let row = rows
        .iter()
        .find(|r| {
            let txs = [fraudstream::decode::Transaction {
                features: Some(r.features()),
                ..Default::default()
            }];
            model.score(txs.iter(), &mut scores).unwrap();
            model.manifest.thresholds.decide(scores[0]) == Decision::Approve
        })
        .expect("an approved row");
    row.json(id, "c1", time)
        .replacen(
            r#""merchant_id":"m-1""#,
            &format!(r#""merchant_id":"{merchant}""#),
            1,
        )
        .replacen(
            r#""channel""#,
            &format!(r#""email":"{email}","channel""#),
            1,
        )
}

#[tokio::test(flavor = "multi_thread")]
async fn rules_decide_with_the_model_and_name_their_reasons() {
    let t = topics("rules", 1).await;
    let p = producer();
    let block = format!(r#"{{"added_at":{T0},"reason":"chargeback ring 2026-10"}}"#);
    send(
        &p,
        &t.blocklist,
        Some(b"email:fraudster@example.com"),
        Some(block.as_bytes()),
    )
    .await;
    let label = format!(
        r#"{{"label_time":{},"kind":"fraud","email":"stolen@example.com"}}"#,
        T0 - 1
    );
    send(
        &p,
        &t.labels,
        Some(b"email:stolen@example.com"),
        Some(label.as_bytes()),
    )
    .await;
    let txs = [
        ("blocked", "Fraudster@Example.com", "m-1"),
        ("labelled", "stolen@example.com", "m-1"),
        ("not-enabled", "ana@example.com", "m-2"),
        ("plain", "ana@example.com", "m-1"),
    ];
    for (i, (id, email, merchant)) in txs.iter().enumerate() {
        let v = tx_json(id, email, merchant, T0 + i as i64 * 1000);
        send(&p, &t.transactions, Some(b"c1"), Some(v.as_bytes())).await;
    }
    // The shipped rules (docs/fraudstream.toml), and only merchant m-1 enabled.
    let mut scorer = Scorer::start(
        &t,
        &[("FRAUDSTREAM__DECISION__ENABLED_MERCHANTS", r#"["m-1"]"#)],
    );
    let mut reader = Reader::new(&t.verdicts);
    let all = reader
        .read_until(Duration::from_secs(60), |m| m.len() >= txs.len())
        .await;
    assert!(all, "log:\n{}", scorer.log_text());
    let by_id = verdicts_by_id(&reader.messages);
    let v = |id: &str| -> &Verdict { &by_id[id][0] };
    let codes = |id: &str| -> Vec<&str> { v(id).reasons.iter().map(|r| r.code.as_str()).collect() };

    // Blocklisted e-mail: declined although the model approves, naming the entry.
    assert_eq!(v("blocked").decision, Decision::Decline);
    assert_eq!(codes("blocked"), ["blocklisted-email"]);
    let text = &v("blocked").reasons[0].text;
    assert!(
        text.contains("email:***@example.com")
            && !text.contains("Fraudster")
            && text.contains("chargeback ring 2026-10"),
        "{text}"
    );
    // E-mail in a confirmed fraud: review.
    assert_eq!(v("labelled").decision, Decision::Review);
    assert_eq!(codes("labelled"), ["email-in-confirmed-fraud"]);
    assert!(v("labelled").reasons[0].text.contains("1 confirmed"));
    // Merchant not enabled: rejected unscored.
    assert_eq!(v("not-enabled").decision, Decision::Reject);
    assert_eq!(v("not-enabled").score, -1.0);
    assert_eq!(codes("not-enabled"), ["merchant-not-enabled"]);
    // Nothing fired: the model's own decision, without reasons (the ULB model has no
    // explanation trees).
    assert_eq!(v("plain").decision, Decision::Approve);
    assert!(v("plain").reasons.is_empty());
    for id in ["blocked", "labelled", "plain"] {
        assert!(!v(id).degraded);
        assert!((0.0..=1.0).contains(&v(id).score));
    }

    let (_, metrics) = scorer.http_get("/metrics").await;
    for line in [
        r#"fraudstream_rule_hits_total{rule="blocklisted-email"} 1"#,
        r#"fraudstream_verdicts_total{decision="reject"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    scorer.stop();
}

/// The default model's explanation: contributions add up, with the bias, to the raw margin,
/// whose logistic is ONNX Runtime's score.
#[test]
fn contributions_add_up_to_the_margin_of_the_default_model() {
    let lib = std::env::var_os("ORT_DYLIB_PATH").expect("ORT_DYLIB_PATH (scripts/test sets it)");
    let env = fraudstream::model::init_runtime(Some(Path::new(&lib))).unwrap();
    let path = repo().join("models/sparkov-xgb.manifest.json");
    let mut model = fraudstream::model::Model::load(env, &path).unwrap();
    let ex = model.explainer.clone().expect("explanation trees");
    let width = model.features.len();
    let n = 2000;
    let rows = ex.probe_rows(n);
    let mut scores = Vec::new();
    model.score_rows(&rows, &mut scores).unwrap();
    let mut c = vec![0.0; width];
    let mut moved = 0;
    for i in 0..n {
        let row = &rows[i * width..(i + 1) * width];
        let bias = ex.contributions(row, &mut c);
        let margin = ex.margin(row);
        assert!((bias + c.iter().sum::<f64>() - margin).abs() < 1e-9);
        let p = 1.0 / (1.0 + (-margin).exp());
        assert!(
            (p - f64::from(scores[i])).abs() < 1e-5,
            "row {i}: trees {p}, ONNX Runtime {}",
            scores[i]
        );
        moved += c.iter().filter(|v| v.abs() > 1e-6).count();
    }
    assert!(moved > n, "contributions are not all zero");
}

/// Writes `dir/<kind>.onnx` (tests/py/failing_model.py: `failing` or `slow`) for 30 inputs.
fn unusable_model(dir: &Path, kind: &str) -> std::path::PathBuf {
    let python =
        std::env::var("FRAUDSTREAM_PYTHON").expect("FRAUDSTREAM_PYTHON (scripts/test sets it)");
    let out = dir.join(format!("{kind}.onnx"));
    let status = std::process::Command::new(python)
        .arg(repo().join("tests/py/failing_model.py"))
        .args([kind, out.to_str().unwrap(), "30"])
        .status()
        .unwrap();
    assert!(status.success());
    out
}

/// Writes `dir/slow.json`, a manifest of the slow model (tens of milliseconds a row), and
/// returns its path.
fn slow_model(dir: &Path) -> std::path::PathBuf {
    let onnx = unusable_model(dir, "slow");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(manifest_path()).unwrap()).unwrap();
    m["model_version"] = "slow".into();
    m["onnx"] = onnx.to_str().unwrap().into();
    m.as_object_mut().unwrap().remove("onnx_sha256");
    let manifest = dir.join("slow.json");
    std::fs::write(&manifest, m.to_string()).unwrap();
    manifest
}

/// A model slower than the latency budget: every batch is decided by the rules, nothing
/// waits for the model.
#[tokio::test(flavor = "multi_thread")]
async fn a_model_over_the_latency_budget_is_decided_without() {
    let t = topics("budget", 3).await;
    let dir = std::env::temp_dir().join(unique("budget"));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = slow_model(&dir);
    let n = 300;
    let records = sample_stream(n, "b", 20, fraudstream::pipeline::now_ms(), 1);
    send_all(&producer(), &t.transactions, &records).await;
    let mut scorer = Scorer::start(
        &t,
        &[
            ("FRAUDSTREAM__MODEL__MANIFEST", manifest.to_str().unwrap()),
            ("FRAUDSTREAM__DECISION__LATENCY_BUDGET_MS", "5"),
        ],
    );
    let mut reader = Reader::new(&t.verdicts);
    let all = reader
        .read_until_distinct_keys(Duration::from_secs(60), n)
        .await;
    let log = scorer.log_text();
    assert!(all, "verdicts missing; log:\n{log}");
    for v in verdicts_by_id(&reader.messages).values().map(|v| &v[0]) {
        assert!(v.degraded, "{v:?}");
        assert_eq!(
            v.decision,
            Decision::Approve,
            "the shipped on-model-failure"
        );
        let reason = v.reasons.last().unwrap();
        assert_eq!(reason.code, "model-unavailable");
        assert!(
            reason.text.contains("latency budget of 5 ms") || reason.text.contains("earlier batch"),
            "{reason:?}"
        );
    }
    let (_, metrics) = scorer.http_get("/metrics").await;
    assert!(
        metrics.contains(r#"fraudstream_degraded_total{cause="latency-budget"}"#),
        "{metrics}"
    );
    scorer.stop();
}

/// A processing loop stuck with work (a model that takes seconds a batch, no latency budget):
/// `/healthz` answers 503 and says why once the loop has not turned for the stall timeout,
/// while the instance stays ready, and answers 200 again once the loop moves.
#[tokio::test(flavor = "multi_thread")]
async fn healthz_fails_while_the_loop_is_stuck_and_recovers() {
    let t = topics("stall", 1).await;
    let dir = std::env::temp_dir().join(unique("stall"));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = slow_model(&dir);
    let mut scorer = Scorer::start(
        &t,
        &[
            ("FRAUDSTREAM__MODEL__MANIFEST", manifest.to_str().unwrap()),
            ("FRAUDSTREAM__METRICS__STALL_TIMEOUT_MS", "1000"),
        ],
    );
    scorer.wait_ready(Duration::from_secs(60)).await;
    let (code, text) = scorer.http_get("/healthz").await;
    assert_eq!(code, 200, "idle and healthy: {text}");
    // Idle for longer than the stall timeout: a loop without work still turns.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, text) = scorer.http_get("/healthz").await;
    assert_eq!(code, 200, "idle is not stuck: {text}");

    let n = 200;
    let records = sample_stream(n, "s", 20, fraudstream::pipeline::now_ms(), 1);
    send_all(&producer(), &t.transactions, &records).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (code, text) = loop {
        let (code, text) = scorer.http_get("/healthz").await;
        if code != 200 || Instant::now() > deadline {
            break (code, text);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(code, 503, "{text}; log:\n{}", scorer.log_text());
    assert!(text.contains("has not turned for"), "{text}");
    assert_eq!(
        scorer.http_get("/readyz").await.0,
        200,
        "stuck is not unready"
    );

    let mut reader = Reader::new(&t.verdicts);
    assert!(
        reader
            .read_until_distinct_keys(Duration::from_secs(300), n)
            .await,
        "log:\n{}",
        scorer.log_text()
    );
    let (code, text) = scorer.http_get("/healthz").await;
    assert_eq!(code, 200, "moving again: {text}");
    scorer.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn verdicts_keep_flowing_degraded_while_the_model_fails_then_recover() {
    let t = topics("degraded", 3).await;
    let dir = std::env::temp_dir().join(unique("degraded"));
    std::fs::create_dir_all(&dir).unwrap();
    unusable_model(&dir, "failing");
    std::fs::copy(repo().join("models/ulb-xgb.onnx"), dir.join("good.onnx")).unwrap();
    let write = |version: &str, onnx: &str| {
        let mut m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(manifest_path()).unwrap()).unwrap();
        m["model_version"] = version.into();
        m["onnx"] = onnx.into();
        m.as_object_mut().unwrap().remove("onnx_sha256");
        std::fs::write(dir.join(".tmp"), m.to_string()).unwrap();
        std::fs::rename(dir.join(".tmp"), dir.join("model.json")).unwrap();
    };
    write("good-1", "good.onnx");
    // Rules that decide without the model: large amounts are declined.
    let rules = dir.join("rules.toml");
    std::fs::write(
        &rules,
        r#"version = "test"
on-model-failure = "review"
[[rule]]
code = "large-amount"
when = "amount > 1000"
action = "decline"
text = "Amount {amount} is over 1000."
"#,
    )
    .unwrap();
    let manifest = dir.join("model.json");
    let mut scorer = Scorer::start_watching(&t, &manifest, &rules).await;

    let n = 4000;
    let records = sample_stream(n, "d", 50, fraudstream::pipeline::now_ms(), 1);
    let amounts: BTreeMap<String, f64> = sample()
        .iter()
        .cycle()
        .take(n)
        .enumerate()
        .map(|(i, r)| (format!("d{i}"), r.amount().parse().unwrap()))
        .collect();
    let producing = produce_paced(&t.transactions, records);
    // The model breaks at run time (it loads and passes every check), then is mended.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    write("failing", "failing.onnx");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    write("good-2", "good.onnx");
    producing.await.unwrap();

    let mut reader = Reader::new(&t.verdicts);
    let all = reader
        .read_until_distinct_keys(Duration::from_secs(90), n)
        .await;
    let log = scorer.log_text();
    assert!(all, "verdicts missing; log:\n{log}");
    reader.drain_for(Duration::from_secs(2)).await;
    assert_eq!(reader.messages.len(), n, "one verdict each; log:\n{log}");

    let by_id = verdicts_by_id(&reader.messages);
    let thresholds = fraudstream::model::Manifest::read(&manifest_path())
        .unwrap()
        .thresholds;
    let (mut degraded, mut last_degraded, mut first_good2) = (0, i64::MIN, i64::MAX);
    for (id, v) in &by_id {
        let v = &v[0];
        let large = amounts[id] > 1000.0;
        match v.model_version.as_str() {
            "failing" => {
                degraded += 1;
                assert!(v.degraded, "{v:?}");
                assert_eq!(v.score, -1.0);
                let want = if large {
                    Decision::Decline
                } else {
                    Decision::Review
                };
                assert_eq!(v.decision, want, "{v:?}");
                assert_eq!(v.reasons.last().unwrap().code, "model-unavailable");
                last_degraded = last_degraded.max(v.scored_at);
            }
            version => {
                assert!(!v.degraded, "{v:?}");
                let model = thresholds.decide(v.score);
                let want = if large { Decision::Decline } else { model };
                assert_eq!(v.decision, want, "{v:?}");
                if version == "good-2" {
                    first_good2 = first_good2.min(v.scored_at);
                }
            }
        }
    }
    assert!(
        degraded > 0,
        "no verdict while the model failed; log:\n{log}"
    );
    assert!(first_good2 < i64::MAX, "never recovered; log:\n{log}");
    assert!(last_degraded <= first_good2, "degraded after recovery");
    assert!(log.contains("deciding by rules alone"), "{log}");
    assert!(log.contains("The model scores again"), "{log}");
    let (_, metrics) = scorer.http_get("/metrics").await;
    assert!(
        metrics.contains(&format!(
            r#"fraudstream_degraded_total{{cause="error"}} {degraded}"#
        )),
        "{metrics}"
    );
    scorer.stop();
}
