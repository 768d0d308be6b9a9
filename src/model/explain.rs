//! Per-transaction contributions of a tree ensemble: which features pushed this score up.
//!
//! The trees are those of the ONNX model, exported beside it with one value per node
//! (`scripts/py/export_trees.py`): a leaf's weight, and for a split the mean leaf weight of the
//! training rows that reach it. Following a row's path, each split hands the change in node
//! value to the feature it splits on (path attribution, as in Saabas and XGBoost's
//! `approx_contribs`). The contributions add up, with the bias (the base margin plus every
//! root's value), to the ensemble's raw margin exactly: the log-odds whose logistic is the
//! score. [`Explainer::load`] refuses trees that do not reproduce the ONNX model's scores.

use std::path::Path;

use serde::Deserialize;

#[derive(Deserialize)]
struct TreesFile {
    format: String,
    base_margin: f64,
    features: Vec<String>,
    trees: Vec<TreeSpec>,
}

/// One tree as parallel arrays indexed by node id (0 = root).
#[derive(Deserialize)]
struct TreeSpec {
    /// Column split on; -1 for a leaf.
    feature: Vec<i32>,
    threshold: Vec<f32>,
    /// Next node when `x < threshold` (or when missing and `missing_yes`).
    yes: Vec<u32>,
    no: Vec<u32>,
    missing_yes: Vec<bool>,
    value: Vec<f64>,
}

#[derive(Debug, Clone, Copy)]
struct Node {
    feature: i32,
    threshold: f32,
    yes: u32,
    no: u32,
    missing_yes: bool,
    value: f64,
}

/// A tree ensemble evaluated natively, for explanations.
#[derive(Debug, Clone)]
pub struct Explainer {
    base_margin: f64,
    /// Nodes of every tree, each tree's root at `roots[t]`.
    nodes: Vec<Node>,
    roots: Vec<usize>,
    width: usize,
    /// base margin + every root's value.
    bias: f64,
}

impl Explainer {
    /// Reads a trees file; `features` are the manifest's, which the file must list in order.
    pub fn load(path: &Path, features: &[String]) -> Result<Explainer, String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        Explainer::parse(&bytes, features)
    }

    /// [`Self::load`] of a file's bytes.
    pub fn parse(bytes: &[u8], features: &[String]) -> Result<Explainer, String> {
        let f: TreesFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if f.format != "fraudstream-trees-1" {
            return Err(format!("unknown trees format {:?}", f.format));
        }
        if f.features != features {
            return Err("its feature list differs from the manifest's".into());
        }
        let width = features.len();
        let mut nodes = Vec::new();
        let mut roots = Vec::with_capacity(f.trees.len());
        for (t, tree) in f.trees.iter().enumerate() {
            let n = tree.feature.len();
            if [
                tree.threshold.len(),
                tree.yes.len(),
                tree.no.len(),
                tree.missing_yes.len(),
                tree.value.len(),
            ]
            .iter()
            .any(|&l| l != n)
                || n == 0
            {
                return Err(format!("tree {t}: arrays of different lengths"));
            }
            let start = nodes.len();
            roots.push(start);
            for i in 0..n {
                let feature = tree.feature[i];
                let (yes, no) = (tree.yes[i] as usize, tree.no[i] as usize);
                // Children come after their parent: a path always ends at a leaf.
                if feature >= 0
                    && (feature as usize >= width || yes <= i || no <= i || yes >= n || no >= n)
                {
                    return Err(format!("tree {t} node {i}: bad split"));
                }
                nodes.push(Node {
                    feature,
                    threshold: tree.threshold[i],
                    yes: (start + yes) as u32,
                    no: (start + no) as u32,
                    missing_yes: tree.missing_yes[i],
                    value: tree.value[i],
                });
            }
        }
        let bias = f.base_margin + roots.iter().map(|&r| nodes[r].value).sum::<f64>();
        Ok(Explainer {
            base_margin: f.base_margin,
            nodes,
            roots,
            width,
            bias,
        })
    }

    fn next(&self, node: &Node, row: &[f32]) -> usize {
        let x = row[node.feature as usize];
        let yes = if x.is_nan() {
            node.missing_yes
        } else {
            x < node.threshold
        };
        (if yes { node.yes } else { node.no }) as usize
    }

    /// The raw margin (log-odds) of one row of `width` values.
    pub fn margin(&self, row: &[f32]) -> f64 {
        let mut m = self.base_margin;
        for &r in &self.roots {
            let mut i = r;
            while self.nodes[i].feature >= 0 {
                i = self.next(&self.nodes[i], row);
            }
            m += self.nodes[i].value;
        }
        m
    }

    /// The score: the logistic of the margin.
    pub fn score(&self, row: &[f32]) -> f64 {
        1.0 / (1.0 + (-self.margin(row)).exp())
    }

    /// Adds each feature's contribution for `row` into `out` (zeroed first, `width` long)
    /// and returns the bias; bias + Σ out = [`Self::margin`].
    pub fn contributions(&self, row: &[f32], out: &mut [f64]) -> f64 {
        out.iter_mut().for_each(|c| *c = 0.0);
        for &r in &self.roots {
            let mut i = r;
            while self.nodes[i].feature >= 0 {
                let node = &self.nodes[i];
                let j = self.next(node, row);
                out[node.feature as usize] += self.nodes[j].value - node.value;
                i = j;
            }
        }
        self.bias
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// Rows that take many different paths: at each feature, values just below and above
    /// thresholds the trees split on, and missing values. For checking against ONNX Runtime.
    pub fn probe_rows(&self, n: usize) -> Vec<f32> {
        let mut by_feature: Vec<Vec<f32>> = vec![Vec::new(); self.width];
        for node in &self.nodes {
            if node.feature >= 0 {
                by_feature[node.feature as usize].push(node.threshold);
            }
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut rows = Vec::with_capacity(n * self.width);
        for _ in 0..n {
            for ts in &by_feature {
                let r = rand();
                let v = match (ts.len(), r % 16) {
                    (_, 0) => f32::NAN,
                    (0, _) => 0.0,
                    (len, k) => {
                        let t = ts[(r >> 8) as usize % len];
                        if k % 2 == 0 {
                            t - t.abs().max(1.0) * 1e-3
                        } else {
                            t + t.abs().max(1.0) * 1e-3
                        }
                    }
                };
                rows.push(v);
            }
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// x0 < 1 ? (x1 < 5 ? 1.0 : 2.0) : 4.0 with node values as means, base 0.5.
    fn explainer() -> Explainer {
        let json = r#"{"format":"fraudstream-trees-1","base_margin":0.5,"features":["a","b"],
          "trees":[{"feature":[0,1,-1,-1,-1],"threshold":[1,5,0,0,0],"yes":[1,2,0,0,0],
          "no":[4,3,0,0,0],"missing_yes":[true,false,false,false,false],
          "value":[2.5,1.5,1.0,2.0,4.0]}]}"#;
        let dir = std::env::temp_dir().join(format!("trees-{}.json", std::process::id()));
        std::fs::write(&dir, json).unwrap();
        let e = Explainer::load(&dir, &["a".into(), "b".into()]).unwrap();
        std::fs::remove_file(&dir).unwrap();
        e
    }

    #[test]
    fn margin_follows_the_path_and_contributions_add_up_to_it() {
        let e = explainer();
        let mut c = [0.0; 2];
        for (row, leaf) in [
            ([0.0f32, 0.0], 1.0),
            ([0.0, 9.0], 2.0),
            ([3.0, 0.0], 4.0),
            ([f32::NAN, 9.0], 2.0),
            ([0.0, f32::NAN], 2.0),
        ] {
            assert_eq!(e.margin(&row), 0.5 + leaf);
            let bias = e.contributions(&row, &mut c);
            assert_eq!(bias, 3.0);
            assert!((bias + c.iter().sum::<f64>() - e.margin(&row)).abs() < 1e-12);
        }
        e.contributions(&[0.0, 9.0], &mut c);
        assert_eq!(c, [-1.0, 0.5]);
    }

    #[test]
    fn malformed_trees_are_refused() {
        let dir = std::env::temp_dir().join(format!("bad-trees-{}.json", std::process::id()));
        std::fs::write(&dir, r#"{"format":"fraudstream-trees-1","base_margin":0,"features":["a"],
          "trees":[{"feature":[0],"threshold":[1],"yes":[0],"no":[0],"missing_yes":[true],"value":[1]}]}"#).unwrap();
        assert!(Explainer::load(&dir, &["a".into()])
            .unwrap_err()
            .contains("bad split"));
        assert!(Explainer::load(&dir, &["b".into()])
            .unwrap_err()
            .contains("feature list"));
        std::fs::remove_file(&dir).unwrap();
    }
}
