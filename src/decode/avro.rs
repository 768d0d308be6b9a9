//! Avro transactions: a plain datum of `schemas/transaction.avsc`, or the Confluent wire
//! format (magic byte 0, 4-byte big-endian schema id, datum) with the writer schema looked up
//! by id and resolved to fraudstream's Transaction schema.

use std::collections::HashMap;
use std::sync::OnceLock;

use apache_avro::types::Value;
use apache_avro::Schema;

use super::{DecodeError, ErrorKind, Transaction};

const TRANSACTION_AVSC: &str = include_str!("../../schemas/transaction.avsc");
const VERDICT_AVSC: &str = include_str!("../../schemas/verdict.avsc");

/// fraudstream's Transaction schema (the reader schema for every Avro input).
pub fn transaction_schema() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    S.get_or_init(|| Schema::parse_str(TRANSACTION_AVSC).expect("schemas/transaction.avsc parses"))
}

/// fraudstream's Verdict schema.
pub fn verdict_schema() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    S.get_or_init(|| Schema::parse_str(VERDICT_AVSC).expect("schemas/verdict.avsc parses"))
}

/// Writer schemas by Confluent schema id.
pub struct AvroSchemas {
    /// id → (writer schema, whether it must be resolved to the reader schema).
    writers: HashMap<u32, (Schema, bool)>,
}

impl AvroSchemas {
    pub fn new(writers: HashMap<u32, Schema>) -> Self {
        let reader = transaction_schema().canonical_form();
        AvroSchemas {
            writers: writers
                .into_iter()
                .map(|(id, s)| {
                    let resolve = s.canonical_form() != reader;
                    (id, (s, resolve))
                })
                .collect(),
        }
    }

    pub fn decode_plain(&self, bytes: &[u8]) -> Result<Transaction, DecodeError> {
        decode_datum(transaction_schema(), false, bytes)
    }

    pub fn decode_confluent(&self, bytes: &[u8]) -> Result<Transaction, DecodeError> {
        if bytes.len() < 5 || bytes[0] != 0 {
            return Err(DecodeError::new(
                ErrorKind::AvroDecode,
                "not in the Confluent wire format (magic byte 0 and a 4-byte schema id)",
            ));
        }
        let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let Some((schema, resolve)) = self.writers.get(&id) else {
            return Err(DecodeError::new(
                ErrorKind::UnknownSchemaId,
                format!("schema id {id} is not in input.schema-ids"),
            ));
        };
        decode_datum(schema, *resolve, &bytes[5..])
    }
}

fn decode_datum(writer: &Schema, resolve: bool, bytes: &[u8]) -> Result<Transaction, DecodeError> {
    let mut reader = bytes;
    let reader_schema = resolve.then(transaction_schema);
    let value = apache_avro::from_avro_datum(writer, &mut reader, reader_schema)
        .map_err(|e| DecodeError::new(ErrorKind::AvroDecode, format!("invalid Avro datum: {e}")))?;
    if !reader.is_empty() {
        return Err(DecodeError::new(
            ErrorKind::AvroDecode,
            format!("{} bytes left after the Avro datum", reader.len()),
        ));
    }
    from_value(value)
}

fn from_value(value: Value) -> Result<Transaction, DecodeError> {
    let Value::Record(fields) = value else {
        return Err(DecodeError::new(
            ErrorKind::AvroDecode,
            "Avro datum is not a record",
        ));
    };
    let mut tx = Transaction::default();
    for (name, v) in fields {
        let v = match v {
            Value::Union(_, inner) => *inner,
            other => other,
        };
        if v == Value::Null {
            continue;
        }
        match name.as_str() {
            "transaction_id" => tx.transaction_id = string(&name, v)?,
            "event_time" => {
                tx.event_time_ms = match v {
                    Value::TimestampMillis(ms) | Value::Long(ms) => ms,
                    other => return Err(wrong(&name, &other)),
                }
            }
            "customer_id" => tx.customer_id = string(&name, v)?,
            "merchant_id" => tx.merchant_id = string(&name, v)?,
            "amount" => tx.amount = double(&name, v)?,
            "currency" => tx.currency = string(&name, v)?,
            "card_id" => tx.card_id = Some(string(&name, v)?),
            "email" => tx.email = Some(string(&name, v)?),
            "device_id" => tx.device_id = Some(string(&name, v)?),
            "ip" => tx.ip = Some(string(&name, v)?),
            "channel" => tx.channel = Some(string(&name, v)?),
            "session_id" => tx.session_id = Some(string(&name, v)?),
            "merchant_category" => tx.merchant_category = Some(string(&name, v)?),
            "customer_lat" => tx.customer_lat = Some(double(&name, v)?),
            "customer_lon" => tx.customer_lon = Some(double(&name, v)?),
            "merchant_lat" => tx.merchant_lat = Some(double(&name, v)?),
            "merchant_lon" => tx.merchant_lon = Some(double(&name, v)?),
            "customer_birth_date" => tx.customer_birth_date = Some(string(&name, v)?),
            "customer_gender" => tx.customer_gender = Some(string(&name, v)?),
            "customer_city" => tx.customer_city = Some(string(&name, v)?),
            "customer_state" => tx.customer_state = Some(string(&name, v)?),
            "customer_zip" => tx.customer_zip = Some(string(&name, v)?),
            "customer_city_pop" => {
                tx.customer_city_pop = Some(match v {
                    Value::Long(x) => x,
                    Value::Int(x) => x.into(),
                    other => return Err(wrong(&name, &other)),
                })
            }
            "features" => {
                let Value::Array(items) = v else {
                    return Err(wrong(&name, &v));
                };
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    out.push(double(&name, item)?);
                }
                tx.features = Some(out);
            }
            _ => {}
        }
    }
    Ok(tx)
}

fn wrong(name: &str, v: &Value) -> DecodeError {
    DecodeError::new(
        ErrorKind::WrongType,
        format!("field `{name}` has an unexpected Avro type: {v:?}"),
    )
}

fn string(name: &str, v: Value) -> Result<String, DecodeError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(wrong(name, &other)),
    }
}

fn double(name: &str, v: Value) -> Result<f64, DecodeError> {
    match v {
        Value::Double(x) => Ok(x),
        Value::Float(x) => Ok(x.into()),
        Value::Long(x) => Ok(x as f64),
        Value::Int(x) => Ok(x.into()),
        other => Err(wrong(name, &other)),
    }
}

/// Encodes a transaction as a plain Avro datum: used by tests, benchmarks and tools that
/// produce Avro input.
pub fn encode_transaction(tx: &Transaction) -> Vec<u8> {
    fn opt_s(v: &Option<String>) -> Value {
        match v {
            Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
            None => Value::Union(0, Box::new(Value::Null)),
        }
    }
    fn opt_d(v: Option<f64>) -> Value {
        match v {
            Some(x) => Value::Union(1, Box::new(Value::Double(x))),
            None => Value::Union(0, Box::new(Value::Null)),
        }
    }
    let record = Value::Record(vec![
        (
            "transaction_id".into(),
            Value::String(tx.transaction_id.clone()),
        ),
        (
            "event_time".into(),
            Value::TimestampMillis(tx.event_time_ms),
        ),
        ("customer_id".into(), Value::String(tx.customer_id.clone())),
        ("merchant_id".into(), Value::String(tx.merchant_id.clone())),
        ("amount".into(), Value::Double(tx.amount)),
        ("currency".into(), Value::String(tx.currency.clone())),
        ("card_id".into(), opt_s(&tx.card_id)),
        ("email".into(), opt_s(&tx.email)),
        ("device_id".into(), opt_s(&tx.device_id)),
        ("ip".into(), opt_s(&tx.ip)),
        ("channel".into(), opt_s(&tx.channel)),
        ("session_id".into(), opt_s(&tx.session_id)),
        ("merchant_category".into(), opt_s(&tx.merchant_category)),
        ("customer_lat".into(), opt_d(tx.customer_lat)),
        ("customer_lon".into(), opt_d(tx.customer_lon)),
        ("merchant_lat".into(), opt_d(tx.merchant_lat)),
        ("merchant_lon".into(), opt_d(tx.merchant_lon)),
        ("customer_birth_date".into(), opt_s(&tx.customer_birth_date)),
        ("customer_gender".into(), opt_s(&tx.customer_gender)),
        ("customer_city".into(), opt_s(&tx.customer_city)),
        ("customer_state".into(), opt_s(&tx.customer_state)),
        ("customer_zip".into(), opt_s(&tx.customer_zip)),
        (
            "customer_city_pop".into(),
            match tx.customer_city_pop {
                Some(x) => Value::Union(1, Box::new(Value::Long(x))),
                None => Value::Union(0, Box::new(Value::Null)),
            },
        ),
        (
            "features".into(),
            match &tx.features {
                Some(f) => Value::Union(
                    1,
                    Box::new(Value::Array(f.iter().map(|x| Value::Double(*x)).collect())),
                ),
                None => Value::Union(0, Box::new(Value::Null)),
            },
        ),
    ]);
    apache_avro::to_avro_datum(transaction_schema(), record)
        .expect("a Transaction value always matches its schema")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::tests::decoder;
    use crate::decode::Requirements;

    fn sample() -> Transaction {
        Transaction {
            transaction_id: "t-avro".into(),
            event_time_ms: 1_795_341_600_250,
            customer_id: "c1".into(),
            merchant_id: "m1".into(),
            amount: 99.5,
            currency: "USD".into(),
            card_id: Some("tok".into()),
            customer_city_pop: Some(1234),
            customer_lat: Some(41.5),
            features: Some(vec![0.5, -1.25, 3.0]),
            ..Transaction::default()
        }
    }

    #[test]
    fn plain_and_confluent_round_trip() {
        let d = decoder(Requirements::default());
        let tx = sample();
        let datum = encode_transaction(&tx);
        assert_eq!(d.decode(Some(&datum)).unwrap(), tx);
        let mut wire = vec![0, 0, 0, 0, 1];
        wire.extend_from_slice(&datum);
        assert_eq!(d.decode(Some(&wire)).unwrap(), tx);
    }

    #[test]
    fn truncated_unknown_id_and_nan_are_rejected() {
        let d = decoder(Requirements::default());
        let datum = encode_transaction(&sample());
        let err = d.decode(Some(&datum[..datum.len() / 2])).unwrap_err();
        assert_eq!(err.kind, ErrorKind::AvroDecode, "{err}");
        let mut wire = vec![0, 0, 0, 0, 42];
        wire.extend_from_slice(&datum);
        let err = d.decode(Some(&wire)).unwrap_err();
        assert_eq!(err.kind, ErrorKind::UnknownSchemaId);
        assert!(err.message.contains("42"));
        let mut trailing = datum.clone();
        trailing.push(7);
        assert_eq!(
            d.decode(Some(&trailing)).unwrap_err().kind,
            ErrorKind::AvroDecode
        );
        for bad in [f64::NAN, f64::INFINITY, -3.0] {
            let tx = Transaction {
                amount: bad,
                ..sample()
            };
            let err = d.decode(Some(&encode_transaction(&tx))).unwrap_err();
            assert_eq!(err.kind, ErrorKind::InvalidAmount, "{bad}");
        }
    }

    #[test]
    fn writer_schema_with_extra_field_resolves() {
        // A producer whose schema has one more field than ours, in a different position.
        let extended = TRANSACTION_AVSC.replacen(
            r#""fields": ["#,
            r#""fields": [{"name": "loyalty_tier", "type": "string"},"#,
            1,
        );
        let writer = Schema::parse_str(&extended).unwrap();
        let schemas = AvroSchemas::new(HashMap::from([(7, writer.clone())]));
        let Value::Record(mut fields) = apache_avro::from_avro_datum(
            transaction_schema(),
            &mut &encode_transaction(&sample())[..],
            None,
        )
        .unwrap() else {
            panic!("record")
        };
        fields.insert(0, ("loyalty_tier".into(), Value::String("gold".into())));
        let datum = apache_avro::to_avro_datum(&writer, Value::Record(fields)).unwrap();
        let mut wire = vec![0, 0, 0, 0, 7];
        wire.extend_from_slice(&datum);
        assert_eq!(schemas.decode_confluent(&wire).unwrap(), sample());
    }

    #[test]
    fn every_shipped_schema_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            Schema::parse_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
        assert_eq!(n, 5);
        verdict_schema();
    }
}
