//! Ring micro-benchmarks (DESIGN.md, "Numbers"):
//!
//! - `ring_64B`: 64-byte frames from a producer thread to a consumer thread,
//!   publishing every 32 frames or every frame (target >= 20 M frames/s);
//! - `ring_64KiB`: 64 KiB frames from unaligned source offsets, the consumer
//!   touching every cache line or copying the payload out, next to a
//!   single-thread memcpy baseline (target >= 10 GB/s, >= 80% of memcpy);
//! - `round_trip_64B`: a request through one ring and its echo back through
//!   another, both threads spinning (target p50 < 0.5 us); percentiles of
//!   single round trips are printed before the criterion run;
//! - `copy_64KiB`: plain memcpy (glibc), a bare `rep movsb`, and the ring's
//!   copy path (`Grant::write_at`) at several `(dst - src) mod 4096`, to
//!   show whether the CPU has the 4 KiB-aliasing `rep movsb` cliff (deltas
//!   1..63) and whether the ring's path avoids it.
//!
//! Run: `cargo bench -p meshshm-bench --bench ring` (add a filter, e.g.
//! `-- ring_64B`, to run one group; `MESHSHM_BENCH_PIN=1` pins the two
//! threads to CPUs 0 and 1). Both threads spin (yielding only after ~16k
//! idle spins): on a 2-core machine anything else running (a build, another
//! benchmark) wrecks the two-thread figures; run them on a quiet machine.

use std::hint::{black_box, spin_loop};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use meshshm_ring::{heap_ring, Consumer, FrameHeader, FrameKind, Producer, RingError};

const KIB: usize = 1024;

/// With `MESHSHM_BENCH_PIN=1`, pin the calling thread to `cpu`, so that the
/// two spinning threads of a bench run on two different cores. Off by
/// default: on a quiet machine the scheduler already spreads them, and on a
/// busy one a pinned thread cannot flee to the idle core (each hand-off
/// then waits for a time slice). Does nothing with fewer than two CPUs.
fn pin_to(cpu: usize) {
    if std::env::var_os("MESHSHM_BENCH_PIN").map_or(true, |v| v != "1")
        || thread::available_parallelism().map_or(1, |n| n.get()) < 2
    {
        return;
    }
    // SAFETY: cpu_set_t is a plain bit set, valid when zeroed; CPU_SET and
    // sched_setaffinity only read and write it. A failure only leaves the
    // thread unpinned.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Spin while waiting for the other thread, but yield the CPU after a
/// while: on a 2-core machine shared with other work, a pure spin can burn
/// a whole time slice waiting for a peer that is not running.
struct Backoff(u32);

impl Backoff {
    fn new() -> Self {
        Backoff(0)
    }
    fn reset(&mut self) {
        self.0 = 0;
    }
    fn snooze(&mut self) {
        if self.0 < 1 << 14 {
            self.0 += 1;
            spin_loop();
        } else {
            thread::yield_now();
        }
    }
}

/// Push one frame, spinning (and publishing, so the consumer can drain)
/// while the ring is full.
#[inline]
fn push_spin(tx: &mut Producer, hdr: FrameHeader, payload: &[u8]) {
    let mut backoff = Backoff::new();
    loop {
        match tx.try_push(hdr, &[payload]) {
            Ok(()) => return,
            Err(RingError::Full) => {
                tx.publish();
                backoff.snooze();
            }
            Err(e) => panic!("push: {e}"),
        }
    }
}

/// What the consumer does with each payload.
#[derive(Clone, Copy)]
enum Sink {
    /// read the first and last byte
    Peek,
    /// read one u64 in every cache line
    Touch,
    /// copy the payload out into a private buffer
    Copy,
}

/// Consume `n` frames, publishing the head every 32 frames (and whenever
/// the ring is empty).
fn consume(mut rx: Consumer, n: u64, sink: Sink) -> u64 {
    let mut acc = 0u64;
    let mut out = vec![
        0u8;
        if matches!(sink, Sink::Copy) {
            rx.max_payload()
        } else {
            0
        }
    ];
    let mut got = 0u64;
    let mut backoff = Backoff::new();
    while got < n {
        match rx.peek().expect("honest producer") {
            Some(f) => {
                backoff.reset();
                let p = f.payload();
                acc = acc.wrapping_add(match sink {
                    Sink::Peek => p[0] as u64 + p[p.len() - 1] as u64,
                    Sink::Touch => p.iter().step_by(64).map(|&b| b as u64).sum(),
                    Sink::Copy => {
                        out[..p.len()].copy_from_slice(p);
                        black_box(&out);
                        out[0] as u64
                    }
                });
                f.release();
                got += 1;
                if got % 32 == 0 {
                    rx.publish();
                }
            }
            None => {
                rx.publish();
                backoff.snooze();
            }
        }
    }
    rx.publish();
    acc
}

/// Send `iters` frames of `size` bytes from this thread to a consumer
/// thread; returns the time until the consumer has taken the last one.
/// `src_offsets` cycle through the source buffer (unaligned sources).
fn two_threads(
    iters: u64,
    cap: usize,
    size: usize,
    publish_every: u64,
    sink: Sink,
    src_offsets: &[usize],
) -> Duration {
    let (mut tx, rx) = heap_ring(cap);
    let src: Vec<u8> = (0..size + 4096).map(|i| i as u8 | 1).collect();
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    pin_to(0);
    let consumer = thread::spawn(move || {
        pin_to(1);
        go2.wait();
        black_box(consume(rx, iters, sink));
    });
    go.wait();
    let start = Instant::now();
    let mut off = src_offsets.iter().copied().cycle();
    for i in 0..iters {
        let o = off.next().unwrap_or(0);
        let hdr = FrameHeader::single(FrameKind::Request, i, 0, size as u32);
        push_spin(&mut tx, hdr, &src[o..o + size]);
        if (i + 1) % publish_every == 0 {
            tx.publish();
        }
    }
    tx.publish();
    consumer.join().expect("consumer");
    start.elapsed()
}

fn ring_64b(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_64B");
    g.throughput(Throughput::Elements(1));
    for cap in [64 * KIB, 1024 * KIB] {
        for (name, every) in [("publish_every_32", 32u64), ("publish_every_frame", 1)] {
            g.bench_function(
                BenchmarkId::new(name, format!("{}KiB_ring", cap / KIB)),
                |b| b.iter_custom(|iters| two_threads(iters, cap, 64, every, Sink::Peek, &[0])),
            );
        }
    }
    g.finish();
}

/// Unaligned source offsets (none a multiple of 64 but 0).
const SRC_OFFSETS: [usize; 8] = [0, 1, 7, 13, 100, 1021, 2049, 4001];

fn ring_64kib(c: &mut Criterion) {
    let size = 64 * KIB;
    let mut g = c.benchmark_group("ring_64KiB");
    g.throughput(Throughput::Bytes(size as u64));
    for (name, sink) in [
        ("consumer_touches_lines", Sink::Touch),
        ("consumer_copies_out", Sink::Copy),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| two_threads(iters, 1024 * KIB, size, 1, sink, &SRC_OFFSETS))
        });
    }
    // Baseline: one thread copying 64 KiB from the same unaligned sources
    // into a 1 MiB buffer, walking through it as the ring does.
    g.bench_function("memcpy_single_thread", |b| {
        let src: Vec<u8> = (0..size + 4096).map(|i| i as u8).collect();
        let mut dst = vec![0u8; 1024 * KIB + size];
        let mut off = SRC_OFFSETS.iter().copied().cycle();
        let mut at = 0usize;
        b.iter(|| {
            let o = off.next().unwrap_or(0);
            dst[at..at + size].copy_from_slice(&src[o..o + size]);
            black_box(&mut dst);
            at = (at + size + 24) % (1024 * KIB);
        })
    });
    g.finish();
}

/// `iters` round trips: push a request, spin until the echo thread sends it
/// back through the second ring.
fn round_trips(iters: u64, mut record: Option<&mut Vec<u32>>) -> Duration {
    let (mut a_tx, mut b_rx) = heap_ring(64 * KIB);
    let (mut b_tx, mut a_rx) = heap_ring(64 * KIB);
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    pin_to(0);
    let echo = thread::spawn(move || {
        pin_to(1);
        go2.wait();
        let mut n = 0u64;
        let mut backoff = Backoff::new();
        while n < iters {
            match b_rx.peek().expect("honest") {
                Some(f) => {
                    backoff.reset();
                    push_spin(&mut b_tx, *f.header(), f.payload());
                    b_tx.publish();
                    f.release();
                    n += 1;
                    if n % 32 == 0 {
                        b_rx.publish();
                    }
                }
                None => backoff.snooze(),
            }
        }
    });
    let msg = [0x5au8; 64];
    go.wait();
    let start = Instant::now();
    for i in 0..iters {
        let t0 = record.as_ref().map(|_| Instant::now());
        push_spin(
            &mut a_tx,
            FrameHeader::single(FrameKind::Request, i, 0, 64),
            &msg,
        );
        a_tx.publish();
        let mut backoff = Backoff::new();
        loop {
            if let Some(f) = a_rx.peek().expect("honest") {
                black_box(f.payload()[0]);
                f.release();
                break;
            }
            backoff.snooze();
        }
        if i % 32 == 31 {
            a_rx.publish();
        }
        if let (Some(r), Some(t0)) = (record.as_mut(), t0) {
            r.push(t0.elapsed().as_nanos() as u32);
        }
    }
    let d = start.elapsed();
    echo.join().expect("echo");
    d
}

fn round_trip_64b(c: &mut Criterion) {
    // Percentiles of single round trips (each timed with Instant, which
    // adds its own ~20-30 ns), printed once.
    let mut lat = Vec::with_capacity(200_000);
    round_trips(20_000, None);
    round_trips(200_000, Some(&mut lat));
    lat.sort_unstable();
    let q = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
    println!(
        "round_trip_64B single-shot ns: p50 {} p90 {} p99 {} p99.9 {} max {}",
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        lat[lat.len() - 1]
    );
    let mut g = c.benchmark_group("round_trip_64B");
    g.bench_function("spin", |b| b.iter_custom(|iters| round_trips(iters, None)));
    g.finish();
}

/// Deltas `(dst - src) mod 4096` to copy at: 1..63 is where `rep movsb`
/// falls off its cliff on many Intel cores.
const DELTAS: [usize; 9] = [0, 1, 16, 32, 63, 64, 256, 2048, 4064];

/// `src` shifted so that `(dst - src) mod 4096 == delta`, with `len` bytes
/// from there inside `src_buf` (which needs `len + 4096` bytes).
fn src_at_delta(src_buf: &[u8], dst: *const u8, delta: usize, len: usize) -> &[u8] {
    let want = (dst as usize).wrapping_sub(delta) & 4095;
    let off = want.wrapping_sub(src_buf.as_ptr() as usize) & 4095;
    let s = &src_buf[off..off + len];
    debug_assert_eq!(
        (dst as usize).wrapping_sub(s.as_ptr() as usize) & 4095,
        delta
    );
    s
}

/// `dst.copy_from_slice(src)` with one `rep movsb`.
#[cfg(target_arch = "x86_64")]
fn rep_movsb(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len());
    // SAFETY: `rep movsb` copies rcx bytes from [rsi] to [rdi] forwards (the
    // direction flag is clear per the ABI); both slices have that length
    // and, one being &mut, cannot overlap.
    unsafe {
        std::arch::asm!(
            "rep movsb",
            inout("rcx") src.len() => _,
            inout("rdi") dst.as_mut_ptr() => _,
            inout("rsi") src.as_ptr() => _,
            options(nostack, preserves_flags)
        );
    }
}

fn copy_64kib(c: &mut Criterion) {
    let size = 64 * KIB;
    let src_buf: Vec<u8> = (0..size + 4096).map(|i| i as u8).collect();
    let mut g = c.benchmark_group("copy_64KiB");
    g.throughput(Throughput::Bytes(size as u64));
    for delta in DELTAS {
        g.bench_with_input(BenchmarkId::new("memcpy", delta), &delta, |b, &delta| {
            let mut dst = vec![0u8; size + 64];
            let d = dst.as_ptr().align_offset(64);
            let dst = &mut dst[d..d + size];
            let src = src_at_delta(&src_buf, dst.as_ptr(), delta, size);
            b.iter(|| {
                dst.copy_from_slice(black_box(src));
                black_box(&mut *dst);
            })
        });
        #[cfg(target_arch = "x86_64")]
        g.bench_with_input(BenchmarkId::new("rep_movsb", delta), &delta, |b, &delta| {
            // The instruction itself, to show whether this CPU has the cliff
            // that glibc (and the ring) step around.
            let mut dst = vec![0u8; size + 64];
            let d = dst.as_ptr().align_offset(64);
            let dst = &mut dst[d..d + size];
            let src = src_at_delta(&src_buf, dst.as_ptr(), delta, size);
            b.iter(|| {
                rep_movsb(dst, black_box(src));
                black_box(&mut *dst);
            })
        });
        g.bench_with_input(
            BenchmarkId::new("ring_write_at", delta),
            &delta,
            |b, &delta| {
                // One thread: reserve, copy through the ring's path, commit,
                // publish, then take the frame back out.
                let (mut tx, mut rx) = heap_ring(256 * KIB);
                b.iter(|| {
                    let mut grant = tx.reserve(size).expect("room");
                    let dst = grant.payload_mut().as_ptr();
                    let src = src_at_delta(&src_buf, dst, delta, size);
                    grant.write_at(0, black_box(src));
                    grant.commit(FrameHeader::single(FrameKind::Request, 0, 0, size as u32));
                    tx.publish();
                    let f = rx.peek().expect("honest").expect("published");
                    black_box(f.payload()[size - 1]);
                    f.release();
                    rx.publish();
                })
            },
        );
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = ring_64b, ring_64kib, round_trip_64b, copy_64kib
}
criterion_main!(benches);
