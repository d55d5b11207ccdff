#![no_main]
//! Fuzz target `reading_json`: see `outpost_fuzz_entry::reading_json` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost_fuzz_entry::reading_json(data));
