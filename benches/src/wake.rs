//! `meshshm-bench wake`: what one sleeping hand-off costs on this machine,
//! with nothing else on the path. Two threads pinned to two CPUs play
//! ping-pong through two doorbells (`meshshm_ring::heap_doorbell`, no spin):
//! each round trip is two sleeps and two wake-ups, the least any blocking
//! transport pays per request at one in flight. Measured for the futex bell
//! and the eventfd bell; latency percentiles and each side's CPU per round
//! trip (`getrusage(RUSAGE_THREAD)`). Compare with `compare`'s blocking rows:
//! the gap to this is what the transport adds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshshm_ring::{heap_doorbell, Bell};
use nix::sys::resource::{getrusage, UsageWho};

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    getrusage(UsageWho::RUSAGE_THREAD).map_or(Duration::ZERO, |u| {
        let t = |tv: nix::sys::time::TimeVal| {
            Duration::new(tv.tv_sec() as u64, tv.tv_usec() as u32 * 1000)
        };
        t(u.user_time()) + t(u.system_time())
    })
}

fn pin(cpu: usize) {
    let mut s = nix::sched::CpuSet::new();
    if s.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &s);
    }
}

pub(crate) struct Row {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) cli: f64,
    pub(crate) srv: f64,
}

/// `n` round trips through two eventfd doorbells between two pinned
/// threads: what every blocking row of `compare` pays at least.
pub(crate) fn eventfd_hand_off(n: u64) -> Result<Row, String> {
    round_trips(&Bell::eventfd, n)
}

fn round_trips(bell: &dyn Fn() -> std::io::Result<Bell>, n: u64) -> Result<Row, String> {
    round_trips_paced(bell, n, None)
}

fn round_trips_paced(
    bell: &dyn Fn() -> std::io::Result<Bell>,
    n: u64,
    pace: Option<Duration>,
) -> Result<Row, String> {
    let e = |e: std::io::Error| e.to_string();
    let (wake_a, ring_a) = heap_doorbell(bell().map_err(e)?, 0);
    let (wake_b, ring_b) = heap_doorbell(bell().map_err(e)?, 0);
    let ping = Arc::new(AtomicU64::new(0));
    let pong = Arc::new(AtomicU64::new(0));
    let (pi, po) = (ping.clone(), pong.clone());
    let server = std::thread::spawn(move || {
        pin(1);
        let c0 = thread_cpu();
        for i in 1..=n {
            if wake_b
                .wait_until(|| pi.load(Ordering::Acquire) >= i, None, None)
                .is_err()
            {
                break;
            }
            po.store(i, Ordering::Release);
            ring_a.notify();
        }
        thread_cpu() - c0
    });
    pin(0);
    let mut lat = Vec::with_capacity(n as usize);
    let c0 = thread_cpu();
    let t0 = Instant::now();
    for i in 1..=n {
        if let Some(every) = pace {
            let slot = t0 + every * u32::try_from(i).unwrap_or(u32::MAX);
            let now = Instant::now();
            if now < slot {
                std::thread::sleep(slot - now);
            }
        }
        let t = Instant::now();
        ping.store(i, Ordering::Release);
        ring_b.notify();
        wake_a
            .wait_until(|| pong.load(Ordering::Acquire) >= i, None, None)
            .map_err(e)?;
        lat.push(t.elapsed());
    }
    let cli = thread_cpu() - c0;
    let srv = server.join().map_err(|_| "server thread panicked")?;
    lat.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let per = |d: Duration| us(d) / n as f64;
    Ok(Row {
        p50: us(lat[lat.len() / 2]),
        p99: us(lat[lat.len() * 99 / 100]),
        cli: per(cli),
        srv: per(srv),
    })
}

/// `n` round trips as [`eventfd_hand_off`], the client sleeping to a
/// schedule of `rate` per second before each (`std::thread::sleep` to its
/// slot, as the open-loop client paces its requests): the least any
/// blocking transport's open-loop row can cost here, both sides idle
/// between requests as they are there.
pub(crate) fn paced_hand_off(rate: f64, n: u64) -> Result<Row, String> {
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    round_trips_paced(&Bell::eventfd, n, Some(interval))
}

/// Print the table; `count` round trips per bell and round.
pub fn run(count: u64, rounds: usize) -> std::process::ExitCode {
    let count = count.max(100);
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("meshshm-bench wake: needs 2 CPUs (one per side)");
        return std::process::ExitCode::from(2);
    }
    println!("bell      round    p50 µs    p99 µs   side A cpu µs/rt   side B cpu µs/rt");
    for r in 1..=rounds {
        let bells: [(&str, &dyn Fn() -> std::io::Result<Bell>); 2] =
            [("futex", &|| Ok(Bell::Futex)), ("eventfd", &Bell::eventfd)];
        for (name, mk) in bells {
            match round_trips(mk, count) {
                Ok(x) => println!(
                    "{name:8} {r:>6} {:>9.1} {:>9.1} {:>18.1} {:>18.1}",
                    x.p50, x.p99, x.cli, x.srv
                ),
                Err(e) => {
                    eprintln!("meshshm-bench wake: {name}: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            }
        }
    }
    // (On a thread of its own: the measurement pins it.)
    match std::thread::spawn(|| paced_hand_off(1000.0, 1000)).join() {
        Ok(Ok(x)) => println!(
            "eventfd, paced at 1000/s as the open-loop client: p50 {:.1} µs, p99 {:.1} µs, CPU per round trip: side A {:.1} µs (its paced sleep included), side B {:.1} µs",
            x.p50, x.p99, x.cli, x.srv
        ),
        Ok(Err(e)) => eprintln!("meshshm-bench wake: paced: {e}"),
        Err(_) => eprintln!("meshshm-bench wake: paced: panicked"),
    }
    std::process::ExitCode::SUCCESS
}
