//! The Confluent wire format (magic byte, schema id, Avro datum).
#![no_main]

#[path = "common.rs"]
mod common;

use fraudstream::config::InputFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| common::transaction(InputFormat::ConfluentAvro, data));
