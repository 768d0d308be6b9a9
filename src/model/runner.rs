//! Runs the primary model for the pipeline, so that a batch it cannot score in time (or at
//! all) is decided without it and the partition never stalls.
//!
//! With `decision.latency-budget-ms` set, the model runs on a thread of its own: the pipeline
//! hands over a batch's rows and waits at most the budget. A batch past the budget is decided
//! by rules alone; its late answer is collected and thrown away before the next batch is sent,
//! and until it arrives further batches are decided without the model too (`busy`). Without a
//! budget the model runs on the pipeline's thread (two thread wake-ups a batch cost more
//! latency than they save on a loaded machine; bench/RESULTS.md). Either way a scoring error
//! degrades that batch only.

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
    pub const ALL: [Cause; 3] = [Cause::Error, Cause::LatencyBudget, Cause::Busy];

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

pub enum Runner {
    /// No budget: scores on the caller's thread.
    Inline(Box<Model>, Vec<f32>),
    Threaded(Threaded),
}

pub struct Threaded {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Done>,
    /// The job still running past its budget.
    late: Option<u64>,
    next: u64,
    budget: Duration,
}

impl Runner {
    /// With a `budget`, starts the model's thread; without, scores inline.
    pub fn start(model: Model, budget: Option<Duration>) -> std::io::Result<Runner> {
        match budget {
            None => Ok(Runner::Inline(Box::new(model), Vec::new())),
            Some(b) => Threaded::start(model, b).map(Runner::Threaded),
        }
    }

    /// Puts `model` in service for the batches scored after this call.
    pub fn swap(&mut self, model: Model) {
        match self {
            Runner::Inline(m, _) => **m = model,
            Runner::Threaded(t) => t.swap(model),
        }
    }

    /// Scores `rows`: the rows back and one score per row, or why not.
    pub fn score(&mut self, rows: Vec<f32>) -> Result<(Vec<f32>, Vec<f32>), Unscored> {
        match self {
            Runner::Inline(m, scores) => match m.score_rows(&rows, scores) {
                Ok(()) => Ok((rows, scores.clone())),
                Err(e) => Err(Unscored {
                    cause: Cause::Error,
                    message: e.to_string(),
                }),
            },
            Runner::Threaded(t) => t.score(rows),
        }
    }
}

impl Threaded {
    fn start(model: Model, budget: Duration) -> std::io::Result<Threaded> {
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
        Ok(Threaded {
            jobs,
            done,
            late: None,
            next: 0,
            budget,
        })
    }

    fn swap(&mut self, model: Model) {
        // A send fails only once the thread has stopped; `score` then reports it.
        let _ = self.jobs.send(Job::Swap(Box::new(model)));
    }

    fn score(&mut self, rows: Vec<f32>) -> Result<(Vec<f32>, Vec<f32>), Unscored> {
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
        let deadline = Instant::now() + self.budget;
        loop {
            let answer = self
                .done
                .recv_timeout(deadline.saturating_duration_since(Instant::now()));
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
                    let budget = self.budget.as_millis();
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
