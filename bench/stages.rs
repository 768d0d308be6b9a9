//! Stage benchmarks (criterion): each stage of the pipeline alone, on this machine, to put
//! the end-to-end figures next to what the stages cost.
//!
//! `ORT_DYLIB_PATH=… cargo bench --bench stages` (bench/README.md). Stages: JSON and Avro
//! decode of a Sparkov-style transaction; features + state update against a warm RocksDB
//! store; the default model through ONNX Runtime at batch sizes 1, 8, 64 and 256, beside a
//! native evaluation of the same trees (the explainer's) and the per-transaction
//! contributions; verdict encoding in JSON and Avro.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use fraudstream::config::InputSettings;
use fraudstream::decision::{Reason, Thresholds, Verdict};
use fraudstream::decode::{encode_transaction, Decoder, Requirements, Transaction};
use fraudstream::features::engine;
use fraudstream::model::Model;
use fraudstream::state::global::GlobalTables;
use fraudstream::state::{Hasher, StateBatch, Store};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The first `n` transactions of the committed Sparkov sample, as JSON lines.
fn sample(n: usize) -> Vec<String> {
    use std::io::BufRead;
    let f = std::fs::File::open(repo().join("tests/data/sparkov-sample.jsonl.gz")).unwrap();
    std::io::BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .take(n)
        .map(Result::unwrap)
        .collect()
}

fn model() -> Model {
    let lib = std::env::var_os("ORT_DYLIB_PATH").expect("set ORT_DYLIB_PATH (bench/README.md)");
    let env = fraudstream::model::init_runtime(Some(Path::new(&lib))).unwrap();
    Model::load(env, &repo().join("models/sparkov-xgb.manifest.json")).unwrap()
}

fn decode(c: &mut Criterion) {
    let decoder = Decoder::new(&InputSettings::default(), Requirements::default()).unwrap();
    let json = sample(1).remove(0);
    let tx = decoder.decode(Some(json.as_bytes())).unwrap();
    let avro = encode_transaction(&tx);
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("json", |b| {
        b.iter(|| decoder.decode(Some(black_box(json.as_bytes()))).unwrap())
    });
    g.bench_function("avro", |b| {
        b.iter(|| decoder.decode(Some(black_box(&avro[..]))).unwrap())
    });
    let nav = r#"{"event_id":"ev-44767","event_time":1793490973900,"customer_id":"cust-388","session_id":"s-44766","kind":"page_view","device_id":"dev-388","ip":"10.0.1.132"}"#;
    g.bench_function("navigation json", |b| {
        b.iter(|| {
            decoder
                .decode_navigation(Some(black_box(nav.as_bytes())))
                .unwrap()
        })
    });
    g.finish();
}

fn features(c: &mut Criterion) {
    let decoder = Decoder::new(&InputSettings::default(), Requirements::default()).unwrap();
    let txs: Vec<Transaction> = sample(10_000)
        .iter()
        .map(|l| decoder.decode(Some(l.as_bytes())).unwrap())
        .collect();
    let dir = std::env::temp_dir().join(format!("fraudstream-bench-{}", std::process::id()));
    let store = Store::open(&dir, fraudstream::state::DEFAULT_CACHE_BYTES).unwrap();
    let hasher = Hasher::new(b"bench");
    let tables = GlobalTables::default();
    let model = model();
    // Features and state updates of `txs` into `batch`, reading the store.
    let apply = |txs: &[Transaction], batch: &mut StateBatch, rows: &mut Vec<f32>| {
        for tx in txs {
            engine::transaction(
                0,
                tx,
                &hasher,
                &tables,
                batch,
                &store,
                &mut [(&model.features, rows)],
            )
            .unwrap();
        }
    };
    // Warm: the sample applied and committed once, so every read below hits the store.
    let mut rows = Vec::new();
    let mut batch = StateBatch::default();
    apply(&txs, &mut batch, &mut rows);
    store
        .commit(&mut batch, &std::collections::BTreeMap::new(), 0)
        .unwrap();
    let mut g = c.benchmark_group("features");
    g.throughput(Throughput::Elements(1000));
    // 1,000 transactions per iteration, each computed from the committed state (a fresh
    // batch: the store is read, not the batch's cache).
    g.bench_function("1000 transactions, warm RocksDB", |b| {
        b.iter_batched(
            StateBatch::default,
            |mut batch| {
                rows.clear();
                apply(&txs[..1000], &mut batch, &mut rows);
                batch
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

fn scoring(c: &mut Criterion) {
    let mut model = model();
    let explainer = model.explainer.clone().expect("explanation trees");
    let width = model.features.len();
    let rows = explainer.probe_rows(256);
    let mut scores = Vec::new();
    let mut contributions = vec![0.0; width];
    let mut g = c.benchmark_group("score");
    for n in [1usize, 8, 64, 256] {
        g.throughput(Throughput::Elements(n as u64));
        let batch = &rows[..n * width];
        g.bench_with_input(BenchmarkId::new("onnxruntime", n), &n, |b, _| {
            b.iter(|| model.score_rows(black_box(batch), &mut scores).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("native trees", n), &n, |b, &n| {
            b.iter(|| {
                (0..n)
                    .map(|i| explainer.score(black_box(&batch[i * width..(i + 1) * width])))
                    .sum::<f64>()
            })
        });
        g.bench_with_input(BenchmarkId::new("contributions", n), &n, |b, &n| {
            b.iter(|| {
                for i in 0..n {
                    explainer.contributions(
                        black_box(&batch[i * width..(i + 1) * width]),
                        &mut contributions,
                    );
                }
            })
        });
    }
    g.finish();
}

fn verdict(c: &mut Criterion) {
    let tx = Transaction {
        transaction_id: "203f92eb2220eff7896e514a859db9df".into(),
        customer_id: "cust-119".into(),
        event_time_ms: 1_592_780_146_000,
        ..Transaction::default()
    };
    let t = Thresholds {
        review: 0.58,
        decline: 0.9,
    };
    let mut v = Verdict::new(&tx, 0.988, &t, "sparkov-xgb-v1", 1_795_325_801_898);
    for (code, text) in [
        (
            "feature:customer_amount_sum_24h",
            "Customer's spend in the last 24h = 979.2 raised the score (+7.91 log-odds)",
        ),
        (
            "feature:log_amount",
            "Amount (log) = 6.83 raised the score (+5.27 log-odds)",
        ),
        (
            "feature:customer_tx_count_24h",
            "Customer's transactions in the last 24h = 1 raised the score (+1.86 log-odds)",
        ),
    ] {
        v.reasons.push(Reason {
            code: code.into(),
            text: text.into(),
        });
    }
    let mut out = Vec::with_capacity(512);
    let mut g = c.benchmark_group("verdict");
    g.throughput(Throughput::Elements(1));
    g.bench_function("json", |b| {
        b.iter(|| {
            out.clear();
            black_box(&v).write_json(&mut out)
        })
    });
    g.bench_function("avro", |b| {
        b.iter(|| {
            out.clear();
            black_box(&v).write_avro(Some(1), &mut out)
        })
    });
    g.finish();
}

criterion_group!(stages, decode, features, scoring, verdict);
criterion_main!(stages);
