//! Integration tests: the real `fraudstream` binary against Apache Kafka (a broker started
//! by `scripts/test`), with random topic and group names so tests never collide.

mod util;

mod chaos;
mod config_errors;
mod dead_letter;
mod decision;
mod eos;
mod hostile;
mod kafka;
mod operations;
mod parity;
mod readme;
mod reload;
mod scoring;
mod shutdown;
mod state;
mod stateful;
mod tls;
mod validate;
