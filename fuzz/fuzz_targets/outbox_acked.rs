#![no_main]
//! Fuzz target `outbox_acked`: see `outpost_fuzz_entry::outbox_acked` and docs/fuzzing.md.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| outpost_fuzz_entry::outbox_acked(data));
