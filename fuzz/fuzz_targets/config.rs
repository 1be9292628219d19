//! Fuzz target `config`: see [`ambit_shared::fuzzing::config`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ambit_shared::fuzzing::config(data));
