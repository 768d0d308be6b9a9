//! Writes the seed corpus (`corpus/<target>/`): valid messages of every kind the targets
//! read, from which libFuzzer mutates. Run from the repository root:
//! `cargo run --manifest-path tests/fuzz/Cargo.toml --example seeds`.

use std::path::Path;

use fraudstream::decode::{encode_transaction, Transaction};

const TX_JSON: &[&str] = &[
    r#"{"transaction_id":"t-1","event_time":"2026-11-22T10:00:00.250Z","customer_id":"c-1","merchant_id":"m-1","amount":12.5,"currency":"EUR","email":"a@example.com","features":[0.5,-1.0]}"#,
    r#"{"transaction_id":"d6dfcaed","event_time":"2020-06-21T12:17:31Z","customer_id":"cust-147","card_id":"card-147","merchant_id":"fraud_Kertzmann LLC","merchant_category":"health_fitness","amount":18.48,"currency":"USD","customer_lat":44.3031,"customer_lon":-90.0986,"merchant_lat":44.297112,"merchant_lon":-90.520246,"customer_birth_date":"1946-05-03","customer_gender":"F","customer_city":"Babcock","customer_state":"WI","customer_zip":"54413","customer_city_pop":191,"is_fraud":0}"#,
    r#"{"transaction_id":"w-9","event_time":1795341600000,"customer_id":"c-2","merchant_id":"store-7","amount":99.0,"currency":"EUR","channel":"web","session_id":"s-1","device_id":"d-1","ip":"203.0.113.7"}"#,
];

const NAV_JSON: &[&str] = &[
    r#"{"event_id":"e1","event_time":1795341600000,"customer_id":"c-1","session_id":"s1","kind":"page_view","device_id":"d"}"#,
    r#"{"event_id":"e2","event_time":"2026-11-22T10:00:00Z","customer_id":"c-1","session_id":"s1","kind":"login_failed","ip":"198.51.100.4"}"#,
];

const LABELS: &[&str] = &[
    r#"{"label_time":1795341600000,"kind":"fraud","email":"Mallory@Evil.example"}"#,
    r#"{"label_time":"2026-11-22T10:00:00Z","kind":"chargeback","card_id":"card-1","customer_id":"c-1","ip":"203.0.113.9","device_id":"d-9"}"#,
];

const BLOCKS: &[(&str, &str)] = &[
    (
        "email:mallory@evil.example",
        r#"{"added_at":1795341600000,"reason":"confirmed fraud"}"#,
    ),
    (
        "ip:203.0.113.0",
        r#"{"added_at":"2026-11-22T10:00:00Z","reason":"proxy","expires_at":1795941600000}"#,
    ),
    ("card:4111111111111111", ""),
];

fn main() {
    let root = Path::new("tests/fuzz/corpus");
    let write = |target: &str, name: String, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        std::fs::write(dir.join(name), bytes).expect("seed");
    };
    for (i, json) in TX_JSON.iter().enumerate() {
        write("transaction_json", format!("json-{i}"), json.as_bytes());
    }
    let txs = [
        Transaction {
            transaction_id: "t-1".into(),
            event_time_ms: 1_795_341_600_250,
            customer_id: "c-1".into(),
            merchant_id: "m-1".into(),
            amount: 12.5,
            currency: "EUR".into(),
            email: Some("a@example.com".into()),
            features: Some(vec![0.5, -1.0]),
            ..Transaction::default()
        },
        Transaction {
            transaction_id: "t-2".into(),
            event_time_ms: 1_795_341_600_000,
            customer_id: "c-2".into(),
            merchant_id: "m-2".into(),
            amount: 1000.0,
            currency: "USD".into(),
            card_id: Some("card-2".into()),
            ip: Some("203.0.113.7".into()),
            customer_lat: Some(44.3),
            customer_lon: Some(-90.1),
            ..Transaction::default()
        },
    ];
    for (i, tx) in txs.iter().enumerate() {
        let datum = encode_transaction(tx);
        write("transaction_avro", format!("avro-{i}"), &datum);
        let mut wire = vec![0, 0, 0, 0, 1];
        wire.extend_from_slice(&datum);
        write("transaction_confluent", format!("wire-{i}"), &wire);
    }
    for (i, json) in NAV_JSON.iter().enumerate() {
        write("navigation", format!("json-{i}"), json.as_bytes());
    }
    for (i, json) in LABELS.iter().enumerate() {
        write("label", format!("json-{i}"), json.as_bytes());
    }
    for (i, (key, value)) in BLOCKS.iter().enumerate() {
        let mut bytes = vec![key.len() as u8];
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(value.as_bytes());
        write("blocklist", format!("entry-{i}"), &bytes);
    }
    let rules = std::fs::read("models/rules.toml").expect("models/rules.toml");
    write("rules", "shipped".into(), &rules);
    let config = std::fs::read("docs/fraudstream.toml").expect("docs/fraudstream.toml");
    let mut with_set = b"decision.latency-budget-ms=5\n".to_vec();
    with_set.extend_from_slice(&config);
    write("config", "shipped".into(), &with_set);
    write("config", "empty".into(), b"\n");
    println!("seeds written to {}", root.display());
}
