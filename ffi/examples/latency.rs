//! The Rust baseline for the bindings' latency numbers: median round trip
//! of a 1 KiB echo call through the Rust client shim itself.
//!
//! `cargo run --release -p meshshm-ffi --example latency -- SOCKET [CALLS]`

use std::time::{Duration, Instant};

fn main() -> Result<(), shim::Error> {
    let mut args = std::env::args().skip(1);
    let socket = args.next().expect("usage: latency SOCKET [CALLS]");
    let calls: usize = args
        .next()
        .map_or(2000, |n| n.parse().expect("CALLS is a number"));
    let client = shim::Client::connect(Some(socket.as_ref()))?;
    let body = vec![b'x'; 1024];
    let mut t = Vec::with_capacity(calls);
    for i in 0..calls + calls / 10 {
        let t0 = Instant::now();
        let r = client.call("echo", "Echo", &body, Duration::from_secs(5))?;
        let dt = t0.elapsed();
        assert_eq!(r.len(), body.len());
        if i >= calls / 10 {
            t.push(dt.as_secs_f64() * 1e6);
        }
    }
    t.sort_by(f64::total_cmp);
    println!(
        "rust: {calls} calls of 1024 B: median {:.1} us, p99 {:.1} us",
        t[calls / 2],
        t[calls * 99 / 100]
    );
    Ok(())
}
