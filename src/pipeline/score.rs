//! Scoring a partition's rows: the primary model (through its [`Runner`], which enforces
//! `decision.latency-budget-ms`) and the shadow model, under the one budget. The shadow
//! scores in what is left of the budget after the primary; a batch with none left goes out
//! without shadow scores (counted), so a challenger never slows verdicts down.
//!
//! Never fails: a primary that cannot score yields the reason its verdicts carry (degraded).

use std::time::{Duration, Instant};

use crate::decision::Reason;
use crate::model::runner::{Runner, Unscored};
use crate::model::{Manifest, Model};
use crate::telemetry;

pub struct Scoring {
    pub runner: Runner,
    /// The challenger (`model.shadow`): scores, never decides.
    pub shadow: Option<Model>,
    budget: Option<Duration>,
    /// Since when batches have been decided without the model (logged at the transitions).
    unscored_since: Option<Instant>,
    shadow_scores: Vec<f32>,
}

/// The scores of one partition's rows.
pub struct Scored<'a> {
    /// One score per row, or the reason every verdict carries without them.
    pub primary: Result<Vec<f32>, Reason>,
    /// The shadow's manifest and one score per shadow row, when it scored.
    pub shadow: Option<(&'a Manifest, &'a [f32])>,
}

impl Scoring {
    pub fn new(runner: Runner, shadow: Option<Model>, budget: Option<Duration>) -> Scoring {
        Scoring {
            runner,
            shadow,
            budget,
            unscored_since: None,
            shadow_scores: Vec::new(),
        }
    }

    /// Scores `n` rows of `rows` (the buffer is handed to the runner and back) and the
    /// shadow's `shadow_rows`.
    pub fn score(&mut self, rows: &mut Vec<f32>, n: usize, shadow_rows: &[f32]) -> Scored<'_> {
        let started = Instant::now();
        let outcome = if n == 0 {
            Ok(Vec::new())
        } else {
            match self.runner.score(std::mem::take(rows)) {
                Ok((back, scores)) => {
                    *rows = back;
                    Ok(scores)
                }
                Err(u) => Err(u),
            }
        };
        metrics::histogram!(telemetry::SCORING_DURATION).record(started.elapsed().as_secs_f64());
        metrics::histogram!(telemetry::SCORING_BATCH_ROWS).record(n as f64);
        let primary = match outcome {
            Ok(scores) => {
                if let Some(since) = self.unscored_since.take() {
                    tracing::info!(
                        after_seconds = since.elapsed().as_secs_f64(),
                        "The model scores again."
                    );
                }
                Ok(scores)
            }
            Err(Unscored { cause, message }) => {
                if self.unscored_since.is_none() {
                    self.unscored_since = Some(Instant::now());
                    tracing::warn!(cause = cause.as_str(), error = %message, "The model cannot score; deciding by rules alone (degraded).");
                }
                metrics::counter!(telemetry::DEGRADED, "cause" => cause.as_str())
                    .increment(n as u64);
                Err(Reason {
                    code: "model-unavailable".into(),
                    text: format!("The model could not score ({message}); decided by rules alone."),
                })
            }
        };
        let in_budget = self.budget.is_none_or(|b| started.elapsed() < b);
        let shadow = match &mut self.shadow {
            Some(m) if n > 0 && in_budget => {
                match m.score_rows(shadow_rows, &mut self.shadow_scores) {
                    Ok(()) => Some((&m.manifest, self.shadow_scores.as_slice())),
                    Err(e) => {
                        tracing::warn!(error = %e, model_version = %m.manifest.model_version, "Shadow model failed; verdicts go out without its score.");
                        metrics::counter!(telemetry::SHADOW_ERRORS).increment(n as u64);
                        None
                    }
                }
            }
            Some(_) if n > 0 => {
                metrics::counter!(telemetry::SHADOW_ERRORS).increment(n as u64);
                None
            }
            _ => None,
        };
        Scored { primary, shadow }
    }
}
