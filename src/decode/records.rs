//! The other inputs: navigation events, fraud labels and blocklist entries.
//!
//! JSON (the field names of their `schemas/*.avsc`), a plain Avro datum of that schema, or the
//! Confluent wire format carrying a datum written with that same schema (the schema id is
//! not looked up: unlike transactions, these records have no writer-schema registry here).
//! Like transactions, every error is poison: dead-lettered with its reason.

use std::sync::OnceLock;

use apache_avro::Schema;
use serde::Deserialize;

use super::json::EventTime;
use super::{DecodeError, ErrorKind};
use crate::config::InputFormat;

/// What a navigation event is; unknown kinds are kept as [`NavKind::Other`] (a new page type
/// on the site must not dead-letter the stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NavKind {
    PageView,
    ProductView,
    CartAdd,
    LoginOk,
    LoginFailed,
    Checkout,
    Other,
}

impl NavKind {
    fn parse(s: &str) -> NavKind {
        match s {
            "page_view" => NavKind::PageView,
            "product_view" => NavKind::ProductView,
            "cart_add" => NavKind::CartAdd,
            "login_ok" => NavKind::LoginOk,
            "login_failed" => NavKind::LoginFailed,
            "checkout" => NavKind::Checkout,
            _ => NavKind::Other,
        }
    }
}

/// A website or app event of a customer's session (`schemas/navigation_event.avsc`).
#[derive(Debug, Clone, PartialEq)]
pub struct NavigationEvent {
    pub event_id: String,
    pub event_time_ms: i64,
    pub customer_id: String,
    pub session_id: String,
    pub kind: NavKind,
    pub device_id: Option<String>,
    pub ip: Option<String>,
}

/// A confirmed fraud or chargeback naming the entities involved (`schemas/label.avsc`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Label {
    pub label_time_ms: i64,
    pub kind: String,
    pub transaction_id: Option<String>,
    pub customer_id: Option<String>,
    pub card_id: Option<String>,
    pub email: Option<String>,
    pub device_id: Option<String>,
    pub ip: Option<String>,
}

/// A blocklist entry (`schemas/block_entry.avsc`); the entity is the record's key.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockEntry {
    pub added_at_ms: i64,
    pub reason: String,
    pub expires_at_ms: Option<i64>,
}

#[derive(Deserialize)]
struct NavWire {
    event_id: String,
    event_time: EventTime,
    customer_id: String,
    session_id: String,
    kind: String,
    device_id: Option<String>,
    ip: Option<String>,
}

#[derive(Deserialize)]
struct LabelWire {
    label_time: EventTime,
    kind: String,
    transaction_id: Option<String>,
    customer_id: Option<String>,
    card_id: Option<String>,
    email: Option<String>,
    device_id: Option<String>,
    ip: Option<String>,
}

#[derive(Deserialize)]
struct BlockWire {
    added_at: EventTime,
    reason: String,
    expires_at: Option<EventTime>,
}

fn schema(cell: &'static OnceLock<Schema>, text: &str) -> &'static Schema {
    cell.get_or_init(|| Schema::parse_str(text).expect("shipped schema parses"))
}

fn navigation_schema() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    schema(&S, include_str!("../../schemas/navigation_event.avsc"))
}

fn label_schema() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    schema(&S, include_str!("../../schemas/label.avsc"))
}

fn block_schema() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    schema(&S, include_str!("../../schemas/block_entry.avsc"))
}

/// Bytes → `W`, in the configured format (`auto`: JSON if it starts with `{`, Confluent if
/// it starts with byte 0, plain Avro otherwise).
fn decode<W: for<'de> Deserialize<'de>>(
    format: InputFormat,
    schema: &Schema,
    bytes: Option<&[u8]>,
    max_bytes: usize,
) -> Result<W, DecodeError> {
    let bytes = match bytes {
        None => return Err(DecodeError::new(ErrorKind::Empty, "message has no value")),
        Some([]) => return Err(DecodeError::new(ErrorKind::Empty, "message value is empty")),
        Some(b) => b,
    };
    if bytes.len() > max_bytes {
        return Err(DecodeError::new(
            ErrorKind::Oversized,
            format!(
                "message is {} bytes, more than input.max-message-bytes = {max_bytes}",
                bytes.len()
            ),
        ));
    }
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let json = match format {
        InputFormat::Json => true,
        InputFormat::Avro | InputFormat::ConfluentAvro => false,
        InputFormat::Auto => {
            first == Some(b'{') || (bytes[0] != 0 && super::looks_like_text(bytes))
        }
    };
    if json {
        return serde_json::from_slice(bytes).map_err(super::json::classify);
    }
    let datum = if format == InputFormat::ConfluentAvro || bytes[0] == 0 {
        if bytes.len() < 5 || bytes[0] != 0 {
            return Err(DecodeError::new(
                ErrorKind::AvroDecode,
                "not in the Confluent wire format (magic byte 0 and a 4-byte schema id)",
            ));
        }
        &bytes[5..]
    } else {
        bytes
    };
    let mut reader = datum;
    let value = apache_avro::from_avro_datum(schema, &mut reader, None)
        .map_err(|e| DecodeError::new(ErrorKind::AvroDecode, format!("invalid Avro datum: {e}")))?;
    if !reader.is_empty() {
        return Err(DecodeError::new(
            ErrorKind::AvroDecode,
            format!("{} bytes left after the Avro datum", reader.len()),
        ));
    }
    apache_avro::from_value(&value)
        .map_err(|e| DecodeError::new(ErrorKind::WrongType, format!("invalid record: {e}")))
}

fn non_empty(name: &str, v: &str) -> Result<(), DecodeError> {
    if v.trim().is_empty() {
        Err(DecodeError::new(
            ErrorKind::InvalidValue,
            format!("`{name}` is empty"),
        ))
    } else {
        Ok(())
    }
}

fn time_in_range(name: &str, t: i64) -> Result<i64, DecodeError> {
    if (super::MIN_EVENT_TIME_MS..=super::MAX_EVENT_TIME_MS).contains(&t) {
        Ok(t)
    } else {
        Err(DecodeError::new(
            ErrorKind::InvalidValue,
            format!("`{name}` {t} ms is outside 1970-01-01 .. 9999-12-31"),
        ))
    }
}

pub fn decode_navigation(
    format: InputFormat,
    bytes: Option<&[u8]>,
    max_bytes: usize,
) -> Result<NavigationEvent, DecodeError> {
    let w: NavWire = decode(format, navigation_schema(), bytes, max_bytes)?;
    non_empty("event_id", &w.event_id)?;
    non_empty("customer_id", &w.customer_id)?;
    non_empty("session_id", &w.session_id)?;
    Ok(NavigationEvent {
        event_id: w.event_id,
        event_time_ms: time_in_range("event_time", w.event_time.0)?,
        customer_id: w.customer_id,
        session_id: w.session_id,
        kind: NavKind::parse(&w.kind),
        device_id: w.device_id,
        ip: w.ip,
    })
}

pub fn decode_label(
    format: InputFormat,
    bytes: Option<&[u8]>,
    max_bytes: usize,
) -> Result<Label, DecodeError> {
    let w: LabelWire = decode(format, label_schema(), bytes, max_bytes)?;
    let label = Label {
        label_time_ms: time_in_range("label_time", w.label_time.0)?,
        kind: w.kind,
        transaction_id: w.transaction_id,
        customer_id: w.customer_id,
        card_id: w.card_id,
        email: w.email,
        device_id: w.device_id,
        ip: w.ip,
    };
    if [
        &label.customer_id,
        &label.card_id,
        &label.email,
        &label.device_id,
        &label.ip,
    ]
    .iter()
    .all(|v| v.is_none())
    {
        return Err(DecodeError::new(
            ErrorKind::MissingField,
            "a label must name at least one of customer_id, card_id, email, device_id, ip",
        ));
    }
    Ok(label)
}

/// A blocklist value; `None` bytes (a tombstone) are not decoded here but mean "removed".
pub fn decode_block_entry(
    format: InputFormat,
    bytes: &[u8],
    max_bytes: usize,
) -> Result<BlockEntry, DecodeError> {
    let w: BlockWire = decode(format, block_schema(), Some(bytes), max_bytes)?;
    Ok(BlockEntry {
        added_at_ms: time_in_range("added_at", w.added_at.0)?,
        reason: w.reason,
        expires_at_ms: w.expires_at.map(|t| t.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    #[test]
    fn navigation_json_and_unknown_kind() {
        let n = decode_navigation(
            InputFormat::Auto,
            Some(br#"{"event_id":"e1","event_time":"2026-11-22T10:00:00Z","customer_id":"c1","session_id":"s1","kind":"wishlist_add","extra":1}"#),
            MAX,
        )
        .unwrap();
        assert_eq!(n.kind, NavKind::Other);
        assert_eq!(n.event_time_ms, 1_795_341_600_000);
        let bad = decode_navigation(
            InputFormat::Auto,
            Some(br#"{"event_id":"e1","event_time":1,"customer_id":"","session_id":"s1","kind":"page_view"}"#),
            MAX,
        )
        .unwrap_err();
        assert_eq!(bad.kind, ErrorKind::InvalidValue);
        let missing =
            decode_navigation(InputFormat::Json, Some(br#"{"event_id":"e1"}"#), MAX).unwrap_err();
        assert_eq!(missing.kind, ErrorKind::MissingField);
        assert_eq!(
            decode_navigation(InputFormat::Auto, None, MAX)
                .unwrap_err()
                .kind,
            ErrorKind::Empty
        );
    }

    #[test]
    fn navigation_avro_plain_and_confluent() {
        use apache_avro::types::{Record, Value};
        let mut r = Record::new(navigation_schema()).unwrap();
        r.put("event_id", "e1");
        r.put("event_time", Value::TimestampMillis(5));
        r.put("customer_id", "c1");
        r.put("session_id", "s1");
        r.put("kind", "cart_add");
        r.put("page", Value::Union(0, Box::new(Value::Null)));
        r.put("product_id", Value::Union(0, Box::new(Value::Null)));
        r.put(
            "device_id",
            Value::Union(1, Box::new(Value::String("d1".into()))),
        );
        r.put("ip", Value::Union(0, Box::new(Value::Null)));
        r.put("user_agent", Value::Union(0, Box::new(Value::Null)));
        let datum = apache_avro::to_avro_datum(navigation_schema(), r).unwrap();
        let n = decode_navigation(InputFormat::Avro, Some(&datum), MAX).unwrap();
        assert_eq!((n.kind, n.event_time_ms), (NavKind::CartAdd, 5));
        assert_eq!(n.device_id.as_deref(), Some("d1"));
        let mut wire = vec![0, 0, 0, 0, 7];
        wire.extend_from_slice(&datum);
        assert_eq!(
            decode_navigation(InputFormat::Auto, Some(&wire), MAX).unwrap(),
            n
        );
        // apache-avro reads some truncations as a partial record: either way it is poison.
        let cut = decode_navigation(InputFormat::Avro, Some(&datum[..datum.len() / 2]), MAX);
        assert!(
            matches!(
                cut.unwrap_err().kind,
                ErrorKind::AvroDecode | ErrorKind::WrongType
            ),
            "truncated datum"
        );
    }

    #[test]
    fn labels_name_an_entity_and_block_entries_decode() {
        let l = decode_label(
            InputFormat::Json,
            Some(br#"{"label_time":10,"kind":"fraud","email":"a@b.c"}"#),
            MAX,
        )
        .unwrap();
        assert_eq!(l.email.as_deref(), Some("a@b.c"));
        assert_eq!(
            decode_label(
                InputFormat::Json,
                Some(br#"{"label_time":10,"kind":"fraud"}"#),
                MAX
            )
            .unwrap_err()
            .kind,
            ErrorKind::MissingField
        );
        let b = decode_block_entry(
            InputFormat::Auto,
            br#"{"added_at":"2026-11-22T10:00:00Z","reason":"chargebacks","expires_at":null}"#,
            MAX,
        )
        .unwrap();
        assert_eq!(b.reason, "chargebacks");
        assert_eq!(b.expires_at_ms, None);
    }
}
