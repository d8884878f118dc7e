//! How should the proxy wait on many doorbells? Measures the wake-up
//! latency (ring → handled) and the waiter's CPU per wake-up of:
//!
//! - `tokio-epoll`: one tokio task per eventfd on `AsyncFd` (what the proxy does);
//! - `uring-eventfd`: one thread with an io_uring holding a read on every eventfd;
//! - `uring-futex`: the same with `IORING_OP_FUTEX_WAIT` on futex words;
//!
//! for 1, 64 and 1024 doorbells, one rung at a time, by another thread.
//!
//! `cargo bench -p meshshm-bench --bench doorbells`

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

const WAKES: usize = 20_000;

struct Shared {
    start: Instant,
    /// when the waker rang (ns since start), per round
    rang_at: AtomicU64,
    /// round handled by the waiter (0 = none yet)
    handled: AtomicU64,
    /// waiter CPU time over the run (ns)
    waiter_cpu: AtomicU64,
    lat: std::sync::Mutex<Vec<u64>>,
}

impl Shared {
    fn new() -> Arc<Shared> {
        Arc::new(Shared {
            start: Instant::now(),
            rang_at: AtomicU64::new(0),
            handled: AtomicU64::new(0),
            waiter_cpu: AtomicU64::new(0),
            lat: std::sync::Mutex::new(Vec::with_capacity(WAKES)),
        })
    }
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    fn on_wake(&self, round: u64) {
        let l = self.now() - self.rang_at.load(Ordering::Acquire);
        self.lat.lock().unwrap().push(l);
        self.handled.store(round, Ordering::Release);
    }
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn eventfd() -> OwnedFd {
    // SAFETY: no preconditions; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: fd is fresh and owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn ring_eventfd(fd: RawFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a local to an eventfd.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: word is a valid aligned u32; FUTEX_WAKE only uses its address.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1, 0, 0, 0) };
}

/// Ring doorbell `i % n` for each round, one at a time, waiting for the
/// waiter to handle each before the next.
fn drive(sh: &Shared, n: usize, mut ring: impl FnMut(usize)) {
    for round in 1..=WAKES as u64 {
        let i = (round as usize).wrapping_mul(2654435761) % n;
        sh.rang_at.store(sh.now(), Ordering::Release);
        ring(i);
        let t0 = Instant::now();
        while sh.handled.load(Ordering::Acquire) != round {
            // Sleep-free but polite: the waiter needs the other core.
            std::thread::yield_now();
            assert!(t0.elapsed() < Duration::from_secs(5), "lost wake-up");
        }
    }
}

fn tokio_epoll(n: usize) -> Arc<Shared> {
    let sh = Shared::new();
    let fds: Vec<OwnedFd> = (0..n).map(|_| eventfd()).collect();
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let sh2 = sh.clone();
    let waiter = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let cpu0 = thread_cpu_ns();
            let mut tasks = Vec::new();
            for fd in fds {
                let sh = sh2.clone();
                tasks.push(tokio::spawn(async move {
                    #[allow(deprecated)]
                    let afd = tokio::io::unix::AsyncFd::new(fd).unwrap();
                    loop {
                        let mut g = afd.readable().await.unwrap();
                        let mut v = 0u64;
                        // SAFETY: reads 8 bytes into a local from a non-blocking eventfd.
                        let r = unsafe {
                            libc::read(afd.get_ref().as_raw_fd(), (&mut v as *mut u64).cast(), 8)
                        };
                        if r == 8 {
                            let round = sh.handled.load(Ordering::Relaxed) + 1;
                            sh.on_wake(round);
                            if round == WAKES as u64 {
                                return;
                            }
                        } else {
                            g.clear_ready();
                        }
                    }
                }));
            }
            while sh2.handled.load(Ordering::Acquire) < WAKES as u64 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            sh2.waiter_cpu
                .store(thread_cpu_ns() - cpu0, Ordering::Release);
            for t in tasks {
                t.abort();
            }
        });
    });
    std::thread::sleep(Duration::from_millis(50));
    drive(&sh, n, |i| ring_eventfd(raw[i]));
    waiter.join().unwrap();
    sh
}

fn uring_eventfd(n: usize) -> Arc<Shared> {
    let sh = Shared::new();
    let fds: Vec<OwnedFd> = (0..n).map(|_| eventfd()).collect();
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let sh2 = sh.clone();
    let raw2 = raw.clone();
    let waiter = std::thread::spawn(move || {
        let _keep = fds;
        let mut ring = IoUring::new((n as u32 * 2).next_power_of_two().max(8)).unwrap();
        let mut bufs = vec![0u64; n];
        let read = |i: usize, bufs: &mut [u64]| {
            opcode::Read::new(types::Fd(raw2[i]), (&mut bufs[i] as *mut u64).cast(), 8)
                .build()
                .user_data(i as u64)
        };
        for i in 0..n {
            let e = read(i, &mut bufs);
            // SAFETY: bufs[i] lives (and is not touched) until its CQE is reaped.
            unsafe { ring.submission().push(&e).unwrap() };
        }
        let cpu0 = thread_cpu_ns();
        let mut done = 0u64;
        while done < WAKES as u64 {
            ring.submit_and_wait(1).unwrap();
            let ready: Vec<usize> = ring.completion().map(|c| c.user_data() as usize).collect();
            for i in ready {
                done += 1;
                sh2.on_wake(done);
                let e = read(i, &mut bufs);
                // SAFETY: as above: the previous read of bufs[i] completed.
                unsafe { ring.submission().push(&e).unwrap() };
            }
        }
        sh2.waiter_cpu
            .store(thread_cpu_ns() - cpu0, Ordering::Release);
    });
    std::thread::sleep(Duration::from_millis(50));
    drive(&sh, n, |i| ring_eventfd(raw[i]));
    waiter.join().unwrap();
    sh
}

fn uring_futex(n: usize) -> Arc<Shared> {
    const FUTEX2_SIZE_U32: u32 = 0x02;
    let sh = Shared::new();
    let words: Arc<Vec<AtomicU32>> = Arc::new((0..n).map(|_| AtomicU32::new(0)).collect());
    let (sh2, w2) = (sh.clone(), words.clone());
    let waiter = std::thread::spawn(move || {
        let mut ring = IoUring::new((n as u32 * 2).next_power_of_two().max(8)).unwrap();
        let wait = |i: usize, w: &[AtomicU32]| {
            opcode::FutexWait::new(
                w[i].as_ptr(),
                w[i].load(Ordering::Acquire) as u64,
                u32::MAX as u64,
                FUTEX2_SIZE_U32,
            )
            .build()
            .user_data(i as u64)
        };
        for i in 0..n {
            let e = wait(i, &w2);
            // SAFETY: the futex words outlive the ring (Arc held by this thread).
            unsafe { ring.submission().push(&e).unwrap() };
        }
        let cpu0 = thread_cpu_ns();
        let mut done = 0u64;
        while done < WAKES as u64 {
            ring.submit_and_wait(1).unwrap();
            let ready: Vec<(usize, i32)> = ring
                .completion()
                .map(|c| (c.user_data() as usize, c.result()))
                .collect();
            for (i, res) in ready {
                if res >= 0 || res == -libc::EAGAIN {
                    done += 1;
                    sh2.on_wake(done);
                }
                let e = wait(i, &w2);
                // SAFETY: as above.
                unsafe { ring.submission().push(&e).unwrap() };
            }
        }
        sh2.waiter_cpu
            .store(thread_cpu_ns() - cpu0, Ordering::Release);
    });
    std::thread::sleep(Duration::from_millis(50));
    drive(&sh, n, |i| {
        words[i].fetch_add(1, Ordering::Release);
        futex_wake(&words[i]);
    });
    waiter.join().unwrap();
    sh
}

fn report(name: &str, n: usize, sh: &Shared) {
    let mut l = sh.lat.lock().unwrap().clone();
    l.sort_unstable();
    let p = |q: f64| l[((l.len() as f64 * q) as usize).min(l.len() - 1)] as f64 / 1000.0;
    println!(
        "{name:14} n={n:5}  p50 {:7.2} us  p99 {:7.2} us  waiter CPU {:6.2} us/wake",
        p(0.5),
        p(0.99),
        sh.waiter_cpu.load(Ordering::Acquire) as f64 / 1000.0 / l.len() as f64
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    for n in [1, 64, 1024] {
        report("tokio-epoll", n, &tokio_epoll(n));
        match std::panic::catch_unwind(|| uring_eventfd(n)) {
            Ok(sh) => report("uring-eventfd", n, &sh),
            Err(_) => println!("uring-eventfd  n={n:5}  io_uring not available here"),
        }
        match std::panic::catch_unwind(|| uring_futex(n)) {
            Ok(sh) => report("uring-futex", n, &sh),
            Err(_) => println!("uring-futex    n={n:5}  io_uring futex not available here"),
        }
    }
}
