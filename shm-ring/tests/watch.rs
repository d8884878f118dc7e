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

/// Voluntary context switches of this thread so far (a sleep on the bell
/// is one).
fn thread_sleeps() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with("voluntary_ctxt_switches"))
        .unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Pin this thread to `cpu` (a poll on the CPU its peer needs would only
/// delay the peer).
fn pin(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

/// 40 waits, each after sending `after_sending` bytes, for an answer that
/// comes ~100 µs after each request (the peer copying it); the waiter
/// polls 10 times (a few µs) in general. The two threads on CPUs 0 and 1.
/// Returns how many times the waiter slept.
fn sleeps_waiting_for_answers(after_sending: u64) -> u64 {
    let (mut waiter, notifier) = heap_doorbell(Bell::Futex, 0);
    waiter.set_spin(10);
    let (req, resp) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let (rq, rs) = (req.clone(), resp.clone());
    let h = std::thread::spawn(move || {
        pin(1);
        for i in 1..=40 {
            while rq.load(Ordering::Acquire) < i {
                std::hint::spin_loop();
            }
            let t = Instant::now();
            while t.elapsed() < Duration::from_micros(100) {
                std::hint::spin_loop();
            }
            rs.store(i, Ordering::Release);
            notifier.notify();
        }
    });
    pin(0);
    let before = thread_sleeps();
    for i in 1..=40 {
        req.store(i, Ordering::Release);
        let out = waiter
            .wait_after(
                u64::from(i) * after_sending,
                || resp.load(Ordering::Acquire) >= i,
                Some(Instant::now() + Duration::from_secs(10)),
                None,
            )
            .unwrap();
        assert_eq!(out, WaitOutcome::Ready);
    }
    let slept = thread_sleeps() - before;
    h.join().unwrap();
    slept
}

#[test]
fn a_wait_after_a_large_message_polls_for_its_copy_instead_of_sleeping() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    // 1 KiB sent: the general poll, then sleep, most times. 1 MiB sent:
    // a poll of ~820 µs (FollowPoll), which the ~100 µs answer ends.
    let small = sleeps_waiting_for_answers(1024);
    let large = sleeps_waiting_for_answers(1 << 20);
    eprintln!("sleeps in 40 waits: after 1 KiB {small}, after 1 MiB {large}");
    assert!(small >= 20, "after 1 KiB only {small} of 40 waits slept");
    assert!(large <= 8, "after 1 MiB {large} of 40 waits slept");
}
