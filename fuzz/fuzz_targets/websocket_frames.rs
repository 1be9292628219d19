//! Fuzz target `websocket_frames`: see [`ambit_waypoint::fuzzing::websocket_frames`] for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ambit_waypoint::fuzzing::websocket_frames(data));
