#![no_main]
//! Fuzz target `journal_segments`: see `outpost_fuzz_entry::journal_segments` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost_fuzz_entry::journal_segments(data));
