//! JSON transactions: one object per message, the field names of `schemas/transaction.avsc`.
//! `event_time` is RFC 3339 text or integer epoch milliseconds.

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::{DecodeError, ErrorKind, Transaction};

/// The wire shape; kept apart from [`Transaction`] so the domain type has no serde quirks.
#[derive(Deserialize)]
struct Wire {
    transaction_id: String,
    event_time: EventTime,
    customer_id: String,
    merchant_id: String,
    amount: f64,
    currency: String,
    card_id: Option<String>,
    email: Option<String>,
    device_id: Option<String>,
    ip: Option<String>,
    channel: Option<String>,
    session_id: Option<String>,
    merchant_category: Option<String>,
    customer_lat: Option<f64>,
    customer_lon: Option<f64>,
    merchant_lat: Option<f64>,
    merchant_lon: Option<f64>,
    customer_birth_date: Option<String>,
    customer_gender: Option<String>,
    customer_city: Option<String>,
    customer_state: Option<String>,
    customer_zip: Option<String>,
    customer_city_pop: Option<i64>,
    features: Option<Vec<f64>>,
}

pub(super) fn decode(bytes: &[u8]) -> Result<Transaction, DecodeError> {
    let w: Wire = serde_json::from_slice(bytes).map_err(classify)?;
    Ok(Transaction {
        transaction_id: w.transaction_id,
        event_time_ms: w.event_time.0,
        customer_id: w.customer_id,
        merchant_id: w.merchant_id,
        amount: w.amount,
        currency: w.currency,
        card_id: w.card_id,
        email: w.email,
        device_id: w.device_id,
        ip: w.ip,
        channel: w.channel,
        session_id: w.session_id,
        merchant_category: w.merchant_category,
        customer_lat: w.customer_lat,
        customer_lon: w.customer_lon,
        merchant_lat: w.merchant_lat,
        merchant_lon: w.merchant_lon,
        customer_birth_date: w.customer_birth_date,
        customer_gender: w.customer_gender,
        customer_city: w.customer_city,
        customer_state: w.customer_state,
        customer_zip: w.customer_zip,
        customer_city_pop: w.customer_city_pop,
        features: w.features,
    })
}

pub(super) fn classify(e: serde_json::Error) -> DecodeError {
    use serde_json::error::Category;
    let message = e.to_string();
    let kind = match e.classify() {
        Category::Io | Category::Syntax | Category::Eof => {
            // serde_json reports numbers beyond f64 (1e999, its way to say infinity) as a
            // syntax error; the JSON is well-formed, the value is not.
            if message.contains("number out of range") {
                ErrorKind::InvalidValue
            } else {
                ErrorKind::MalformedJson
            }
        }
        Category::Data if message.starts_with("missing field") => ErrorKind::MissingField,
        Category::Data => ErrorKind::WrongType,
    };
    DecodeError::new(kind, message)
}

/// Event time in epoch milliseconds, from RFC 3339 text or an integer.
pub(super) struct EventTime(pub(super) i64);

impl<'de> Deserialize<'de> for EventTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = EventTime;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("RFC 3339 text or integer epoch milliseconds")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<EventTime, E> {
                Ok(EventTime(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<EventTime, E> {
                i64::try_from(v)
                    .map(EventTime)
                    .map_err(|_| E::custom("event_time out of range"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EventTime, E> {
                parse_rfc3339_ms(v)
                    .map(EventTime)
                    .ok_or_else(|| E::custom(format!("event_time {v:?} is not RFC 3339 text")))
            }
        }
        d.deserialize_any(V)
    }
}

pub(crate) fn parse_rfc3339_ms(v: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}
