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
