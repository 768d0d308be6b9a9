//! Fuzzing every decoder with proptest, for a fixed budget in CI (`cargo test`): random
//! bytes, mutated valid messages (bit flips, truncations, insertions) and hostile JSON, in
//! every input format. The property: no panic, and a message that decodes is a valid one.

use proptest::prelude::*;

use super::*;
use crate::config::{InputFormat, InputSettings};

const FORMATS: [InputFormat; 4] = [
    InputFormat::Auto,
    InputFormat::Json,
    InputFormat::Avro,
    InputFormat::ConfluentAvro,
];

fn decoder(format: InputFormat) -> Decoder {
    let input = InputSettings {
        format,
        ..InputSettings::default()
    };
    Decoder::new(
        &input,
        Requirements {
            passthrough_len: None,
        },
    )
    .expect("decoder")
}

fn good_tx() -> Transaction {
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
    }
}

fn good_json() -> Vec<u8> {
    br#"{"transaction_id":"t-1","event_time":"2026-11-22T10:00:00.250Z","customer_id":"c-1","merchant_id":"m-1","amount":12.5,"currency":"EUR","email":"a@example.com","features":[0.5,-1.0]}"#.to_vec()
}

fn good_nav() -> Vec<u8> {
    br#"{"event_id":"e1","event_time":1795341600000,"customer_id":"c-1","session_id":"s1","kind":"page_view","device_id":"d"}"#.to_vec()
}

/// Every decoder, in every format: whatever it returns, it must not panic.
fn decode_everything(bytes: &[u8]) {
    for f in FORMATS {
        let d = decoder(f);
        if let Ok(tx) = d.decode(Some(bytes)) {
            validate(&tx, &Requirements::default()).expect("a decoded transaction is valid");
        }
        let _ = d.decode_navigation(Some(bytes));
        let _ = records::decode_label(f, Some(bytes), 65_536);
        let _ = records::decode_block_entry(f, bytes, 65_536);
    }
}

/// A valid message with `edits` applied: (position, kind, byte).
fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(at, kind, b) in edits {
        if bytes.is_empty() {
            bytes.push(b);
            continue;
        }
        let i = at % bytes.len();
        match kind % 4 {
            0 => bytes[i] ^= 1 << (b % 8),
            1 => bytes.truncate(i),
            2 => bytes.insert(i, b),
            _ => bytes[i] = b,
        }
    }
    bytes
}

fn confluent(datum: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 0, 0, 1];
    v.extend_from_slice(datum);
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        decode_everything(&bytes);
    }

    #[test]
    fn mutated_messages_never_panic(
        which in 0usize..4,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..8),
    ) {
        let avro = encode_transaction(&good_tx());
        let base = match which {
            0 => good_json(),
            1 => good_nav(),
            2 => avro,
            _ => confluent(&avro),
        };
        decode_everything(&mutate(base, &edits));
    }

    #[test]
    fn hostile_json_never_panics(
        depth in 0usize..3000,
        long in 0usize..70_000,
        number in prop_oneof![Just("NaN"), Just("Infinity"), Just("1e999"), Just("-0"), Just("9007199254740993"), Just("\"12\"")],
        time in prop_oneof![Just("-1"), Just("253402300800000"), Just("\"0000-01-01T00:00:00Z\""), Just("\"9999-12-31T23:59:59.999Z\""), Just("1e20")],
    ) {
        let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let text = format!(
            r#"{{"transaction_id":"{}","event_time":{time},"customer_id":"c","merchant_id":"m","amount":{number},"currency":"EUR","features":{nested}}}"#,
            "x".repeat(long)
        );
        decode_everything(text.as_bytes());
    }
}

#[test]
fn the_seeds_are_valid() {
    // The mutations start from messages that decode, in the formats that read them.
    assert!(decoder(InputFormat::Auto)
        .decode(Some(&good_json()))
        .is_ok());
    assert!(decoder(InputFormat::Auto)
        .decode_navigation(Some(&good_nav()))
        .is_ok());
    let avro = encode_transaction(&good_tx());
    assert!(decoder(InputFormat::Avro).decode(Some(&avro)).is_ok());
    assert!(decoder(InputFormat::ConfluentAvro)
        .decode(Some(&confluent(&avro)))
        .is_ok());
}
