//! A client in its own process for the multi-process tests: calls a service
//! from several threads in a loop, checks every response against its
//! request, and reports `ok=N failed=M mismatched=K` on stdout.
//!
//! ```text
//! meshshm-loadgen --socket PATH [--tcp ADDR] [--threads 4] [--secs 2]
//!                 [--sizes 64,1024] [--service echo] [--timeout-ms 2000]
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshshm::{Client, ClientOptions, Transport};
use meshshm_tests::{body, fnv};

fn main() {
    let mut socket = None;
    let mut tcp: Option<SocketAddr> = None;
    let mut threads = 4usize;
    let mut secs = 2.0f64;
    let mut sizes = vec![64usize, 1024];
    let mut service = "echo".to_owned();
    let mut timeout_ms = 2000u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().expect("flag value");
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(v())),
            "--tcp" => tcp = Some(v().parse().expect("tcp address")),
            "--threads" => threads = v().parse().expect("threads"),
            "--secs" => secs = v().parse().expect("secs"),
            "--sizes" => sizes = v().split(',').map(|s| s.parse().expect("size")).collect(),
            "--service" => service = v(),
            "--timeout-ms" => timeout_ms = v().parse().expect("timeout"),
            other => panic!("unknown flag {other}"),
        }
    }
    let client = Client::with_options(ClientOptions {
        socket,
        transport: tcp.map_or(Transport::Shm, Transport::Tcp),
        spin: 200,
        ..Default::default()
    })
    .expect("connect");
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mismatched = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let (client, ok, failed, mismatched, sizes, service) = (
                client.clone(),
                ok.clone(),
                failed.clone(),
                mismatched.clone(),
                sizes.clone(),
                service.clone(),
            );
            std::thread::spawn(move || {
                let mut i = 0u64;
                while Instant::now() < end {
                    let seed = (std::process::id() as u64) << 32 | (t as u64) << 24 | i;
                    let b = body(seed, sizes[i as usize % sizes.len()]);
                    match client.call(&service, "Load", &b, Duration::from_millis(timeout_ms)) {
                        Ok(r) if fnv(&r) == fnv(&b) && r.len() == b.len() => {
                            ok.fetch_add(1, Ordering::Relaxed)
                        }
                        Ok(_) => mismatched.fetch_add(1, Ordering::Relaxed),
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(5));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    i += 1;
                }
            })
        })
        .collect();
    for h in hs {
        h.join().expect("worker");
    }
    println!(
        "ok={} failed={} mismatched={}",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        mismatched.load(Ordering::Relaxed)
    );
}
