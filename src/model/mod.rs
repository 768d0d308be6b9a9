//! The model: a manifest (JSON) that names an ONNX file, its ordered feature names and its
//! decision thresholds, and an ONNX Runtime session that scores micro-batches of rows.
//!
//! Loading checks the manifest against the feature registry and the ONNX input shape, so a
//! model that would read the wrong columns never starts. `Session::run` needs `&mut self`,
//! so each scoring worker owns its own [`Model`]. [`reload`] swaps in a new one while running.

pub mod explain;
pub mod reload;
pub mod runner;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{TensorRef, ValueType};
use serde::Deserialize;

use crate::decision::Thresholds;
use crate::features::FeatureSet;

/// What went wrong with the model. Loading errors are fatal (fix the files and restart);
/// a scoring error is fatal for now: nothing is committed, so a restart rescores the batch.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("ONNX Runtime library not found: set ORT_DYLIB_PATH or model.onnxruntime-library (scripts/setup installs it from the onnxruntime wheel)")]
    NoRuntime,
    #[error("cannot load ONNX Runtime from {path}: {message}")]
    Runtime { path: PathBuf, message: String },
    #[error("cannot read model manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("model manifest {path}: {message}")]
    Mismatch { path: PathBuf, message: String },
    #[error("cannot load ONNX model {path}: {message}")]
    Onnx { path: PathBuf, message: String },
    #[error("scoring failed: {0}")]
    Score(String),
}

/// The manifest written by `scripts/train`. Extra keys (metrics, training details) are kept
/// in the file for people and ignored here.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// Named in every verdict this model scores.
    pub model_version: String,
    /// The ONNX file, relative to the manifest's folder.
    pub onnx: PathBuf,
    /// SHA-256 of the ONNX file, hex; when present the file must match it (a manifest
    /// replaced before its ONNX file, or a truncated copy, is refused).
    #[serde(default)]
    pub onnx_sha256: Option<String>,
    /// Name of the ONNX input tensor (float, [N, features]).
    pub input: String,
    /// Name of the ONNX output tensor holding class probabilities.
    pub output: String,
    /// Column of `output` that is the fraud probability.
    pub output_column: usize,
    /// Ordered feature names, as in the registry.
    pub features: Vec<String>,
    /// Trees of the ONNX model with node values (`scripts/py/export_trees.py`), relative to
    /// the manifest's folder: per-transaction contributions for the verdict's reasons.
    #[serde(default)]
    pub explain: Option<PathBuf>,
    #[serde(default)]
    pub explain_sha256: Option<String>,
    /// The feature registry version the training table was computed with; required when
    /// the model reads any named (stateful or derived) feature.
    #[serde(default)]
    pub registry_version: Option<u32>,
    pub thresholds: Thresholds,
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Manifest, ModelError> {
        let err = |message: String| ModelError::Manifest {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        m.thresholds.check().map_err(err)?;
        Ok(m)
    }

    /// The ONNX file: `onnx` resolved against the manifest's folder.
    pub fn onnx_path(&self, manifest_path: &Path) -> PathBuf {
        manifest_path
            .parent()
            .unwrap_or(Path::new("."))
            .join(&self.onnx)
    }
}

/// `Err` when `want` is given and is not the SHA-256 of `bytes`.
fn check_sha256(path: &Path, bytes: &[u8], want: Option<&str>) -> Result<(), String> {
    use sha2::Digest;
    let Some(want) = want else { return Ok(()) };
    let got: String = sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got.eq_ignore_ascii_case(want) {
        Ok(())
    } else {
        Err(format!(
            "{} has SHA-256 {got}, the manifest expects {want} (a half-copied model, or the manifest of another one)",
            path.display()
        ))
    }
}

/// Loads the ONNX Runtime shared library once per process.
pub fn init_runtime(
    library: Option<&Path>,
) -> Result<&'static ort::environment::Environment, ModelError> {
    static ENV: OnceLock<ort::environment::Environment> = OnceLock::new();
    if let Some(env) = ENV.get() {
        return Ok(env);
    }
    let path = library.ok_or(ModelError::NoRuntime)?;
    let runtime_err = |message: String| ModelError::Runtime {
        path: path.to_path_buf(),
        message,
    };
    if !path.exists() {
        return Err(runtime_err("no such file".into()));
    }
    let env = ort::init_from(path)
        .map_err(|e| runtime_err(e.to_string()))?
        .with_name("fraudstream")
        .with_telemetry(false)
        .build()
        .map_err(|e| runtime_err(e.to_string()))?;
    Ok(ENV.get_or_init(|| env))
}

/// A model without its session: what the pipeline reads while [`runner`] scores.
#[derive(Debug, Clone)]
pub struct ModelView {
    pub manifest: Manifest,
    pub features: FeatureSet,
    pub explainer: Option<explain::Explainer>,
}

/// A loaded, checked model with its own ONNX Runtime session.
pub struct Model {
    pub manifest: Manifest,
    pub features: FeatureSet,
    /// With `explain` in the manifest: the same trees, evaluated natively for contributions.
    pub explainer: Option<explain::Explainer>,
    session: Session,
    /// Reused input buffer: one row per transaction, `features.len()` columns.
    rows: Vec<f32>,
}

impl Model {
    /// Reads the manifest, resolves its features against the registry, opens the ONNX file
    /// and checks its input and output against the manifest.
    pub fn load(
        env: &ort::environment::Environment,
        manifest_path: &Path,
    ) -> Result<Model, ModelError> {
        let manifest = Manifest::read(manifest_path)?;
        let mismatch = |message: String| ModelError::Mismatch {
            path: manifest_path.to_path_buf(),
            message,
        };
        let features =
            FeatureSet::resolve(&manifest.features).map_err(|e| mismatch(e.to_string()))?;
        let named = manifest
            .features
            .iter()
            .find(|f| !f.starts_with("features["));
        if let Some(first) = named {
            match manifest.registry_version {
                Some(v) if v == crate::features::REGISTRY_VERSION => {}
                v => {
                    return Err(mismatch(format!(
                        "the model was trained on feature registry version {}, this scorer computes version {} (first named feature: `{first}`); retrain it with `fraudstream replay` from this version",
                        v.map_or("(none)".to_string(), |v| v.to_string()),
                        crate::features::REGISTRY_VERSION
                    )))
                }
            }
        }
        let onnx_path = manifest.onnx_path(manifest_path);
        let onnx_err = |message: String| ModelError::Onnx {
            path: onnx_path.clone(),
            message,
        };
        let e = |e: &dyn std::fmt::Display| onnx_err(e.to_string());
        let bytes = std::fs::read(&onnx_path).map_err(|x| e(&x))?;
        check_sha256(&onnx_path, &bytes, manifest.onnx_sha256.as_deref()).map_err(mismatch)?;
        let session = Session::builder(env)
            .map_err(|x| e(&x))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|x| e(&x))?
            .with_intra_threads(1)
            .map_err(|x| e(&x))?
            .with_inter_threads(1)
            .map_err(|x| e(&x))?
            .commit_from_memory(&bytes)
            .map_err(|x| e(&x))?;

        let input = session
            .inputs()
            .iter()
            .find(|i| i.name() == manifest.input)
            .ok_or_else(|| mismatch(format!("the ONNX model has no input `{}`", manifest.input)))?;
        match *input.dtype() {
            ValueType::Tensor { ty, ref shape, .. } => {
                if ty != ort::value::TensorElementType::Float32 {
                    return Err(mismatch(format!(
                        "input `{}` is {ty:?}, expected float32",
                        manifest.input
                    )));
                }
                let width = shape.last().copied().unwrap_or(-1);
                if shape.len() != 2 || (width >= 0 && width as usize != features.len()) {
                    return Err(mismatch(format!(
                        "input `{}` has shape {:?}, but the manifest lists {} features",
                        manifest.input,
                        &shape[..],
                        features.len()
                    )));
                }
            }
            ref other => {
                return Err(mismatch(format!(
                    "input `{}` is {other:?}, not a tensor",
                    manifest.input
                )))
            }
        }
        if !session
            .outputs()
            .iter()
            .any(|o| o.name() == manifest.output)
        {
            return Err(mismatch(format!(
                "the ONNX model has no output `{}`",
                manifest.output
            )));
        }
        let explainer = match &manifest.explain {
            Some(file) => {
                let path = manifest_path.parent().unwrap_or(Path::new(".")).join(file);
                let text = std::fs::read(&path)
                    .map_err(|x| mismatch(format!("{}: {x}", path.display())))?;
                check_sha256(&path, &text, manifest.explain_sha256.as_deref()).map_err(mismatch)?;
                let ex = explain::Explainer::parse(&text, &manifest.features)
                    .map_err(|x| mismatch(format!("{}: {x}", path.display())))?;
                Some(ex)
            }
            None => None,
        };
        let mut model = Model {
            manifest,
            features,
            explainer,
            session,
            rows: Vec::new(),
        };
        model.check_explainer().map_err(mismatch)?;
        Ok(model)
    }

    /// The explanation trees must score like the ONNX model: compared on rows that take
    /// many different paths through them.
    fn check_explainer(&mut self) -> Result<(), String> {
        let Some(ex) = self.explainer.take() else {
            return Ok(());
        };
        let n = 256;
        let rows = ex.probe_rows(n);
        let mut scores = Vec::new();
        self.score_rows(&rows, &mut scores)
            .map_err(|x| x.to_string())?;
        let width = ex.width();
        let worst = (0..n)
            .map(|i| (ex.score(&rows[i * width..(i + 1) * width]) - f64::from(scores[i])).abs())
            .fold(0.0f64, f64::max);
        if worst > 1e-5 {
            return Err(format!(
                "the explanation trees do not match the ONNX model (scores differ by up to {worst:.3e})"
            ));
        }
        self.explainer = Some(ex);
        Ok(())
    }

    /// Scores transactions as if each were its customer's first (no history): for stateless
    /// models, tests and tools. The pipeline builds rows with state and calls
    /// [`Self::score_rows`].
    pub fn score<'a, I>(&mut self, txs: I, scores: &mut Vec<f32>) -> Result<(), ModelError>
    where
        I: IntoIterator<Item = &'a crate::decode::Transaction>,
    {
        self.rows.clear();
        let ctx = crate::features::Context::empty();
        for tx in txs {
            self.features.extend_row(tx, &ctx, &mut self.rows);
        }
        self.score_buffer(scores)
    }

    pub fn view(&self) -> ModelView {
        ModelView {
            manifest: self.manifest.clone(),
            features: self.features.clone(),
            explainer: self.explainer.clone(),
        }
    }

    /// Scores the rows in `self.rows`.
    fn score_buffer(&mut self, scores: &mut Vec<f32>) -> Result<(), ModelError> {
        scores.clear();
        let width = self.features.len();
        let n = self.rows.len() / width.max(1);
        if n == 0 {
            return Ok(());
        }
        let input = TensorRef::from_array_view(([n, width], &self.rows[..]))
            .map_err(|e| ModelError::Score(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![self.manifest.input.as_str() => input])
            .map_err(|e| ModelError::Score(e.to_string()))?;
        let (shape, data) = outputs[self.manifest.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| ModelError::Score(e.to_string()))?;
        let cols = if shape.len() == 2 {
            shape[1] as usize
        } else {
            1
        };
        let col = self.manifest.output_column;
        if col >= cols || data.len() != n * cols {
            return Err(ModelError::Score(format!(
                "output `{}` has shape {:?}, cannot read column {col} for {n} rows",
                self.manifest.output,
                &shape[..]
            )));
        }
        scores.extend((0..n).map(|r| data[r * cols + col]));
        Ok(())
    }

    /// Scores rows already in the manifest's feature order (`features.len()` values each).
    pub fn score_rows(&mut self, rows: &[f32], scores: &mut Vec<f32>) -> Result<(), ModelError> {
        self.rows.clear();
        self.rows.extend_from_slice(rows);
        self.score_buffer(scores)
    }
}
