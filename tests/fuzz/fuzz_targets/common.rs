//! What the fuzz targets share: decoders built as `run` builds them (the Avro allocation
//! bound is the message limit), one per format and thread.

#![allow(dead_code)] // each target uses its part

use fraudstream::config::{InputFormat, InputSettings};
use fraudstream::decode::{self, Decoder, Requirements};

pub const FORMATS: [InputFormat; 4] = [
    InputFormat::Auto,
    InputFormat::Json,
    InputFormat::Avro,
    InputFormat::ConfluentAvro,
];

/// The size limit the global-table decoders are given (`input.max-message-bytes`).
pub const MAX_BYTES: usize = 65_536;

thread_local! {
    static DECODERS: Vec<Decoder> = FORMATS
        .iter()
        .map(|&format| {
            let input = InputSettings {
                format,
                ..InputSettings::default()
            };
            Decoder::new(&input, Requirements::default()).expect("decoder")
        })
        .collect();
}

/// Runs `f` with the decoder of `format`.
pub fn with_decoder<R>(format: InputFormat, f: impl FnOnce(&Decoder) -> R) -> R {
    let i = FORMATS.iter().position(|&x| x == format).expect("format");
    DECODERS.with(|d| f(&d[i]))
}

/// Decodes a transaction: whatever the bytes, no panic and no allocation beyond what they
/// justify (libFuzzer's `-rss_limit_mb` and `-malloc_limit_mb`); what decodes is valid.
pub fn transaction(format: InputFormat, data: &[u8]) {
    with_decoder(format, |d| {
        if let Ok(tx) = d.decode(Some(data)) {
            decode::validate(&tx, &Requirements::default())
                .expect("a decoded transaction is valid");
        }
    });
}
