//! A byte stream of frames (the TCP transport): frames found, bounded and
//! reassembled as the proxy and the shim do, metadata parsed. See
//! `meshshm_proto::fuzz::stream`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    meshshm_proto::fuzz::stream(data);
});
