//! Round-trip time of echo calls through a running proxy, over shm and TCP.
//!
//! ```text
//! meshshm-proxy --socket /tmp/p.sock --tcp 127.0.0.1:15001 &
//! cargo run --release -p meshshm --example rtt -- /tmp/p.sock 127.0.0.1:15001 [calls] [size] [spin]
//! ```

use std::time::{Duration, Instant};

use meshshm::{Client, ClientOptions, Transport};

fn measure(c: &Client, n: usize, size: usize) -> (f64, f64) {
    let body = vec![7u8; size];
    for _ in 0..n / 10 {
        c.call("echo", "E", &body, Duration::from_secs(5))
            .expect("warm-up call");
    }
    let mut t: Vec<f64> = (0..n)
        .map(|_| {
            let t0 = Instant::now();
            let r = c
                .call("echo", "E", &body, Duration::from_secs(5))
                .expect("call");
            assert_eq!(r.len(), size);
            t0.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[n / 2], t[n * 99 / 100])
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let socket = a.get(1).expect("socket path").into();
    let tcp = a.get(2).expect("tcp address").parse().expect("tcp address");
    let n = a.get(3).map_or(20_000, |s| s.parse().expect("calls"));
    let size = a.get(4).map_or(1024, |s| s.parse().expect("size"));
    let spin = a.get(5).map_or(100_000, |s| s.parse().expect("spin"));
    let shm = Client::with_options(ClientOptions {
        socket: Some(socket),
        spin,
        ..Default::default()
    })
    .expect("shm connect");
    let tcp = Client::with_options(ClientOptions {
        transport: Transport::Tcp(tcp),
        ..Default::default()
    })
    .expect("tcp connect");
    let (s50, s99) = measure(&shm, n, size);
    let (t50, t99) = measure(&tcp, n, size);
    println!("size {size} B, {n} calls, client spin {spin}");
    println!("shm: p50 {s50:.2} us  p99 {s99:.2} us");
    println!("tcp: p50 {t50:.2} us  p99 {t99:.2} us");
    println!("tcp/shm p50 ratio: {:.1}x", t50 / s50);
}
