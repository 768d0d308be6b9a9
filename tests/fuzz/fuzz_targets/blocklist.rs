//! Blocklist records: a key (`email:…`) and a value, in every input format, applied to a
//! global table. The first byte says how many of the next bytes are the key.
#![no_main]

#[path = "common.rs"]
mod common;

use fraudstream::decode::decode_block_entry;
use fraudstream::state::global::GlobalTables;
use fraudstream::state::Hasher;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (key, value) = rest.split_at(usize::from(n).min(rest.len()));
    let hasher = Hasher::new(b"fuzz");
    let mut tables = GlobalTables::with_limit(16);
    for format in common::FORMATS {
        let entry = decode_block_entry(format, value, common::MAX_BYTES).ok();
        let _ = tables.apply_block(&hasher, key, entry.as_ref());
    }
});
