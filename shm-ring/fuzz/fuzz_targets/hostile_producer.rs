//! The fuzz input plays a hostile app against the proxy's side of a
//! segment: its first byte picks the ring size, the rest decodes into steps
//! (honest sends, raw writes anywhere in the segment, forged headers,
//! forged counters; see `meshshm_ring::hostile::Op::decode`). The harness
//! panics if the proxy's consumer panics, loops, hands out a frame outside
//! its ring, forgets that it is poisoned, or garbles honest traffic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshshm_ring::hostile::Hostile;

fuzz_target!(|data: &[u8]| {
    Hostile::run_bytes(data);
});
