//! Rust scoring through `ort` equals Python's onnxruntime on the same rows.

use std::process::Command;

use crate::util::*;

#[test]
fn rust_scores_equal_python_onnxruntime() {
    let rows = sample();
    let mut model = model();
    let width = model.features.len();
    let mut flat = Vec::with_capacity(rows.len() * width);
    for r in &rows {
        flat.extend(r.features().iter().map(|&x| x as f32));
    }
    // Score in uneven micro-batches, as the pipeline does.
    let mut rust = Vec::new();
    let mut scores = Vec::new();
    for chunk in flat.chunks(width * 97) {
        model.score_rows(chunk, &mut scores).unwrap();
        rust.extend_from_slice(&scores);
    }

    let python =
        std::env::var("FRAUDSTREAM_PYTHON").expect("FRAUDSTREAM_PYTHON (scripts/test sets it)");
    let out = Command::new(python)
        .arg(repo().join("scripts/py/score_onnx.py"))
        .arg(repo().join("models/ulb-xgb.onnx"))
        .arg(repo().join("tests/data/ulb-holdout-sample.csv.gz"))
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let py: Vec<f64> = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(py.len(), rust.len());
    let worst = rust
        .iter()
        .zip(&py)
        .map(|(r, p)| (*r as f64 - p).abs())
        .fold(0.0, f64::max);
    assert!(worst <= 1e-6, "largest difference {worst}");
    // And the scores are not all alike: the comparison means something.
    let distinct: std::collections::HashSet<u32> = rust.iter().map(|s| s.to_bits()).collect();
    assert!(distinct.len() > rows.len() / 2);
}
