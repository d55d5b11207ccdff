#![no_main]
//! Fuzz target `reading_csv`: see `outpost_fuzz_entry::reading_csv` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost_fuzz_entry::reading_csv(data));
