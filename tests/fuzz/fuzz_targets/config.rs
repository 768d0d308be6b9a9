//! The configuration loader: any file text, and any `--set` override, loads or is refused
//! with a message; none panics. The first line of the input is the override.
#![no_main]

use std::path::Path;

use fraudstream::config::Settings;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (set, file) = text.split_once('\n').unwrap_or(("", text));
    let sets = if set.is_empty() {
        Vec::new()
    } else {
        vec![set.to_string()]
    };
    let _ = Settings::from_text(Some(Path::new("fraudstream.toml")), file, Vec::new(), &sets);
});
