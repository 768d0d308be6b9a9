//! Fraud labels (the labels topic), in every input format, applied to a global table.
#![no_main]

#[path = "common.rs"]
mod common;

use fraudstream::decode::decode_label;
use fraudstream::state::global::GlobalTables;
use fraudstream::state::Hasher;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let hasher = Hasher::new(b"fuzz");
    let mut tables = GlobalTables::with_limit(16);
    for format in common::FORMATS {
        if let Ok(label) = decode_label(format, Some(data), common::MAX_BYTES) {
            let _ = tables.apply_label(&hasher, &label);
        }
    }
});
