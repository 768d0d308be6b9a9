//! Navigation events, in every input format.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for format in common::FORMATS {
        let _ = common::with_decoder(format, |d| d.decode_navigation(Some(data)));
    }
});
