//! Hot reload: a watcher thread that loads and checks a new model (or rules file) off the
//! scoring path, and a slot the pipeline takes it from between two batches.
//!
//! A reload starts when the manifest or the ONNX file it names changes on disk (polled every
//! `model.watch-interval-ms`, and loaded once the files have stopped changing for one
//! interval), on SIGHUP, or on `POST /admin/reload-model`. The new model goes through exactly
//! the checks of a start ([`Model::load`]); a model that fails them is refused, logged and
//! counted, and the one in service keeps scoring. A checked model waits in the slot until the
//! pipeline finishes its current batch: every batch is scored by one model, and each verdict
//! names it. With several workers (`processing.workers`), each gets a copy of its own (an
//! ONNX Runtime session serves one caller at a time), loaded and checked by the watcher, and
//! takes it at its own next batch boundary: for that moment the partitions of different
//! workers are scored by different models (each verdict names its own; per partition the
//! order holds). The guarantee and its limit: no transaction is dropped or scored twice by a
//! swap, but a batch re-delivered after a crash is scored by whichever model is in service
//! then.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::{Manifest, Model};
use crate::decision::rules::RuleSet;
use crate::telemetry;

/// Which model a reload concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Decides.
    Primary,
    /// Scores alongside, never decides (`model.shadow`).
    Shadow,
    /// The rules file (`decision.rules`).
    Rules,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Shadow => "shadow",
            Role::Rules => "rules",
        }
    }
}

/// Models checked by the watcher, waiting for the pipeline's next batch boundary.
#[derive(Default)]
pub struct Candidates {
    pub primary: Option<Model>,
    pub shadow: Option<Model>,
    pub rules: Option<RuleSet>,
}

/// Shared between the watcher thread, the pipeline's workers and the HTTP endpoint.
#[derive(Clone)]
pub struct ReloadHandle(Arc<Shared>);

struct Shared {
    /// Reloads asked for (SIGHUP, endpoint); the watcher serves up to this number.
    requested: AtomicU64,
    /// The last request served, and what came of it (for the endpoint's answer).
    served: Mutex<(u64, Option<Result<String, String>>)>,
    /// Checked models each worker has not taken yet.
    pending: Vec<Mutex<Candidates>>,
}

impl Default for ReloadHandle {
    fn default() -> Self {
        ReloadHandle::new(1)
    }
}

impl telemetry::Admin for ReloadHandle {
    fn reload(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + '_>>
    {
        Box::pin(self.request_and_wait(Duration::from_secs(60)))
    }
}

impl ReloadHandle {
    /// A handle for `workers` workers, each taking its own copy of a reloaded model.
    pub fn new(workers: usize) -> ReloadHandle {
        ReloadHandle(Arc::new(Shared {
            requested: AtomicU64::new(0),
            served: Mutex::new((0, None)),
            pending: (0..workers.max(1)).map(|_| Mutex::default()).collect(),
        }))
    }

    fn workers(&self) -> usize {
        self.0.pending.len()
    }

    /// Asks the watcher to reload every configured model now.
    pub fn request(&self) -> u64 {
        self.0.requested.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Asks for a reload and waits (up to `timeout`) for its outcome: `Ok(summary)` when
    /// every model loaded and passed its checks, `Err(reason)` when one was refused.
    pub async fn request_and_wait(&self, timeout: Duration) -> Result<String, String> {
        let ticket = self.request();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(served) = self.0.served.lock() {
                if let (n, Some(outcome)) = &*served {
                    if *n >= ticket {
                        return outcome.clone();
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err("no answer from the model watcher in time".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The models checked for `worker` since its last call, if any.
    pub fn take(&self, worker: usize) -> Option<Candidates> {
        let mut pending = self.0.pending.get(worker)?.lock().ok()?;
        if pending.primary.is_none() && pending.shadow.is_none() && pending.rules.is_none() {
            return None;
        }
        Some(std::mem::take(&mut *pending))
    }

    /// Hands one copy to each worker.
    fn offer(&self, copies: Vec<Loaded>) {
        for (slot, loaded) in self.0.pending.iter().zip(copies) {
            if let Ok(mut pending) = slot.lock() {
                match loaded {
                    Loaded::Model(Role::Shadow, m) => pending.shadow = Some(*m),
                    Loaded::Model(_, m) => pending.primary = Some(*m),
                    Loaded::Rules(r) => pending.rules = Some(r),
                }
            }
        }
    }
}

enum Loaded {
    Model(Role, Box<Model>),
    Rules(RuleSet),
}

/// What identifies the files of a model on disk: (path, modified, length) of the manifest
/// and of the files it names (or of the rules file).
type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

fn fingerprint(role: Role, manifest: &Path) -> Fingerprint {
    let stat = |p: &Path| {
        let m = std::fs::metadata(p).ok();
        (
            p.to_path_buf(),
            m.as_ref().and_then(|m| m.modified().ok()),
            m.map_or(0, |m| m.len()),
        )
    };
    let mut files = vec![stat(manifest)];
    if role == Role::Rules {
        return files;
    }
    if let Ok(m) = Manifest::read(manifest) {
        files.push(stat(&m.onnx_path(manifest)));
        if let Some(e) = &m.explain {
            files.push(stat(&manifest.parent().unwrap_or(Path::new(".")).join(e)));
        }
    }
    files
}

/// One watched model file set.
struct Watched {
    role: Role,
    manifest: PathBuf,
    /// The files as last loaded (or refused): a change from these starts a reload.
    loaded: Fingerprint,
    /// The files at the previous look: a reload waits until they stop changing.
    seen: Fingerprint,
}

/// Starts the watcher thread. `models` are (role, manifest or rules path) of what is in service;
/// `interval` of zero turns file watching off (SIGHUP and the endpoint still work).
pub fn start(
    env: &'static ort::environment::Environment,
    models: Vec<(Role, PathBuf)>,
    interval: Duration,
    handle: ReloadHandle,
    shutdown: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    for (role, _) in &models {
        for result in ["loaded", "refused"] {
            metrics::counter!(telemetry::RELOADS, "target" => role.as_str(), "result" => result)
                .increment(0);
        }
    }
    let mut watched: Vec<Watched> = models
        .into_iter()
        .map(|(role, manifest)| {
            let f = fingerprint(role, &manifest);
            Watched {
                role,
                manifest,
                loaded: f.clone(),
                seen: f,
            }
        })
        .collect();
    std::thread::Builder::new()
        .name("model-watch".into())
        .spawn(move || {
            let tick = Duration::from_millis(50);
            let mut since_look = Duration::ZERO;
            let mut served = 0u64;
            while !shutdown.is_cancelled() {
                std::thread::sleep(tick);
                since_look += tick;
                let requested = handle.0.requested.load(Ordering::SeqCst);
                if requested > served {
                    served = requested;
                    let mut outcome = Ok(Vec::new());
                    for w in &mut watched {
                        let f = fingerprint(w.role, &w.manifest);
                        w.loaded = f.clone();
                        w.seen = f;
                        match load(env, w, &handle) {
                            Ok(version) => {
                                if let Ok(v) = &mut outcome {
                                    v.push(format!("{} {version}", w.role.as_str()));
                                }
                            }
                            Err(e) => {
                                if outcome.is_ok() {
                                    outcome = Err(e);
                                }
                            }
                        }
                    }
                    if let Ok(mut s) = handle.0.served.lock() {
                        *s = (
                            served,
                            Some(outcome.map(|v| format!("loaded {}", v.join(", ")))),
                        );
                    }
                    continue;
                }
                if interval.is_zero() || since_look < interval {
                    continue;
                }
                since_look = Duration::ZERO;
                for w in &mut watched {
                    let now = fingerprint(w.role, &w.manifest);
                    let stable = now == w.seen;
                    w.seen = now.clone();
                    if stable && now != w.loaded {
                        w.loaded = now;
                        // Refusals are logged and counted inside.
                        let _ = load(env, w, &handle);
                    }
                }
            }
        })
}

/// Loads and checks one model (or the rules); what passes waits in the slot for the pipeline.
fn load(
    env: &'static ort::environment::Environment,
    w: &Watched,
    handle: &ReloadHandle,
) -> Result<String, String> {
    let role = w.role.as_str();
    let copies: Result<Vec<Loaded>, String> = match w.role {
        Role::Rules => RuleSet::load(&w.manifest)
            .map(|r| {
                (0..handle.workers())
                    .map(|_| Loaded::Rules(r.clone()))
                    .collect()
            })
            .map_err(|e| e.to_string()),
        r => (0..handle.workers())
            .map(|_| {
                Model::load(env, &w.manifest)
                    .map(|m| Loaded::Model(r, Box::new(m)))
                    .map_err(|e| e.to_string())
            })
            .collect(),
    };
    match copies {
        Ok(copies) => {
            let version = match &copies[0] {
                Loaded::Model(_, m) => m.manifest.model_version.clone(),
                Loaded::Rules(r) => r.version.clone(),
            };
            tracing::info!(
                target_of_reload = role,
                version = %version,
                "Reload checked; it applies from the next batch."
            );
            metrics::counter!(telemetry::RELOADS, "target" => role, "result" => "loaded")
                .increment(1);
            handle.offer(copies);
            Ok(version)
        }
        Err(e) => {
            tracing::error!(target_of_reload = role, error = %e, "Reload refused; what is in service keeps deciding.");
            metrics::counter!(telemetry::RELOADS, "target" => role, "result" => "refused")
                .increment(1);
            Err(format!("{role} refused: {e}"))
        }
    }
}
