//! Fuzz target `path`: see [`ambit_shared::fuzzing::path`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ambit_shared::fuzzing::path(data));
