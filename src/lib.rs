//! fraudstream scores payment transactions for fraud as they stream through Kafka.
//!
//! # Layout
//!
//! The crate reads top to bottom like the data flow:
//!
//! ```text
//! transactions ─> source ─> decode ─> features ─> model ─> decision ─> sink ─> verdicts
//!                                 │       ⇅ state (RocksDB)
//!                                 └──────── bad input ──────────────────────> dead-letter
//! ```
//!
//! - [`config`]: the TOML file, its defaults and environment overrides → [`config::Settings`].
//! - [`pipeline`]: wires the stages together; [`pipeline::run`] is the whole service.
//! - [`source`]: the Kafka consumer, rebalance logging, offset storage after acknowledgement.
//! - [`decode`]: JSON and Avro bytes → a validated [`decode::Transaction`] (pure, no I/O).
//! - [`features`]: the feature registry; (transaction, entity state) → the model's input row,
//!   and how a transaction updates that state (pure).
//! - [`state`]: event-time windows, entity states, keyed hashing, the RocksDB store.
//! - [`model`]: the manifest and an ONNX Runtime session that scores micro-batches.
//! - [`decision`]: score + thresholds → [`decision::Verdict`], and its encodings (pure).
//! - [`sink`]: the producer for verdicts and dead letters, waiting for acknowledgements.
//! - [`telemetry`]: metric names and the `/metrics`, `/healthz`, `/readyz` endpoint.
//! - [`validate`]: the pre-deploy checks behind `fraudstream validate`.
//!
//! `decode`, `features` and `decision` do no I/O: that is where the logic is, so it is
//! unit-tested beside the code. Everything that crosses Kafka is tested against a real broker
//! in `tests/`.

pub mod config;
pub mod decision;
pub mod decode;
pub mod features;
pub mod model;
pub mod pipeline;
pub mod replay;
pub mod sink;
pub mod source;
pub mod state;
pub mod telemetry;
pub mod validate;
