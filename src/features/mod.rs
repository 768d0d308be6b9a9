//! The feature registry: named features, each a pure function of the transaction, and the
//! row a model reads, built in the order its manifest lists.
//!
//! A model's manifest names its features; [`FeatureSet::resolve`] turns those names into
//! extractors once at start, so an unknown name is a startup error, never a silent zero.
//! This first registry holds the stateless features; per-entity state comes later.

use crate::decode::{Requirements, Transaction};

/// Bumped whenever a feature's definition changes meaning; manifests record it.
pub const REGISTRY_VERSION: u32 = 1;

/// One feature the registry knows how to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// `features[i]`: element `i` of the transaction's precomputed vector.
    Passthrough(usize),
    /// `amount`
    Amount,
    /// `log_amount`: ln(1 + amount).
    LogAmount,
    /// `hour_of_day`: 0–23, UTC, from the event time.
    HourOfDay,
    /// `day_of_week`: 0 = Monday … 6 = Sunday, UTC, from the event time.
    DayOfWeek,
}

/// The names of the named (non-passthrough) features, for error messages and docs.
pub const NAMED: [(&str, Feature); 4] = [
    ("amount", Feature::Amount),
    ("log_amount", Feature::LogAmount),
    ("hour_of_day", Feature::HourOfDay),
    ("day_of_week", Feature::DayOfWeek),
];

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "unknown feature `{name}` (position {position} in the manifest); known: features[N], {known}"
)]
pub struct UnknownFeature {
    pub name: String,
    pub position: usize,
    pub known: String,
}

/// A model's input row layout.
#[derive(Debug, Clone)]
pub struct FeatureSet {
    features: Vec<Feature>,
}

impl FeatureSet {
    /// Resolves manifest names; the first unknown name is the error.
    pub fn resolve<S: AsRef<str>>(names: &[S]) -> Result<FeatureSet, UnknownFeature> {
        let mut features = Vec::with_capacity(names.len());
        for (position, name) in names.iter().enumerate() {
            let name = name.as_ref();
            let f = parse_passthrough(name)
                .map(Feature::Passthrough)
                .or_else(|| NAMED.iter().find(|(n, _)| *n == name).map(|(_, f)| *f))
                .ok_or_else(|| UnknownFeature {
                    name: name.to_string(),
                    position,
                    known: NAMED.map(|(n, _)| n).join(", "),
                })?;
            features.push(f);
        }
        Ok(FeatureSet { features })
    }

    pub fn len(&self) -> usize {
        self.features.len()
    }

    pub fn is_empty(&self) -> bool {
        self.features.is_empty()
    }

    /// What every transaction must carry for these features to be computed.
    pub fn requirements(&self) -> Requirements {
        let passthrough_len = self
            .features
            .iter()
            .filter_map(|f| match f {
                Feature::Passthrough(i) => Some(i + 1),
                _ => None,
            })
            .max();
        Requirements { passthrough_len }
    }

    /// Appends this transaction's row to `out`. The transaction has passed
    /// [`crate::decode::validate`] with [`Self::requirements`], so every passthrough index
    /// exists.
    pub fn extend_row(&self, tx: &Transaction, out: &mut Vec<f32>) {
        for f in &self.features {
            let v = match *f {
                Feature::Passthrough(i) => tx
                    .features
                    .as_ref()
                    .and_then(|v| v.get(i))
                    .copied()
                    .unwrap_or(f64::NAN),
                Feature::Amount => tx.amount,
                Feature::LogAmount => tx.amount.ln_1p(),
                Feature::HourOfDay => (tx.event_time_ms.div_euclid(3_600_000) % 24) as f64,
                Feature::DayOfWeek => {
                    // 1970-01-01 was a Thursday (3 when Monday is 0).
                    ((tx.event_time_ms.div_euclid(86_400_000) + 3) % 7) as f64
                }
            };
            out.push(v as f32);
        }
    }
}

fn parse_passthrough(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("features[")?.strip_suffix(']')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_and_requirements() {
        let fs = FeatureSet::resolve(&["features[2]", "amount", "features[0]"]).unwrap();
        assert_eq!(fs.len(), 3);
        assert_eq!(fs.requirements().passthrough_len, Some(3));
        let fs = FeatureSet::resolve(&["amount", "hour_of_day"]).unwrap();
        assert_eq!(fs.requirements().passthrough_len, None);
    }

    #[test]
    fn unknown_feature_names_the_first_offender() {
        let err = FeatureSet::resolve(&["amount", "velocity_1h", "also_bad"]).unwrap_err();
        assert_eq!(err.name, "velocity_1h");
        assert_eq!(err.position, 1);
        assert!(err.to_string().contains("velocity_1h"));
        for bad in ["features[]", "features[-1]", "features[1", "features[x]"] {
            assert!(FeatureSet::resolve(&[bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn row_values_use_event_time() {
        let fs = FeatureSet::resolve(&[
            "features[1]",
            "amount",
            "log_amount",
            "hour_of_day",
            "day_of_week",
        ])
        .unwrap();
        let tx = Transaction {
            amount: 100.0,
            // 2026-11-22T10:00:00.250Z, a Sunday.
            event_time_ms: 1_795_341_600_250,
            features: Some(vec![7.0, 8.5]),
            ..Transaction::default()
        };
        let mut row = Vec::new();
        fs.extend_row(&tx, &mut row);
        assert_eq!(row, vec![8.5, 100.0, 101f64.ln() as f32, 10.0, 6.0]);
    }
}
