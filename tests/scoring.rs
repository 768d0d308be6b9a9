//! Valid transactions in, exactly one verdict each out, in JSON and in Avro.

use std::collections::HashSet;
use std::time::Duration;

use fraudstream::decision::{Decision, Verdict};
use fraudstream::decode::{encode_transaction, Transaction};
use rdkafka::message::Message;

use crate::util::*;

#[tokio::test(flavor = "multi_thread")]
async fn n_valid_transactions_give_n_verdicts() {
    let t = topics("scoring", 3).await;
    let rows = sample();
    let n = 600;
    let now = fraudstream::pipeline::now_ms();
    let records = sample_stream(n, "t", 50, now, 1);
    send_all(&producer(), &t.transactions, &records).await;

    let mut scorer = Scorer::start(&t, &[]);
    let mut reader = Reader::new(&t.verdicts);
    let all = reader
        .read_until(Duration::from_secs(90), |m| m.len() >= n)
        .await;
    assert!(
        all,
        "only {} of {n} verdicts; log:\n{}",
        reader.messages.len(),
        scorer.log_text()
    );
    reader.drain_for(Duration::from_secs(2)).await;

    let by_id = verdicts_by_id(&reader.messages);
    let want: HashSet<String> = (0..n).map(|i| format!("t{i}")).collect();
    let got: HashSet<String> = by_id.keys().cloned().collect();
    assert_eq!(got, want);
    assert_eq!(
        reader.messages.len(),
        n,
        "a clean run produces no duplicates"
    );

    let manifest = fraudstream::model::Manifest::read(&manifest_path()).unwrap();
    let (mut fraud_sum, mut fraud_n, mut legit_sum, mut legit_n) = (0.0, 0, 0.0, 0);
    for (i, r) in rows.iter().cycle().take(n).enumerate() {
        let v = &by_id[&format!("t{i}")][0];
        assert_eq!(v.customer_id, format!("c{}", i % 50));
        assert_eq!(v.event_time, now + i as i64);
        assert_eq!(v.model_version, manifest.model_version);
        assert_eq!(v.decision, manifest.thresholds.decide(v.score));
        assert!(!v.degraded);
        assert!(v.reasons.is_empty());
        assert!(v.scored_at >= now);
        if r.label {
            fraud_sum += v.score as f64;
            fraud_n += 1;
        } else {
            legit_sum += v.score as f64;
            legit_n += 1;
        }
    }
    // The real model, not a constant: frauds score far above legitimate payments.
    assert!(fraud_n > 10 && legit_n > 10);
    assert!(
        fraud_sum / fraud_n as f64 > 10.0 * (legit_sum / legit_n as f64),
        "fraud mean {} vs legit mean {}",
        fraud_sum / fraud_n as f64,
        legit_sum / legit_n as f64
    );
    assert!(by_id.values().any(|v| v[0].decision == Decision::Decline));
    assert!(by_id.values().any(|v| v[0].decision == Decision::Approve));

    // The metrics endpoint counts what happened.
    let (status, body) = scorer.http_get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = scorer.http_get("/metrics").await;
    assert_eq!(status, 200);
    let total: f64 = body
        .lines()
        .filter(|l| l.starts_with("fraudstream_verdicts_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(total, n as f64, "{body}");
    for name in [
        "fraudstream_messages_consumed_total",
        "fraudstream_scoring_duration_seconds_bucket",
        "fraudstream_end_to_end_latency_seconds_bucket",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics:\n{body}");
    }

    scorer.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn avro_in_plain_and_confluent_avro_verdicts_out() {
    let t = topics("avro", 2).await;
    let rows = sample();
    let mut model = model();
    let txs: Vec<Transaction> = rows
        .iter()
        .take(40)
        .enumerate()
        .map(|(i, r)| Transaction {
            transaction_id: format!("a{i}"),
            event_time_ms: 1_795_341_600_000 + i as i64,
            customer_id: format!("c{i}"),
            merchant_id: "m".into(),
            amount: r.amount().parse().unwrap(),
            currency: "USD".into(),
            features: Some(r.features()),
            ..Transaction::default()
        })
        .collect();
    let p = producer();
    for (i, tx) in txs.iter().enumerate() {
        let mut bytes = Vec::new();
        if i % 2 == 1 {
            bytes.extend_from_slice(&[0, 0, 0, 0, 1]);
        }
        bytes.extend(encode_transaction(tx));
        send(
            &p,
            &t.transactions,
            Some(tx.customer_id.as_bytes()),
            Some(&bytes),
        )
        .await;
    }
    let mut scorer = Scorer::start(
        &t,
        &[
            ("FRAUDSTREAM__OUTPUT__VERDICT_FORMAT", "avro"),
            ("FRAUDSTREAM__OUTPUT__VERDICT_SCHEMA_ID", "2"),
        ],
    );
    let mut reader = Reader::new(&t.verdicts);
    let all = reader
        .read_until(Duration::from_secs(60), |m| m.len() >= txs.len())
        .await;
    assert!(all, "log:\n{}", scorer.log_text());

    let mut expected = Vec::new();
    model.score(&txs, &mut expected).unwrap();
    for m in &reader.messages {
        let bytes = m.payload().unwrap();
        assert_eq!(
            &bytes[..5],
            &[0, 0, 0, 0, 2],
            "Confluent header with schema id 2"
        );
        let v = Verdict::from_avro(&bytes[5..]).unwrap();
        let i: usize = v.transaction_id[1..].parse().unwrap();
        assert_eq!(v.score, expected[i], "{}", v.transaction_id);
        assert_eq!(v.event_time, txs[i].event_time_ms);
    }
    scorer.signal("INT");
    assert!(scorer.wait(Duration::from_secs(30)).success());
}

/// The Sparkov model reads the stateful features: it loads against this registry, and a
/// manifest from another registry version is refused with a message naming it.
#[test]
fn stateful_model_loads_and_other_registry_versions_are_refused() {
    let lib = std::env::var_os("ORT_DYLIB_PATH").expect("ORT_DYLIB_PATH (scripts/test sets it)");
    let env = fraudstream::model::init_runtime(Some(std::path::Path::new(&lib))).unwrap();
    let path = repo().join("models/sparkov-xgb.manifest.json");
    let mut model = fraudstream::model::Model::load(env, &path).expect("sparkov model");
    assert!(model
        .features
        .names()
        .contains(&"customer_tx_count_24h".to_string()));
    let row = vec![0.0f32; model.features.len()];
    let mut scores = Vec::new();
    model.score_rows(&row, &mut scores).unwrap();
    assert_eq!(scores.len(), 1);
    assert!((0.0..=1.0).contains(&scores[0]));

    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    m["registry_version"] = 2.into();
    m["onnx"] = repo()
        .join("models/sparkov-xgb.onnx")
        .to_str()
        .unwrap()
        .into();
    let other = std::env::temp_dir().join(unique("old-registry.json"));
    std::fs::write(&other, m.to_string()).unwrap();
    let err = fraudstream::model::Model::load(env, &other)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("registry version 2") && err.contains("`amount`"),
        "{err}"
    );
}

/// The default model (docs/fraudstream.toml) reads Sparkov-style transactions through the
/// stateful features: online scores equal `replay` + the same model offline, and they
/// separate the held-out frauds.
#[tokio::test(flavor = "multi_thread")]
async fn default_model_scores_sparkov_transactions_as_offline() {
    let (n, partitions) = (3_000, 3);
    let txs = sparkov_sample(n);
    let t = topics("default-model", partitions).await;
    let records: Vec<(String, Vec<u8>)> = txs
        .iter()
        .map(|tx| (tx.customer_id.clone(), tx.json.clone().into_bytes()))
        .collect();
    send_all(&producer(), &t.transactions, &records).await;
    let mut scorer = Scorer::start(&t, &[("FRAUDSTREAM__MODEL__MANIFEST", "")]);

    // Offline: the same lines through `fraudstream replay`, scored by the shipped model.
    let dir = std::env::temp_dir().join(unique("default-model"));
    std::fs::create_dir_all(&dir).unwrap();
    let text: String = txs.iter().map(|tx| format!("{}\n", tx.json)).collect();
    let table = replay(&dir, &text, partitions);
    let lib = std::env::var_os("ORT_DYLIB_PATH").expect("ORT_DYLIB_PATH (scripts/test sets it)");
    let env = fraudstream::model::init_runtime(Some(std::path::Path::new(&lib))).unwrap();
    let path = repo().join("models/sparkov-xgb.manifest.json");
    let mut model = fraudstream::model::Model::load(env, &path).unwrap();
    let mut csv = csv::Reader::from_path(&table).unwrap();
    let header = csv.headers().unwrap().clone();
    let columns: Vec<usize> = model
        .features
        .names()
        .iter()
        .map(|f| header.iter().position(|h| h == f).expect("feature column"))
        .collect();
    let (mut ids, mut rows) = (Vec::new(), Vec::new());
    for r in csv.records() {
        let r = r.unwrap();
        ids.push(r[0].to_string());
        rows.extend(columns.iter().map(|&c| r[c].parse::<f32>().unwrap()));
    }
    let mut offline = Vec::new();
    model.score_rows(&rows, &mut offline).unwrap();
    assert_eq!(offline.len(), n);

    let mut reader = Reader::new(&t.verdicts);
    let all = reader
        .read_until_distinct_keys(Duration::from_secs(90), n)
        .await;
    assert!(all, "verdicts missing; log:\n{}", scorer.log_text());
    let by_id = verdicts_by_id(&reader.messages);
    for (id, want) in ids.iter().zip(&offline) {
        let v = &by_id[id][0];
        assert_eq!(v.model_version, model.manifest.model_version);
        assert!(
            (v.score - want).abs() < 1e-6,
            "{id}: online {} offline {want}",
            v.score
        );
        assert_eq!(v.decision, model.manifest.thresholds.decide(v.score));
    }
    // ROC-AUC of the online scores: the probability that a fraud outscores a legitimate one.
    let (frauds, legit): (Vec<&SparkovTx>, Vec<&SparkovTx>) = txs.iter().partition(|t| t.label);
    assert!(frauds.len() >= 20, "{} frauds", frauds.len());
    let score = |t: &SparkovTx| by_id[&t.transaction_id][0].score;
    let mut wins = 0.0;
    for f in &frauds {
        for l in &legit {
            wins += match score(f).partial_cmp(&score(l)) {
                Some(std::cmp::Ordering::Greater) => 1.0,
                Some(std::cmp::Ordering::Equal) => 0.5,
                _ => 0.0,
            };
        }
    }
    let auc = wins / (frauds.len() * legit.len()) as f64;
    assert!(auc > 0.95, "ROC-AUC {auc}");
    scorer.stop();
}

/// A transaction's `traceparent` reaches its verdict's record, through the repartition topic
/// too; a dead letter keeps the original message's headers beside its own; a verdict's
/// timestamp is its transaction's.
#[tokio::test(flavor = "multi_thread")]
async fn trace_context_and_original_headers_are_carried() {
    use fraudstream::source::partitioner::partition_for;
    use rdkafka::message::{Header, Headers, OwnedHeaders};
    use rdkafka::producer::FutureRecord;
    let t = topics("trace", 2).await;
    let rows = sample();
    let p = producer();
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let good = rows[0].json("traced", "c", T0);
    let sent_at = 1_795_000_000_123;
    let headers = OwnedHeaders::new().insert(Header {
        key: "traceparent",
        value: Some(trace),
    });
    // On the partition that is not its customer's: forwarded before it is scored.
    p.send(
        FutureRecord::to(&t.transactions)
            .key("c")
            .partition(1 - partition_for(b"c", 2))
            .payload(&good)
            .headers(headers)
            .timestamp(sent_at),
        Duration::from_secs(10),
    )
    .await
    .map_err(|(e, _)| e)
    .unwrap();
    let headers = OwnedHeaders::new().insert(Header {
        key: "x-request-id",
        value: Some("req-7"),
    });
    p.send(
        FutureRecord::to(&t.transactions)
            .key("c")
            .payload("not json")
            .headers(headers),
        Duration::from_secs(10),
    )
    .await
    .map_err(|(e, _)| e)
    .unwrap();
    let mut scorer = Scorer::start(&t, &[]);
    let mut verdicts = Reader::new(&t.verdicts);
    let mut dlq = Reader::new(&t.dead_letter);
    assert!(
        verdicts
            .read_until(Duration::from_secs(60), |m| !m.is_empty())
            .await,
        "log:\n{}",
        scorer.log_text()
    );
    assert!(
        dlq.read_until(Duration::from_secs(30), |m| !m.is_empty())
            .await
    );
    let v = &verdicts.messages[0];
    assert_eq!(header(v, "traceparent").as_deref(), Some(trace));
    assert_eq!(
        v.timestamp().to_millis(),
        Some(sent_at),
        "the transaction's timestamp"
    );
    let d = &dlq.messages[0];
    assert_eq!(
        header(d, "x-request-id").as_deref(),
        Some("req-7"),
        "original header kept"
    );
    assert_eq!(
        header(d, "fraudstream.error.kind").as_deref(),
        Some("malformed-json")
    );
    assert!(d.headers().unwrap().count() >= 6);
    scorer.stop();
}
