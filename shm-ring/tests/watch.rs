//! `Waiter::watch`: the eventfd bell edge-triggered in an epoll set with a
//! watched fd. A ring wakes the waiter (every time, with no drain read in
//! between), and the watched fd's EOF ends the wait as `Other`.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshshm_ring::{heap_doorbell, Bell, WaitOutcome};

#[test]
fn rings_wake_every_time_and_eof_is_other() {
    let (mut waiter, notifier) = heap_doorbell(Bell::eventfd().unwrap(), 0);
    let (mine, theirs) = UnixStream::pair().unwrap();
    waiter.watch(mine.as_fd()).unwrap();
    let flag = Arc::new(AtomicU32::new(0));
    let (f2, n2) = (flag.clone(), notifier.clone());
    let h = std::thread::spawn(move || {
        for i in 1..=200 {
            while f2.load(Ordering::Acquire) != i - 1 {
                std::thread::yield_now();
            }
            std::thread::sleep(Duration::from_micros(50));
            f2.store(i, Ordering::Release);
            n2.notify();
        }
    });
    for i in 1..=200 {
        let deadline = Some(Instant::now() + Duration::from_secs(10));
        let out = waiter
            .wait_until(|| flag.load(Ordering::Acquire) >= i, deadline, None)
            .unwrap();
        assert_eq!(out, WaitOutcome::Ready, "wake-up {i} lost");
    }
    h.join().unwrap();
    // An extra fd is refused once the waiter watches one.
    assert!(waiter.block(0, None, Some(mine.as_fd())).is_err());
    drop(theirs);
    let out = waiter
        .wait_until(
            || false,
            Some(Instant::now() + Duration::from_secs(10)),
            None,
        )
        .unwrap();
    assert_eq!(out, WaitOutcome::Other);
}

#[test]
fn futex_bells_cannot_watch() {
    let (mut waiter, _n) = heap_doorbell(Bell::Futex, 0);
    let (a, _b) = UnixStream::pair().unwrap();
    assert!(waiter.watch(a.as_fd()).is_err());
}

/// CPU time this thread has run (ns), from `/proc/thread-self/schedstat`.
fn thread_cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    s.split_whitespace().next().unwrap().parse().unwrap()
}

/// This thread's CPU for 20 waits of 20 ms each, polling up to 100 000
/// times (1..5 ms, by the CPU's pause) before sleeping.
fn cpu_of_long_waits(adaptive: bool) -> u64 {
    let (mut waiter, notifier) = heap_doorbell(Bell::Futex, 0);
    waiter.set_spin_adaptive(adaptive);
    waiter.set_spin(100_000);
    assert_eq!(waiter.spin(), 100_000);
    let flag = Arc::new(AtomicU32::new(0));
    let f2 = flag.clone();
    let h = std::thread::spawn(move || {
        for i in 1..=20 {
            std::thread::sleep(Duration::from_millis(20));
            f2.store(i, Ordering::Release);
            notifier.notify();
        }
    });
    let before = thread_cpu_ns();
    for i in 1..=20 {
        let out = waiter
            .wait_until(|| flag.load(Ordering::Acquire) >= i, None, None)
            .unwrap();
        assert_eq!(out, WaitOutcome::Ready);
    }
    let cpu = thread_cpu_ns() - before;
    h.join().unwrap();
    cpu
}

#[test]
fn adaptive_spin_stops_polling_when_waits_outlast_it() {
    // Fixed: 20 whole budgets. Adaptive: a whole, a half, a quarter, an
    // eighth, a sixteenth, then one probe in 16 waits.
    let fixed = cpu_of_long_waits(false);
    let adaptive = cpu_of_long_waits(true);
    eprintln!("waiter CPU for 20 waits of 20 ms: fixed {fixed} ns, adaptive {adaptive} ns");
    assert!(
        adaptive * 3 < fixed,
        "adaptive {adaptive} ns is not well below fixed {fixed} ns"
    );
}
