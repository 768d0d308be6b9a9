//! Score, thresholds and rules → [`Verdict`], and the verdict's JSON and Avro encodings. Pure.
//!
//! The model's thresholds give `decline` at or above the decline threshold, `review` at or
//! above the review threshold, `approve` below; [`combine`] joins that with the rules that
//! fired ([`rules`]) into one decision.

pub mod rules;

use std::collections::{BTreeMap, HashMap};

use apache_avro::types::Value;
use serde::{Deserialize, Serialize};

use crate::decode::{verdict_schema, Transaction};

/// Ordered by severity: approve < review < decline < reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Approve,
    Review,
    Decline,
    /// The merchant is not enabled: refused without scoring.
    Reject,
}

impl Decision {
    pub const ALL: [Decision; 4] = [
        Decision::Approve,
        Decision::Review,
        Decision::Decline,
        Decision::Reject,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Approve => "approve",
            Decision::Review => "review",
            Decision::Decline => "decline",
            Decision::Reject => "reject",
        }
    }

    fn avro_index(self) -> u32 {
        self as u32
    }
}

/// One decision from the model's and the rules'.
///
/// Precedence: a transaction of a merchant that is not enabled is rejected before any of
/// this. Then, if the highest-priority rule that fired says `approve`, the transaction is
/// approved (an explicit allow overrides the model and lower rules). Otherwise the decision
/// is the most severe of the model's (by its thresholds) and of every `review` or `decline`
/// rule that fired. When the model could not score (`model` is `None`), `on_model_failure`
/// stands in for it.
pub fn combine(
    model: Option<Decision>,
    fired: &[Decision],
    on_model_failure: Decision,
) -> Decision {
    if fired.first() == Some(&Decision::Approve) {
        return Decision::Approve;
    }
    let mut d = model.unwrap_or(on_model_failure);
    for &a in fired {
        if a != Decision::Approve && a > d {
            d = a;
        }
    }
    d
}

/// What decides one scored transaction, for [`assemble`].
pub struct Facts<'a> {
    pub tx: &'a Transaction,
    pub scored_at: i64,
    pub model_version: &'a str,
    pub thresholds: &'a Thresholds,
    /// `None`: the model could not score (degraded); `degraded` says why.
    pub score: Option<f32>,
    pub degraded: Option<&'a Reason>,
    /// The rules that fired, highest priority first: their actions and reasons.
    pub fired: &'a [Decision],
    pub rule_reasons: Vec<Reason>,
    pub on_model_failure: Decision,
}

/// The verdict on a transaction of an enabled merchant: the decision by [`combine`], the
/// reasons of the rules that fired, then either why the model was not used or, for a
/// verdict that is not an approval, the model's own reasons (`explain`, asked only then:
/// they cost more than the score).
pub fn assemble(f: Facts<'_>, explain: impl FnOnce() -> Vec<Reason>) -> Verdict {
    let decision = combine(
        f.score.map(|s| f.thresholds.decide(s)),
        f.fired,
        f.on_model_failure,
    );
    let mut reasons = f.rule_reasons;
    match f.score {
        None => reasons.extend(f.degraded.cloned()),
        Some(_) if decision != Decision::Approve => reasons.extend(explain()),
        Some(_) => {}
    }
    let mut v = Verdict::new(
        f.tx,
        f.score.unwrap_or(-1.0),
        f.thresholds,
        f.model_version,
        f.scored_at,
    );
    v.decision = decision;
    v.degraded = f.score.is_none();
    v.reasons = reasons;
    v
}

/// Score thresholds from the model manifest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Scores at or above this (and below `decline`) are sent to review.
    pub review: f64,
    /// Scores at or above this are declined.
    pub decline: f64,
}

impl Thresholds {
    pub fn check(&self) -> Result<(), String> {
        let ok = |x: f64| x.is_finite() && (0.0..=1.0).contains(&x);
        if !ok(self.review) || !ok(self.decline) || self.review > self.decline {
            return Err(format!(
                "thresholds must satisfy 0 <= review <= decline <= 1, got review {} decline {}",
                self.review, self.decline
            ));
        }
        Ok(())
    }

    pub fn decide(&self, score: f32) -> Decision {
        let s = f64::from(score);
        if s >= self.decline {
            Decision::Decline
        } else if s >= self.review {
            Decision::Review
        } else {
            Decision::Approve
        }
    }
}

/// Why a verdict came out as it did: a stable code and a sentence for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    pub code: String,
    pub text: String,
}

/// fraudstream's answer for one transaction (`schemas/verdict.avsc`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub transaction_id: String,
    pub customer_id: String,
    pub score: f32,
    pub decision: Decision,
    pub model_version: String,
    /// RFC 3339 in JSON; epoch milliseconds in Avro.
    #[serde(with = "rfc3339_ms")]
    pub event_time: i64,
    /// When fraudstream decided: the only field that differs when a transaction is replayed.
    #[serde(with = "rfc3339_ms")]
    pub scored_at: i64,
    pub degraded: bool,
    pub reasons: Vec<Reason>,
    /// With `output.audit-features`: every feature value computed for this transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<BTreeMap<String, f32>>,
    /// With `model.shadow`: the challenger's score. It never changes `decision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowScore>,
}

/// What the shadow (challenger) model made of a transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowScore {
    pub model_version: String,
    pub score: f32,
    /// The decision the shadow's own thresholds would give: for comparing, never applied.
    pub decision: Decision,
}

impl Verdict {
    pub fn new(
        tx: &Transaction,
        score: f32,
        thresholds: &Thresholds,
        model_version: &str,
        scored_at: i64,
    ) -> Verdict {
        Verdict {
            transaction_id: tx.transaction_id.clone(),
            customer_id: tx.customer_id.clone(),
            score,
            decision: thresholds.decide(score),
            model_version: model_version.to_string(),
            event_time: tx.event_time_ms,
            scored_at,
            degraded: false,
            reasons: Vec::new(),
            features: None,
            shadow: None,
        }
    }

    /// The verdict on a transaction of a merchant that is not enabled: refused unscored
    /// (score -1, no model version).
    pub fn rejected(tx: &Transaction, scored_at: i64) -> Verdict {
        Verdict {
            transaction_id: tx.transaction_id.clone(),
            customer_id: tx.customer_id.clone(),
            score: -1.0,
            decision: Decision::Reject,
            model_version: String::new(),
            event_time: tx.event_time_ms,
            scored_at,
            degraded: false,
            reasons: vec![Reason {
                code: "merchant-not-enabled".into(),
                text: format!(
                    "Merchant {} is not enabled for scoring (decision.enabled-merchants).",
                    tx.merchant_id
                ),
            }],
            features: None,
            shadow: None,
        }
    }

    /// Appends the JSON encoding to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(out, self).expect("a Verdict always serializes");
    }

    /// Appends the Avro encoding to `out`: the Confluent wire format when `schema_id` is set,
    /// else a plain datum.
    pub fn write_avro(&self, schema_id: Option<u32>, out: &mut Vec<u8>) {
        if let Some(id) = schema_id {
            out.push(0);
            out.extend_from_slice(&id.to_be_bytes());
        }
        let value = Value::Record(vec![
            (
                "transaction_id".into(),
                Value::String(self.transaction_id.clone()),
            ),
            (
                "customer_id".into(),
                Value::String(self.customer_id.clone()),
            ),
            ("score".into(), Value::Double(f64::from(self.score))),
            (
                "decision".into(),
                Value::Enum(self.decision.avro_index(), self.decision.as_str().into()),
            ),
            (
                "model_version".into(),
                Value::String(self.model_version.clone()),
            ),
            ("event_time".into(), Value::TimestampMillis(self.event_time)),
            ("scored_at".into(), Value::TimestampMillis(self.scored_at)),
            ("degraded".into(), Value::Boolean(self.degraded)),
            (
                "reasons".into(),
                Value::Array(
                    self.reasons
                        .iter()
                        .map(|r| {
                            Value::Record(vec![
                                ("code".into(), Value::String(r.code.clone())),
                                ("text".into(), Value::String(r.text.clone())),
                            ])
                        })
                        .collect(),
                ),
            ),
            (
                "features".into(),
                match &self.features {
                    None => Value::Union(0, Box::new(Value::Null)),
                    Some(f) => Value::Union(
                        1,
                        Box::new(Value::Map(
                            f.iter()
                                .map(|(k, v)| (k.clone(), Value::Double(f64::from(*v))))
                                .collect::<HashMap<_, _>>(),
                        )),
                    ),
                },
            ),
            (
                "shadow".into(),
                match &self.shadow {
                    None => Value::Union(0, Box::new(Value::Null)),
                    Some(s) => Value::Union(
                        1,
                        Box::new(Value::Record(vec![
                            (
                                "model_version".into(),
                                Value::String(s.model_version.clone()),
                            ),
                            ("score".into(), Value::Double(f64::from(s.score))),
                            (
                                "decision".into(),
                                Value::Enum(s.decision.avro_index(), s.decision.as_str().into()),
                            ),
                        ])),
                    ),
                },
            ),
        ]);
        let datum = apache_avro::to_avro_datum(verdict_schema(), value)
            .expect("a Verdict value always matches its schema");
        out.extend_from_slice(&datum);
    }

    /// Decodes a plain Avro datum (tests and clients written in Rust).
    pub fn from_avro(bytes: &[u8]) -> Result<Verdict, String> {
        let value = apache_avro::from_avro_datum(verdict_schema(), &mut &bytes[..], None)
            .map_err(|e| e.to_string())?;
        apache_avro::from_value::<AvroVerdict>(&value)
            .map(Verdict::from)
            .map_err(|e| e.to_string())
    }
}

#[derive(Deserialize)]
struct AvroVerdict {
    transaction_id: String,
    customer_id: String,
    score: f64,
    decision: Decision,
    model_version: String,
    event_time: i64,
    scored_at: i64,
    degraded: bool,
    reasons: Vec<Reason>,
    features: Option<BTreeMap<String, f64>>,
    shadow: Option<AvroShadow>,
}

#[derive(Deserialize)]
struct AvroShadow {
    model_version: String,
    score: f64,
    decision: Decision,
}

impl From<AvroVerdict> for Verdict {
    fn from(a: AvroVerdict) -> Verdict {
        Verdict {
            transaction_id: a.transaction_id,
            customer_id: a.customer_id,
            score: a.score as f32,
            decision: a.decision,
            model_version: a.model_version,
            event_time: a.event_time,
            scored_at: a.scored_at,
            degraded: a.degraded,
            reasons: a.reasons,
            features: a
                .features
                .map(|f| f.into_iter().map(|(k, v)| (k, v as f32)).collect()),
            shadow: a.shadow.map(|s| ShadowScore {
                model_version: s.model_version,
                score: s.score as f32,
                decision: s.decision,
            }),
        }
    }
}

/// Epoch milliseconds as RFC 3339 text with millisecond precision, in UTC.
pub mod rfc3339_ms {
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn format(ms: i64) -> String {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let f = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        t.format(&f).unwrap_or_default()
    }

    pub fn serialize<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*ms))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        let text = String::deserialize(d)?;
        crate::decode::parse_rfc3339_ms(&text)
            .ok_or_else(|| de::Error::custom(format!("{text:?} is not RFC 3339")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        review: 0.2,
        decline: 0.8,
    };

    #[test]
    fn thresholds_are_inclusive_lower_bounds() {
        assert_eq!(T.decide(0.0), Decision::Approve);
        assert_eq!(T.decide(0.199), Decision::Approve);
        assert_eq!(T.decide(0.2), Decision::Review);
        assert_eq!(T.decide(0.79), Decision::Review);
        assert_eq!(T.decide(0.8), Decision::Decline);
        assert_eq!(T.decide(1.0), Decision::Decline);
    }

    #[test]
    fn assemble_explains_only_what_is_not_approved_and_says_why_without_the_model() {
        let tx = Transaction {
            transaction_id: "t".into(),
            customer_id: "c".into(),
            ..Transaction::default()
        };
        let rule = Reason {
            code: "r".into(),
            text: "rule".into(),
        };
        let model = || {
            vec![Reason {
                code: "feature:amount".into(),
                text: "x".into(),
            }]
        };
        let facts = |score, fired: &'static [Decision], degraded| Facts {
            tx: &tx,
            scored_at: 7,
            model_version: "m1",
            thresholds: &T,
            score,
            degraded,
            fired,
            rule_reasons: if fired.is_empty() {
                vec![]
            } else {
                vec![rule.clone()]
            },
            on_model_failure: Decision::Review,
        };
        let v = assemble(facts(Some(0.1), &[], None), || {
            panic!("approvals are not explained")
        });
        assert_eq!(
            (v.decision, v.degraded, v.reasons.len()),
            (Decision::Approve, false, 0)
        );
        let v = assemble(facts(Some(0.1), &[Decision::Decline], None), model);
        assert_eq!(v.decision, Decision::Decline);
        assert_eq!(
            v.reasons
                .iter()
                .map(|r| r.code.as_str())
                .collect::<Vec<_>>(),
            ["r", "feature:amount"]
        );
        assert_eq!(v.model_version, "m1");
        let why = Reason {
            code: "model-unavailable".into(),
            text: "down".into(),
        };
        let v = assemble(facts(None, &[], Some(&why)), || {
            panic!("no model, no model reasons")
        });
        assert_eq!(
            (v.decision, v.degraded, v.score),
            (Decision::Review, true, -1.0)
        );
        assert_eq!(v.reasons, vec![why.clone()]);
    }

    #[test]
    fn precedence_of_rules_and_model() {
        use Decision::*;
        // No rule: the model decides; without the model, the fallback.
        assert_eq!(combine(Some(Review), &[], Approve), Review);
        assert_eq!(combine(None, &[], Review), Review);
        // Review and decline rules only make a decision more severe.
        assert_eq!(combine(Some(Decline), &[Review], Approve), Decline);
        assert_eq!(combine(Some(Approve), &[Review], Approve), Review);
        assert_eq!(combine(Some(Review), &[Review, Decline], Approve), Decline);
        // An approve rule wins only from the top.
        assert_eq!(
            combine(Some(Decline), &[Approve, Decline], Approve),
            Approve
        );
        assert_eq!(
            combine(Some(Approve), &[Decline, Approve], Approve),
            Decline
        );
        assert_eq!(combine(Some(Review), &[Review, Approve], Approve), Review);
        // Degraded: rules alone, the fallback below them.
        assert_eq!(combine(None, &[Decline], Approve), Decline);
        assert_eq!(combine(None, &[Approve], Review), Approve);
    }

    #[test]
    fn thresholds_are_checked() {
        assert!(T.check().is_ok());
        for (review, decline) in [(0.9, 0.1), (-0.1, 0.5), (0.1, 1.5), (f64::NAN, 0.5)] {
            assert!(Thresholds { review, decline }.check().is_err());
        }
    }

    fn verdict() -> Verdict {
        let tx = Transaction {
            transaction_id: "t1".into(),
            customer_id: "c1".into(),
            event_time_ms: 1_795_341_600_250,
            ..Transaction::default()
        };
        Verdict::new(&tx, 0.5, &T, "m-1", 1_795_341_600_300)
    }

    #[test]
    fn json_shape() {
        let mut out = Vec::new();
        verdict().write_json(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["decision"], "review");
        assert_eq!(v["event_time"], "2026-11-22T10:00:00.250Z");
        assert_eq!(v["scored_at"], "2026-11-22T10:00:00.300Z");
        assert_eq!(v["degraded"], false);
        assert_eq!(v["reasons"], serde_json::json!([]));
        let back: Verdict = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, verdict());
    }

    #[test]
    fn avro_round_trip() {
        let mut v = verdict();
        v.features = Some(BTreeMap::from([
            ("amount".to_string(), 12.5f32),
            ("new_card".to_string(), 1.0),
        ]));
        v.reasons.push(Reason {
            code: "x".into(),
            text: "y".into(),
        });
        v.shadow = Some(ShadowScore {
            model_version: "m-2".into(),
            score: 0.25,
            decision: Decision::Approve,
        });
        let mut out = Vec::new();
        v.write_avro(None, &mut out);
        assert_eq!(Verdict::from_avro(&out).unwrap(), v);
        let mut wire = Vec::new();
        v.write_avro(Some(9), &mut wire);
        assert_eq!(&wire[..5], &[0, 0, 0, 0, 9]);
        // (Avro maps have no fixed order, so compare values, not bytes.)
        assert_eq!(Verdict::from_avro(&wire[5..]).unwrap(), v);
    }
}
