//! Request and response metadata: no panic, headers within the input, and
//! one encoding per value. See `meshshm_proto::fuzz::metadata`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    meshshm_proto::fuzz::metadata(data);
});
