//! Every kind of bad input goes to the dead-letter topic unchanged, with its reason and
//! origin in headers; its valid neighbours are scored; the consumer keeps running.

use std::collections::HashMap;
use std::time::Duration;

use fraudstream::decode::{encode_transaction, Transaction};
use rdkafka::message::Message;

use crate::util::*;

fn avro_tx(amount: f64, id: &str) -> Vec<u8> {
    encode_transaction(&Transaction {
        transaction_id: id.into(),
        event_time_ms: 1_795_341_600_000,
        customer_id: "c-avro".into(),
        merchant_id: "m".into(),
        amount,
        currency: "EUR".into(),
        features: Some(vec![0.0; 30]),
        ..Transaction::default()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn each_malformed_kind_is_dead_lettered_and_neighbours_scored() {
    let t = topics("dlq", 2).await;
    let rows = sample();
    let good = |i: usize| rows[i].json(&format!("g{i}"), &format!("c{i}"), 1_795_341_600_000);
    let valid_avro = avro_tx(10.0, "x");
    let mut unknown_id = vec![0, 0, 0, 0, 99];
    unknown_id.extend_from_slice(&valid_avro);
    let all_features = rows[0].features_text.join(",");
    let short_features = good(0).replace(&all_features, &rows[0].features_text[1..].join(","));
    assert_ne!(short_features, good(0));
    let no_features = good(0).replace(
        &format!(",\"features\":[{}]", rows[0].features_text.join(",")),
        "",
    );
    assert!(!no_features.contains("features"));

    let bad: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("malformed-json", Some(b"hello, this is not JSON".to_vec())),
        ("malformed-json", Some(br#"{"transaction_id": "#.to_vec())),
        (
            "wrong-type",
            Some(
                good(1)
                    .replace("\"currency\":\"EUR\"", "\"currency\":7")
                    .into_bytes(),
            ),
        ),
        (
            "missing-field",
            Some(good(2).replace("\"customer_id\":\"c2\",", "").into_bytes()),
        ),
        ("missing-field", Some(no_features.into_bytes())),
        ("invalid-amount", Some(avro_tx(f64::NAN, "nan"))),
        ("invalid-amount", Some(avro_tx(f64::INFINITY, "inf"))),
        (
            "invalid-value",
            Some(
                good(3)
                    .replace(
                        &format!("\"amount\":{}", rows[3].amount()),
                        "\"amount\":1e999",
                    )
                    .into_bytes(),
            ),
        ),
        (
            "invalid-amount",
            Some(
                good(4)
                    .replace(
                        &format!("\"amount\":{}", rows[4].amount()),
                        "\"amount\":-3.5",
                    )
                    .into_bytes(),
            ),
        ),
        ("feature-length", Some(short_features.into_bytes())),
        (
            "avro-decode",
            Some(valid_avro[..valid_avro.len() - 9].to_vec()),
        ),
        ("unknown-schema-id", Some(unknown_id)),
        (
            "oversized",
            Some(format!("{{\"pad\":\"{}\"}}", "x".repeat(100_000)).into_bytes()),
        ),
        ("empty", Some(Vec::new())),
        ("empty", None),
        // Hostile input: deep nesting, NaN, far-future and ancient times, a huge array,
        // bytes that are no format at all. (Nesting in a field fraudstream does not read is
        // skipped like any unknown field: such a message is scored.)
        (
            "wrong-type",
            Some(
                good(5)
                    .replace(
                        "\"channel\":\"web\"",
                        &format!("\"channel\":{}{}", "[".repeat(5000), "]".repeat(5000)),
                    )
                    .into_bytes(),
            ),
        ),
        (
            "malformed-json",
            Some(
                good(6)
                    .replace(
                        &format!("\"amount\":{}", rows[6].amount()),
                        "\"amount\":NaN",
                    )
                    .into_bytes(),
            ),
        ),
        (
            "invalid-value",
            Some(
                good(7)
                    .replace("1795341600000", "253402300800000")
                    .into_bytes(),
            ),
        ),
        (
            "invalid-value",
            Some(good(8).replace("1795341600000", "-1").into_bytes()),
        ),
        (
            "feature-length",
            Some(
                good(9)
                    .replace(
                        &rows[9].features_text.join(","),
                        &vec!["0.5"; 12_000].join(","),
                    )
                    .into_bytes(),
            ),
        ),
        (
            "avro-decode",
            Some(vec![
                0x05, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ]),
        ),
    ];
    for (kind, payload) in &bad {
        if let Some(p) = payload {
            assert!(
                p.len() > 60_000 || *kind != "oversized",
                "the oversized case must exceed the limit"
            );
        }
    }

    // good, bad, good, bad, ..., good — keyed so both partitions see some of each.
    let p = producer();
    // (partition, offset) of each bad message → (expected kind, payload, key).
    type Origin<'a> = HashMap<(i32, i64), (&'a str, Option<Vec<u8>>, Vec<u8>)>;
    let mut origin: Origin = HashMap::new();
    let mut good_ids = Vec::new();
    for (i, (kind, payload)) in bad.iter().enumerate() {
        let g = good(10 + i);
        send(
            &p,
            &t.transactions,
            Some(format!("k{i}").as_bytes()),
            Some(g.as_bytes()),
        )
        .await;
        good_ids.push(format!("g{}", 10 + i));
        let key = format!("bad-{i}").into_bytes();
        let at = send(&p, &t.transactions, Some(&key), payload.as_deref()).await;
        origin.insert(at, (kind, payload.clone(), key));
    }
    send(
        &p,
        &t.transactions,
        Some(b"last"),
        Some(good(99).as_bytes()),
    )
    .await;
    good_ids.push("g99".into());

    let mut scorer = Scorer::start(&t, &[]);
    let mut dlq = Reader::new(&t.dead_letter);
    let mut verdicts = Reader::new(&t.verdicts);
    assert!(
        dlq.read_until(Duration::from_secs(60), |m| m.len() >= bad.len())
            .await,
        "dead letters: {} of {}; log:\n{}",
        dlq.messages.len(),
        bad.len(),
        scorer.log_text()
    );
    assert!(
        verdicts
            .read_until(Duration::from_secs(30), |m| m.len() >= good_ids.len())
            .await
    );
    dlq.drain_for(Duration::from_secs(2)).await;
    assert_eq!(dlq.messages.len(), bad.len());

    let mut kinds_seen = HashMap::new();
    for m in &dlq.messages {
        let partition: i32 = header(m, "fraudstream.source.partition")
            .unwrap()
            .parse()
            .unwrap();
        let offset: i64 = header(m, "fraudstream.source.offset")
            .unwrap()
            .parse()
            .unwrap();
        let (kind, payload, key) = origin.get(&(partition, offset)).unwrap_or_else(|| {
            panic!("dead letter points at {partition}/{offset}, not a bad message")
        });
        assert_eq!(header(m, "fraudstream.error.kind").as_deref(), Some(*kind));
        assert_eq!(
            header(m, "fraudstream.source.topic").as_deref(),
            Some(t.transactions.as_str())
        );
        let message = header(m, "fraudstream.error.message").unwrap();
        assert!(message.len() > 5, "readable message: {message:?}");
        assert_eq!(
            m.payload(),
            payload.as_deref(),
            "payload unchanged for {kind}"
        );
        assert_eq!(m.key(), Some(key.as_slice()), "key unchanged");
        *kinds_seen.entry(kind.to_string()).or_insert(0) += 1;
    }

    let by_id = verdicts_by_id(&verdicts.messages);
    for id in &good_ids {
        assert!(by_id.contains_key(id), "no verdict for {id}");
    }
    assert!(
        scorer.running(),
        "the consumer stopped; log:\n{}",
        scorer.log_text()
    );

    // Still consuming after all that.
    send(
        &p,
        &t.transactions,
        Some(b"after"),
        Some(good(200).as_bytes()),
    )
    .await;
    assert!(
        verdicts
            .read_until(Duration::from_secs(30), |m| m
                .iter()
                .any(|m| m.key() == Some(b"g200")))
            .await
    );

    let (_, metrics) = scorer.http_get("/metrics").await;
    for (kind, n) in kinds_seen {
        let line = format!("fraudstream_dead_letters_total{{kind=\"{kind}\"}} {n}");
        assert!(metrics.contains(&line), "missing `{line}` in:\n{metrics}");
    }
    scorer.stop();
}

/// A 100-byte Avro transaction whose `features` array claims 100 million values (4 GB to
/// reserve): the scorer, its address space limited to 3 GiB (it needs about 1.4), refuses the
/// claim as a decode error (dead letter) instead of aborting, and scores its neighbours. So
/// do a claimed 100-million-byte string and a claimed 100-million-entry `features` in JSON.
#[tokio::test(flavor = "multi_thread")]
async fn claims_larger_than_the_message_are_dead_lettered_under_a_memory_limit() {
    let t = topics("claims", 1).await;
    let rows = sample();
    let mut claim = encode_transaction(&Transaction {
        transaction_id: "claim-array".into(),
        event_time_ms: T0,
        customer_id: "c".into(),
        merchant_id: "m".into(),
        amount: 1.0,
        currency: "EUR".into(),
        features: None,
        ..Transaction::default()
    });
    // features: null (union 0) → array (union 1), one block of 100M doubles, 3 present.
    assert_eq!(claim.pop(), Some(0), "the last field is `features`, null");
    claim.push(2);
    let mut n: u64 = 100_000_000 << 1; // zigzag
    while n >= 0x80 {
        claim.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    claim.push(n as u8);
    claim.extend_from_slice(&[0u8; 24]);
    // transaction_id: a string claiming 100M bytes, then the end of the message.
    let mut long_id = vec![0u8; 0];
    let mut n: u64 = 100_000_000 << 1;
    while n >= 0x80 {
        long_id.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    long_id.push(n as u8);
    long_id.extend_from_slice(b"abc");
    let p = producer();
    let good = |i: usize| rows[i].json(&format!("ok{i}"), "c", T0 + i as i64);
    send(&p, &t.transactions, Some(b"c"), Some(good(0).as_bytes())).await;
    send(&p, &t.transactions, Some(b"c"), Some(&claim)).await;
    send(&p, &t.transactions, Some(b"c"), Some(&long_id)).await;
    send(&p, &t.transactions, Some(b"c"), Some(good(1).as_bytes())).await;
    let mut scorer = Scorer::start_limited(&t, 3 << 20, &[]);
    let mut verdicts = Reader::new(&t.verdicts);
    let mut dlq = Reader::new(&t.dead_letter);
    assert!(
        verdicts
            .read_until(Duration::from_secs(60), |m| m.len() >= 2)
            .await,
        "neighbours scored; running: {}; log:\n{}",
        scorer.running(),
        scorer.log_text()
    );
    assert!(
        dlq.read_until(Duration::from_secs(30), |m| m.len() >= 2)
            .await
    );
    for m in &dlq.messages {
        assert_eq!(
            header(m, "fraudstream.error.kind").as_deref(),
            Some("avro-decode"),
            "{:?}",
            header(m, "fraudstream.error.message")
        );
    }
    assert!(scorer.running(), "alive after the claims");
    scorer.stop();
}
