//! Bytes from Kafka → a validated [`Transaction`], or a [`DecodeError`] that says why not.
//!
//! Pure: no I/O once the [`Decoder`] is built. Every error here is *poison*: the message is
//! dead-lettered with [`DecodeError::kind`] and the partition moves on. Unknown fields are
//! ignored; missing required fields, wrong types and invalid values are errors.

mod avro;
#[cfg(test)]
mod fuzz;
mod json;
mod records;

use std::collections::HashMap;
use std::path::Path;

pub use avro::{encode_transaction, transaction_schema, verdict_schema, AvroSchemas};
pub(crate) use json::parse_rfc3339_ms;
pub use records::{
    decode_block_entry, decode_label, decode_navigation, BlockEntry, Label, NavKind,
    NavigationEvent,
};

use crate::config::{InputFormat, InputSettings};

/// A payment transaction, as fraudstream reads it from JSON or Avro.
///
/// Field names and meaning follow `schemas/transaction.avsc`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Transaction {
    pub transaction_id: String,
    /// UTC epoch milliseconds of the payment (event time, never the wall clock).
    pub event_time_ms: i64,
    pub customer_id: String,
    pub merchant_id: String,
    pub amount: f64,
    pub currency: String,
    pub card_id: Option<String>,
    pub email: Option<String>,
    pub device_id: Option<String>,
    pub ip: Option<String>,
    pub channel: Option<String>,
    pub session_id: Option<String>,
    pub merchant_category: Option<String>,
    pub customer_lat: Option<f64>,
    pub customer_lon: Option<f64>,
    pub merchant_lat: Option<f64>,
    pub merchant_lon: Option<f64>,
    pub customer_birth_date: Option<String>,
    pub customer_gender: Option<String>,
    pub customer_city: Option<String>,
    pub customer_state: Option<String>,
    pub customer_zip: Option<String>,
    pub customer_city_pop: Option<i64>,
    /// A precomputed feature vector for passthrough models.
    pub features: Option<Vec<f64>>,
}

/// The dead-letter reason kinds; their names are the `fraudstream.error.kind` header values
/// and the `kind` label of `fraudstream_dead_letters_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    Empty,
    Oversized,
    MalformedJson,
    MissingField,
    WrongType,
    InvalidAmount,
    InvalidValue,
    FeatureLength,
    AvroDecode,
    UnknownSchemaId,
    /// Far ahead of its partition's stream time and of the wall clock.
    EventTimeSkew,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::Empty,
        ErrorKind::Oversized,
        ErrorKind::MalformedJson,
        ErrorKind::MissingField,
        ErrorKind::WrongType,
        ErrorKind::InvalidAmount,
        ErrorKind::InvalidValue,
        ErrorKind::FeatureLength,
        ErrorKind::AvroDecode,
        ErrorKind::UnknownSchemaId,
        ErrorKind::EventTimeSkew,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Empty => "empty",
            ErrorKind::Oversized => "oversized",
            ErrorKind::MalformedJson => "malformed-json",
            ErrorKind::MissingField => "missing-field",
            ErrorKind::WrongType => "wrong-type",
            ErrorKind::InvalidAmount => "invalid-amount",
            ErrorKind::InvalidValue => "invalid-value",
            ErrorKind::FeatureLength => "feature-length",
            ErrorKind::AvroDecode => "avro-decode",
            ErrorKind::UnknownSchemaId => "unknown-schema-id",
            ErrorKind::EventTimeSkew => "event-time-skew",
        }
    }
}

/// Why a message is not a valid transaction. Always poison: dead-letter it and move on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct DecodeError {
    pub kind: ErrorKind,
    pub message: String,
}

impl DecodeError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        DecodeError {
            kind,
            message: message.into(),
        }
    }
}

/// What the model in service needs from every transaction, checked at decode time so that
/// a transaction the model cannot score is dead-lettered, not scored with made-up values.
#[derive(Debug, Clone, Copy, Default)]
pub struct Requirements {
    /// The exact length of the `features` vector, when the model reads it.
    pub passthrough_len: Option<usize>,
}

impl Requirements {
    /// Whether the model can score `tx` (a transaction decoded for another model may not).
    pub fn check(&self, tx: &Transaction) -> Result<(), DecodeError> {
        if let Some(want) = self.passthrough_len {
            match &tx.features {
                None => {
                    return Err(DecodeError::new(
                        ErrorKind::MissingField,
                        format!(
                            "missing field `features`: the model reads a vector of {want} values"
                        ),
                    ))
                }
                Some(f) if f.len() != want => {
                    return Err(DecodeError::new(
                        ErrorKind::FeatureLength,
                        format!(
                            "`features` has {} values, the model reads exactly {want}",
                            f.len()
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// Decodes and validates transactions. Built once at start from the settings.
pub struct Decoder {
    format: InputFormat,
    max_bytes: usize,
    max_amount: f64,
    requirements: Requirements,
    avro: AvroSchemas,
}

/// Earliest and latest accepted event times: 1970-01-01 and 9999-12-31 (UTC).
const MIN_EVENT_TIME_MS: i64 = 0;
const MAX_EVENT_TIME_MS: i64 = 253_402_300_799_999;

impl Decoder {
    /// What later transactions must carry: the requirements of a model swapped in.
    pub fn set_requirements(&mut self, requirements: Requirements) {
        self.requirements = requirements;
    }

    /// `schema_ids` maps Confluent schema ids to writer-schema files.
    pub fn new(
        input: &InputSettings,
        requirements: Requirements,
    ) -> Result<Decoder, anyhow::Error> {
        let mut writers = HashMap::new();
        for (id, path) in &input.schema_ids {
            let id: u32 = id.parse()?;
            writers.insert(id, load_schema(path)?);
        }
        if writers.is_empty() {
            writers.insert(1, transaction_schema().clone());
        }
        // No Avro length (of a string, bytes, an array or a map) may claim more than a whole
        // message could hold: apache-avro reserves what a length claims before reading it,
        // and a 100-byte message claiming 100 million array items would ask for gigabytes.
        // (A process-wide setting of apache-avro, taken at its first use.)
        apache_avro::util::max_allocation_bytes(input.max_message_bytes);
        Ok(Decoder {
            format: input.format,
            max_bytes: input.max_message_bytes,
            max_amount: input.max_amount,
            requirements,
            avro: AvroSchemas::new(writers),
        })
    }

    /// Bytes → navigation event, in the input format.
    pub fn decode_navigation(
        &self,
        payload: Option<&[u8]>,
    ) -> Result<NavigationEvent, DecodeError> {
        records::decode_navigation(self.format, payload, self.max_bytes)
    }

    /// Bytes → validated transaction. `None` payload (a tombstone) is an error too.
    pub fn decode(&self, payload: Option<&[u8]>) -> Result<Transaction, DecodeError> {
        let bytes = match payload {
            None => return Err(DecodeError::new(ErrorKind::Empty, "message has no value")),
            Some([]) => return Err(DecodeError::new(ErrorKind::Empty, "message value is empty")),
            Some(b) => b,
        };
        if bytes.len() > self.max_bytes {
            return Err(DecodeError::new(
                ErrorKind::Oversized,
                format!(
                    "message is {} bytes, more than input.max-message-bytes = {}",
                    bytes.len(),
                    self.max_bytes
                ),
            ));
        }
        let tx = match self.format {
            InputFormat::Json => json::decode(bytes)?,
            InputFormat::Avro => self.avro.decode_plain(bytes)?,
            InputFormat::ConfluentAvro => self.avro.decode_confluent(bytes)?,
            InputFormat::Auto => match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
                Some(b'{') => json::decode(bytes)?,
                Some(0) if bytes[0] == 0 => self.avro.decode_confluent(bytes)?,
                _ if looks_like_text(bytes) => json::decode(bytes)?,
                _ => self.avro.decode_plain(bytes)?,
            },
        };
        validate(&tx, &self.requirements)?;
        if tx.amount > self.max_amount {
            return Err(DecodeError::new(
                ErrorKind::InvalidAmount,
                format!(
                    "`amount` {} is over input.max-amount = {}",
                    tx.amount, self.max_amount
                ),
            ));
        }
        Ok(tx)
    }
}

/// Text that is not a JSON object (`[1]`, `"x"`, `hello`) is reported as bad JSON, which
/// is what its producer most likely meant to send, rather than as bad Avro.
fn looks_like_text(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes)
        .is_ok_and(|s| s.chars().all(|c| !c.is_control() || c.is_whitespace()))
}

fn load_schema(path: &Path) -> Result<apache_avro::Schema, anyhow::Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read Avro schema {}: {e}", path.display()))?;
    apache_avro::Schema::parse_str(&text)
        .map_err(|e| anyhow::anyhow!("invalid Avro schema {}: {e}", path.display()))
}

/// Rules that hold whatever the encoding.
pub fn validate(tx: &Transaction, req: &Requirements) -> Result<(), DecodeError> {
    for (name, value) in [
        ("transaction_id", &tx.transaction_id),
        ("customer_id", &tx.customer_id),
        ("merchant_id", &tx.merchant_id),
    ] {
        if value.trim().is_empty() {
            return Err(DecodeError::new(
                ErrorKind::InvalidValue,
                format!("`{name}` is empty"),
            ));
        }
    }
    if !tx.amount.is_finite() || tx.amount < 0.0 {
        return Err(DecodeError::new(
            ErrorKind::InvalidAmount,
            format!("`amount` must be a finite number >= 0, got {}", tx.amount),
        ));
    }
    if tx.currency.len() != 3 || !tx.currency.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(DecodeError::new(
            ErrorKind::InvalidValue,
            format!(
                "`currency` must be a three-letter ISO 4217 code, got {:?}",
                tx.currency
            ),
        ));
    }
    if !(MIN_EVENT_TIME_MS..=MAX_EVENT_TIME_MS).contains(&tx.event_time_ms) {
        return Err(DecodeError::new(
            ErrorKind::InvalidValue,
            format!(
                "`event_time` {} ms is outside 1970-01-01 .. 9999-12-31",
                tx.event_time_ms
            ),
        ));
    }
    for (name, v) in [
        ("customer_lat", tx.customer_lat),
        ("customer_lon", tx.customer_lon),
        ("merchant_lat", tx.merchant_lat),
        ("merchant_lon", tx.merchant_lon),
    ] {
        if v.is_some_and(|x| !x.is_finite()) {
            return Err(DecodeError::new(
                ErrorKind::InvalidValue,
                format!("`{name}` is not a finite number"),
            ));
        }
    }
    if let Some(features) = &tx.features {
        if let Some(i) = features.iter().position(|x| !x.is_finite()) {
            return Err(DecodeError::new(
                ErrorKind::InvalidValue,
                format!("`features[{i}]` is not a finite number"),
            ));
        }
    }
    req.check(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_are_listed_in_declaration_order() {
        // The pipeline counts dead letters in an array indexed by `kind as usize`.
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
    }

    pub(crate) fn decoder(req: Requirements) -> Decoder {
        Decoder::new(&InputSettings::default(), req).unwrap()
    }

    const GOOD: &str = r#"{"transaction_id":"t1","event_time":"2026-11-22T10:00:00.250Z",
        "customer_id":"c1","merchant_id":"m1","amount":12.5,"currency":"EUR",
        "card_id":"tok_1","email":"a@b.c","device_id":"d","ip":"10.0.0.1","channel":"web",
        "features":[1,2,3],"something_new":{"x":1}}"#;

    #[test]
    fn json_with_unknown_fields_decodes() {
        let tx = decoder(Requirements::default())
            .decode(Some(GOOD.as_bytes()))
            .unwrap();
        assert_eq!(tx.transaction_id, "t1");
        assert_eq!(tx.event_time_ms, 1_795_341_600_250);
        assert_eq!(tx.amount, 12.5);
        assert_eq!(tx.card_id.as_deref(), Some("tok_1"));
        assert_eq!(tx.features, Some(vec![1.0, 2.0, 3.0]));
        assert_eq!(tx.session_id, None);
    }

    #[test]
    fn event_time_accepts_epoch_millis_and_offsets() {
        let d = decoder(Requirements::default());
        let ms = GOOD.replace("\"2026-11-22T10:00:00.250Z\"", "1795341600250");
        assert_eq!(
            d.decode(Some(ms.as_bytes())).unwrap().event_time_ms,
            1_795_341_600_250
        );
        let off = GOOD.replace("2026-11-22T10:00:00.250Z", "2026-11-22T11:00:00.250+01:00");
        assert_eq!(
            d.decode(Some(off.as_bytes())).unwrap().event_time_ms,
            1_795_341_600_250
        );
    }

    fn kind_of(d: &Decoder, payload: &[u8]) -> ErrorKind {
        d.decode(Some(payload)).unwrap_err().kind
    }

    #[test]
    fn each_bad_input_has_its_kind() {
        let d = decoder(Requirements {
            passthrough_len: Some(3),
        });
        assert_eq!(d.decode(None).unwrap_err().kind, ErrorKind::Empty);
        assert_eq!(kind_of(&d, b""), ErrorKind::Empty);
        assert_eq!(
            kind_of(&d, b"{\"transaction_id\":"),
            ErrorKind::MalformedJson
        );
        assert_eq!(kind_of(&d, b"not json at all"), ErrorKind::MalformedJson);
        assert_eq!(
            kind_of(&d, GOOD.replace("\"amount\":12.5,", "").as_bytes()),
            ErrorKind::MissingField
        );
        assert_eq!(
            kind_of(&d, GOOD.replace("12.5", "\"12.5\"").as_bytes()),
            ErrorKind::WrongType
        );
        assert_eq!(
            kind_of(&d, GOOD.replace("12.5", "-1").as_bytes()),
            ErrorKind::InvalidAmount
        );
        assert_eq!(
            kind_of(&d, GOOD.replace("12.5", "1e999").as_bytes()),
            ErrorKind::InvalidValue
        );
        assert_eq!(
            kind_of(&d, GOOD.replace("[1,2,3]", "[1,2]").as_bytes()),
            ErrorKind::FeatureLength
        );
        assert_eq!(
            kind_of(&d, GOOD.replace("\"EUR\"", "\"EURO\"").as_bytes()),
            ErrorKind::InvalidValue
        );
        assert_eq!(
            kind_of(
                &d,
                GOOD.replace("2026-11-22T10", "yesterday T10").as_bytes()
            ),
            ErrorKind::WrongType
        );
        let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(70_000));
        assert_eq!(kind_of(&d, big.as_bytes()), ErrorKind::Oversized);
    }

    #[test]
    fn missing_features_for_a_passthrough_model_is_a_missing_field() {
        let d = decoder(Requirements {
            passthrough_len: Some(3),
        });
        let no_features = GOOD.replace("\"features\":[1,2,3],", "");
        let err = d.decode(Some(no_features.as_bytes())).unwrap_err();
        assert_eq!(err.kind, ErrorKind::MissingField);
        assert!(err.message.contains("features"));
    }

    #[test]
    fn error_kind_names_are_unique() {
        let mut names: Vec<_> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ErrorKind::ALL.len());
    }
}
