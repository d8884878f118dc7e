//! The control-socket handshake as the proxy and the app read it (a
//! length-prefixed control message, Hello, Welcome/Reject): no panic, and
//! whatever decodes survives a round trip. See `meshshm_proto::fuzz::handshake`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    meshshm_proto::fuzz::handshake(data);
});
