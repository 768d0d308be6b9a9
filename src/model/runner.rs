//! The primary model on a thread of its own, so that a batch it cannot score in time (or at
//! all) is decided without it and the partition never stalls.
//!
//! The pipeline hands over a batch's rows and waits at most `decision.latency-budget-ms`. A
//! batch past the budget is decided by rules alone; its late answer is collected and thrown
//! away before the next batch is sent, and until it arrives further batches are decided
//! without the model too (`busy`). A scoring error degrades that batch only.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::Model;

/// Why a batch was decided without the model; the `cause` label of
/// `fraudstream_degraded_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Error,
    LatencyBudget,
    Busy,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Error => "error",
            Cause::LatencyBudget => "latency-budget",
            Cause::Busy => "busy",
        }
    }
}

/// A batch the model did not score, and why.
#[derive(Debug, Clone)]
pub struct Unscored {
    pub cause: Cause,
    pub message: String,
}

enum Job {
    Score(u64, Vec<f32>),
    Swap(Box<Model>),
}

struct Done {
    id: u64,
    rows: Vec<f32>,
    scores: Result<Vec<f32>, String>,
}

pub struct Runner {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Done>,
    /// The job still running past its budget.
    late: Option<u64>,
    next: u64,
    budget: Option<Duration>,
}

impl Runner {
    /// Starts the thread with `model`; `budget` of `None` waits as long as scoring takes.
    pub fn start(model: Model, budget: Option<Duration>) -> std::io::Result<Runner> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (outbox, done) = mpsc::channel::<Done>();
        std::thread::Builder::new()
            .name("model".into())
            .spawn(move || {
                let mut model = model;
                let mut scores = Vec::new();
                while let Ok(job) = inbox.recv() {
                    match job {
                        Job::Score(id, rows) => {
                            let scores = model
                                .score_rows(&rows, &mut scores)
                                .map(|()| scores.clone())
                                .map_err(|e| e.to_string());
                            if outbox.send(Done { id, rows, scores }).is_err() {
                                return;
                            }
                        }
                        Job::Swap(m) => model = *m,
                    }
                }
            })?;
        Ok(Runner {
            jobs,
            done,
            late: None,
            next: 0,
            budget,
        })
    }

    /// Puts `model` in service for the batches sent after this call.
    pub fn swap(&mut self, model: Model) {
        // A send fails only once the thread has stopped; `score` then reports it.
        let _ = self.jobs.send(Job::Swap(Box::new(model)));
    }

    /// Scores `rows`: the rows back and one score per row, or why not.
    pub fn score(&mut self, rows: Vec<f32>) -> Result<(Vec<f32>, Vec<f32>), Unscored> {
        let unscored = |cause, message: String| Unscored { cause, message };
        if let Some(late) = self.late {
            while let Ok(d) = self.done.try_recv() {
                if d.id == late {
                    self.late = None;
                }
            }
            if self.late.is_some() {
                return Err(unscored(
                    Cause::Busy,
                    "the model is still on an earlier batch that ran past the latency budget"
                        .into(),
                ));
            }
        }
        let id = self.next;
        self.next += 1;
        if self.jobs.send(Job::Score(id, rows)).is_err() {
            return Err(unscored(
                Cause::Error,
                "the model thread has stopped".into(),
            ));
        }
        let deadline = self.budget.map(|b| (b, Instant::now() + b));
        loop {
            let answer = match deadline {
                Some((_, at)) => self
                    .done
                    .recv_timeout(at.saturating_duration_since(Instant::now())),
                None => self.done.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match answer {
                Ok(d) if d.id == id => {
                    return d
                        .scores
                        .map(|s| (d.rows, s))
                        .map_err(|e| unscored(Cause::Error, e))
                }
                // The late answer to an earlier batch.
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    self.late = Some(id);
                    let budget = deadline.map_or(0, |(b, _)| b.as_millis());
                    return Err(unscored(
                        Cause::LatencyBudget,
                        format!("the model took longer than the latency budget of {budget} ms"),
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(unscored(
                        Cause::Error,
                        "the model thread has stopped".into(),
                    ))
                }
            }
        }
    }
}
