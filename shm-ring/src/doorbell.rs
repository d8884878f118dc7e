//! Doorbells: how a side that found nothing to do sleeps, and how the other
//! side wakes it without a syscall while traffic flows.
//!
//! Each side owns a [`WakeCell`] in shared memory. The waiting side spins
//! for a configurable budget, then announces that it will sleep and checks
//! its condition once more before it blocks:
//!
//! ```text
//! waiter                                  notifier
//! seq = cell.seq                          publish (tail/head store, release)
//! cell.sleeping = 1                       fence(SeqCst)            -- SYNC POINT C
//! fence(SeqCst)          -- SYNC POINT C  if cell.sleeping.swap(0) == 1:
//! if ready(): cancel                          cell.seq += 1
//! else block(seq)                             ring the bell (futex wake / eventfd write)
//! ```
//!
//! The two SeqCst fences order "store flag; load counter" against "store
//! counter; load flag": at least one side sees the other's store, so either
//! the waiter sees the new data and does not sleep, or the notifier sees the
//! flag and rings. The futex variant waits on `seq` with the value read
//! before announcing, so a ring between the announcement and the block is
//! never lost; an eventfd keeps its count, so the same holds there.
//! The notifier rings only when the flag says someone sleeps: under load no
//! side makes a syscall.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use crate::spin::{AdaptiveSpin, FollowPoll};
use crate::sync::{fence, spin_hint, AtomicU32, Ordering};

/// What a sleeper waits for: bits of its wake cell's `sleeping` word.
/// New data in the ring it reads (the peer published frames).
pub const WANT_DATA: u32 = 1;
/// Room in the ring it writes (the peer released frames).
pub const WANT_ROOM: u32 = 2;
/// Either (what [`Waiter::announce_sleep`] announces unless told otherwise).
pub const WANT_ANY: u32 = WANT_DATA | WANT_ROOM;

/// One side's sleep announcement, in shared memory.
#[repr(C)]
pub struct WakeCell {
    inner: CachePadded<WakeCellInner>,
}

#[repr(C)]
struct WakeCellInner {
    /// Non-zero while the owner is (about to be) blocked: the `WANT_*` bits
    /// of what should wake it. Set by the owner, cleared by whoever wakes it.
    sleeping: AtomicU32,
    /// Bumped by each wake; the futex word.
    seq: AtomicU32,
}

impl WakeCell {
    /// A cell with nobody sleeping.
    pub fn new() -> Self {
        WakeCell {
            inner: CachePadded::new(WakeCellInner {
                sleeping: AtomicU32::new(0),
                seq: AtomicU32::new(0),
            }),
        }
    }
}

impl Default for WakeCell {
    fn default() -> Self {
        Self::new()
    }
}

/// How a sleeping side is woken.
#[derive(Clone)]
pub enum Bell {
    /// An eventfd: pollable (epoll, tokio's `AsyncFd`, io_uring, poll), so a
    /// side can also wait for other fds at the same time. Shared across
    /// processes by passing the fd.
    EventFd(Arc<OwnedFd>),
    /// A futex on the cell's `seq` word in shared memory. Cheapest, but only
    /// blocks on this one condition.
    Futex,
}

impl Bell {
    /// A new non-blocking, close-on-exec eventfd bell.
    ///
    /// # Errors
    /// When the kernel refuses an eventfd.
    pub fn eventfd() -> io::Result<Bell> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is
        // checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(Bell::EventFd(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// Wrap an eventfd received from the peer.
    pub fn from_eventfd(fd: OwnedFd) -> Bell {
        Bell::EventFd(Arc::new(fd))
    }

    /// The eventfd, if this is one (to register with a poller or pass on).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Bell::EventFd(fd) => Some(fd.as_fd()),
            Bell::Futex => None,
        }
    }
}

/// What ended a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The condition became true.
    Ready,
    /// The deadline passed first.
    TimedOut,
    /// The extra fd became readable (e.g. the control socket: the peer died).
    Other,
}

/// A pointer to a wake cell plus the memory owner that keeps it valid.
#[derive(Clone)]
struct CellRef {
    cell: NonNull<WakeCell>,
    _owner: Arc<dyn Send + Sync>,
}

// SAFETY: the cell is only atomics, kept alive by `_owner` (Send + Sync).
unsafe impl Send for CellRef {}
// SAFETY: as above: every access is atomic.
unsafe impl Sync for CellRef {}

impl CellRef {
    fn get(&self) -> &WakeCellInner {
        // SAFETY: constructed from a valid, aligned WakeCell that `_owner`
        // keeps mapped; only atomics inside.
        unsafe { &self.cell.as_ref().inner }
    }
}

/// The sleeping side's half of a doorbell.
#[derive(Clone)]
pub struct Waiter {
    cell: CellRef,
    bell: Bell,
    spin: AdaptiveSpin,
    /// A longer poll (by time) after a large message sent:
    /// [`Waiter::wait_after`].
    follow: FollowPoll,
    /// What [`Waiter::announce_sleep`] (and so `wait_until`) asks to be
    /// woken for; [`WANT_ANY`] unless set.
    want: u32,
    /// Set by [`Waiter::watch`]: an epoll set with the eventfd (edge-triggered)
    /// and the watched fd.
    epoll: Option<Arc<OwnedFd>>,
}

/// The waking side's half of a doorbell.
#[derive(Clone)]
pub struct Notifier {
    cell: CellRef,
    bell: Bell,
}

/// A waiter/notifier pair on a heap cell (for two threads of one process);
/// the waiter polls up to `spin` times before it sleeps (adaptive, see
/// [`Waiter::set_spin`]).
pub fn heap_doorbell(bell: Bell, spin: u32) -> (Waiter, Notifier) {
    let owner = Arc::new(WakeCell::new());
    let cell = NonNull::from(&*owner);
    let r = CellRef {
        cell,
        _owner: owner,
    };
    (
        Waiter {
            cell: r.clone(),
            bell: bell.clone(),
            spin: AdaptiveSpin::new(spin, true),
            follow: FollowPoll::new(spin > 0, true),
            want: WANT_ANY,
            epoll: None,
        },
        Notifier { cell: r, bell },
    )
}

pub(crate) fn pair_on(
    cell: NonNull<WakeCell>,
    owner: Arc<dyn Send + Sync>,
    bell: Bell,
) -> (Waiter, Notifier) {
    let r = CellRef {
        cell,
        _owner: owner,
    };
    (
        Waiter {
            cell: r.clone(),
            bell: bell.clone(),
            spin: AdaptiveSpin::new(0, true),
            follow: FollowPoll::new(false, true),
            want: WANT_ANY,
            epoll: None,
        },
        Notifier { cell: r, bell },
    )
}

impl Waiter {
    /// What [`Waiter::announce_sleep`] and `wait_until` ask to be woken for.
    pub fn set_want(&mut self, want: u32) {
        self.want = want.max(1);
    }

    /// Set how many times [`Waiter::wait_until`] polls at most before it
    /// sleeps (0 = never spin). The budget adapts (see [`AdaptiveSpin`]):
    /// whole while waits end during the poll, halved each time one outlasts
    /// it, none (with a probe now and then) once waits are long.
    pub fn set_spin(&mut self, spin: u32) {
        self.spin = AdaptiveSpin::new(spin, self.spin.adaptive());
        self.follow = FollowPoll::new(spin > 0, self.spin.adaptive());
    }

    /// `false`: poll with the whole budget before every sleep, whatever
    /// the waits did (pure spinning with a large budget). Default `true`.
    pub fn set_spin_adaptive(&mut self, adaptive: bool) {
        self.spin = AdaptiveSpin::new(self.spin.max(), adaptive);
        self.follow = FollowPoll::new(self.spin.max() > 0, adaptive);
    }

    /// From now on, block in an epoll set holding the eventfd bell
    /// edge-triggered (so a wake-up costs no read to drain it) and `fd`
    /// level-triggered: `fd` readable ends a wait with [`WaitOutcome::Other`]
    /// (the control socket: its EOF is the peer's death). After this, pass
    /// `None` as the `extra` fd of [`Waiter::block`]/[`Waiter::wait_until`].
    ///
    /// # Errors
    /// For a futex bell, or when epoll refuses.
    pub fn watch(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let Bell::EventFd(bell) = &self.bell else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "only an eventfd bell can share an epoll set",
            ));
        };
        // SAFETY: no memory preconditions; the result is checked.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: ep is a fresh descriptor that nothing else owns.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        for (f, events, data) in [
            (bell.as_raw_fd(), libc::EPOLLIN | libc::EPOLLET, 0u64),
            (fd.as_raw_fd(), libc::EPOLLIN, 1u64),
        ] {
            let mut ev = libc::epoll_event {
                events: events as u32,
                u64: data,
            };
            // SAFETY: ep and f are open descriptors; ev is a valid event
            // the kernel copies during the call.
            if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, f, &mut ev) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        self.epoll = Some(Arc::new(ep));
        Ok(())
    }

    /// The largest spin budget.
    pub fn spin(&self) -> u32 {
        self.spin.max()
    }

    /// The bell (its fd, for an event loop that waits itself).
    pub fn bell(&self) -> &Bell {
        &self.bell
    }

    /// Announce that this side is about to sleep. Re-check the condition
    /// after this; if it holds, call [`Waiter::cancel_sleep`], else block
    /// ([`Waiter::block`], or wait for the eventfd in an event loop, then
    /// [`Waiter::cancel_sleep`]). Returns the token for `block`.
    pub fn announce_sleep(&self) -> u32 {
        self.announce_sleep_for(self.want)
    }

    /// [`Waiter::announce_sleep`], asking to be woken only for `want`
    /// ([`WANT_DATA`], [`WANT_ROOM`] or both). A side that waits for
    /// answers and never for room (it pauses instead) saves the peer's
    /// wake-up each time the peer releases what it read.
    pub fn announce_sleep_for(&self, want: u32) -> u32 {
        let c = self.cell.get();
        let seq = c.seq.load(Ordering::Acquire);
        c.sleeping.store(want.max(1), Ordering::Relaxed);
        // SYNC POINT C: the flag store is ordered before the caller's
        // re-check of the ring counters (pairs with Notifier::notify's fence).
        fence(Ordering::SeqCst);
        seq
    }

    /// If this side has announced sleep and not been rung since, add `want`
    /// to what wakes it (e.g. [`WANT_ROOM`] for a task of this side that
    /// now waits for room while another sleeps for data). True if widened;
    /// false if nobody sleeps (whoever wakes next looks anyway). Re-check
    /// the condition afterwards: room made before the widening rang nobody.
    pub fn widen_sleep(&self, want: u32) -> bool {
        let c = self.cell.get();
        let cur = c.sleeping.load(Ordering::Relaxed);
        let widened = cur != 0
            && c.sleeping
                .compare_exchange(cur, cur | want, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        // SYNC POINT C, as in announce_sleep_for: the wider flag is ordered
        // before the caller's re-check of the ring counters.
        fence(Ordering::SeqCst);
        widened
    }

    /// Withdraw the announcement (the condition held, or we woke up).
    pub fn cancel_sleep(&self) {
        self.cell.get().sleeping.store(0, Ordering::Relaxed);
    }

    /// Wake this waiter from another thread of the same side (e.g. to stop
    /// a reader): bumps the sequence and rings the bell unconditionally.
    pub fn interrupt(&self) {
        self.cell.get().seq.fetch_add(1, Ordering::Release);
        Notifier {
            cell: self.cell.clone(),
            bell: self.bell.clone(),
        }
        .ring();
    }

    /// Consume pending eventfd wake-ups (non-blocking), so that a pollable
    /// eventfd goes quiet again. No-op for the futex bell.
    pub fn drain(&self) {
        if let Bell::EventFd(fd) = &self.bell {
            let mut v = 0u64;
            // SAFETY: reading 8 bytes into a local u64 from a non-blocking
            // eventfd we own; the result is ignored (EAGAIN means nothing pending).
            let _ = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
    }

    /// Block until rung (or `deadline`, or `extra` readable). Call after
    /// [`Waiter::announce_sleep`] returned `token` and the re-check failed.
    /// Spurious returns are possible: re-check the condition.
    ///
    /// # Errors
    /// A failing poll/futex syscall (not EINTR, which just returns).
    pub fn block(
        &self,
        token: u32,
        deadline: Option<Instant>,
        extra: Option<BorrowedFd<'_>>,
    ) -> io::Result<WaitOutcome> {
        let timeout = match deadline {
            Some(d) => {
                let now = Instant::now();
                if d <= now {
                    return Ok(WaitOutcome::TimedOut);
                }
                Some(d - now)
            }
            None => None,
        };
        match &self.bell {
            Bell::EventFd(_) if self.epoll.is_some() => {
                if extra.is_some() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "this waiter watches its fd through watch(); pass no extra fd",
                    ));
                }
                let ep = self.epoll.as_ref().expect("checked").as_raw_fd();
                let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 2];
                let ms = timeout.map_or(-1, |t| t.as_millis().clamp(1, i32::MAX as u128) as i32);
                // SAFETY: evs is a valid array of 2 events for the kernel to fill.
                let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 2, ms) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    return if e.kind() == io::ErrorKind::Interrupted {
                        Ok(WaitOutcome::Ready)
                    } else {
                        Err(e)
                    };
                }
                if evs[..n as usize].iter().any(|e| e.u64 == 1) {
                    return Ok(WaitOutcome::Other);
                }
                Ok(WaitOutcome::Ready)
            }
            Bell::EventFd(fd) => {
                let r = poll2(fd.as_raw_fd(), extra.map(|e| e.as_raw_fd()), timeout)?;
                if r.1 {
                    return Ok(WaitOutcome::Other);
                }
                if r.0 {
                    self.drain();
                }
                Ok(WaitOutcome::Ready)
            }
            Bell::Futex => {
                if extra.is_some() {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "a futex bell cannot also wait for an fd",
                    ));
                }
                futex_wait(&self.cell.get().seq, token, timeout)?;
                Ok(WaitOutcome::Ready)
            }
        }
    }

    /// Wait until `ready()` holds: poll up to the (adaptive) budget, then
    /// sleep on the bell. `extra` (eventfd bell only) ends the wait when
    /// readable.
    ///
    /// # Errors
    /// A failing syscall.
    pub fn wait_until(
        &self,
        mut ready: impl FnMut() -> bool,
        deadline: Option<Instant>,
        extra: Option<BorrowedFd<'_>>,
    ) -> io::Result<WaitOutcome> {
        let budget = self.spin.budget();
        if budget > 0 {
            for i in 0..budget {
                if ready() {
                    self.spin.hit(i, budget);
                    return Ok(WaitOutcome::Ready);
                }
                spin_hint();
            }
            self.spin.missed(budget);
        }
        self.sleep_until(ready, deadline, extra)
    }

    /// As [`Waiter::wait_until`], given `sent_total`, the running count of
    /// bytes sent to the peer so far: a large message sent since the last
    /// wait earns a longer poll, by time ([`FollowPoll`]), instead of the
    /// general one.
    ///
    /// # Errors
    /// A failing syscall.
    pub fn wait_after(
        &self,
        sent_total: u64,
        mut ready: impl FnMut() -> bool,
        deadline: Option<Instant>,
        extra: Option<BorrowedFd<'_>>,
    ) -> io::Result<WaitOutcome> {
        let Some(plan) = self.follow.start(sent_total, 0) else {
            return self.wait_until(ready, deadline, extra);
        };
        let t0 = Instant::now();
        let poll_for = Duration::from_micros(plan.budget_us.into());
        loop {
            for _ in 0..64 {
                if ready() {
                    let used = t0.elapsed().as_micros();
                    self.follow.hit(plan, used.try_into().unwrap_or(u32::MAX));
                    return Ok(WaitOutcome::Ready);
                }
                spin_hint();
            }
            let now = Instant::now();
            if now.duration_since(t0) >= poll_for || deadline.is_some_and(|d| now >= d) {
                break;
            }
        }
        self.follow.missed(plan);
        self.sleep_until(ready, deadline, extra)
    }

    /// The sleeping part of a wait: announce, look again, sleep on the bell.
    fn sleep_until(
        &self,
        mut ready: impl FnMut() -> bool,
        deadline: Option<Instant>,
        extra: Option<BorrowedFd<'_>>,
    ) -> io::Result<WaitOutcome> {
        loop {
            if ready() {
                return Ok(WaitOutcome::Ready);
            }
            let token = self.announce_sleep();
            if ready() {
                self.cancel_sleep();
                return Ok(WaitOutcome::Ready);
            }
            let out = self.block(token, deadline, extra);
            self.cancel_sleep();
            match out? {
                WaitOutcome::Ready => {}
                other => return Ok(if ready() { WaitOutcome::Ready } else { other }),
            }
            if let Some(d) = deadline {
                if Instant::now() >= d && !ready() {
                    return Ok(WaitOutcome::TimedOut);
                }
            }
        }
    }
}

impl Notifier {
    /// Wake the other side if (and only if) it announced sleep. Call after
    /// publishing. No syscall when nobody sleeps.
    pub fn notify(&self) {
        self.notify_for(WANT_ANY);
    }

    /// Wake the other side if it sleeps waiting for room: call after
    /// publishing what this side released (a consumer's `publish`).
    pub fn notify_room(&self) {
        self.notify_for(WANT_ROOM);
    }

    /// Wake the other side if it announced sleep for any of `what`.
    pub fn notify_for(&self, what: u32) {
        // SYNC POINT C: our publish (a store) is ordered before the flag
        // load (pairs with Waiter::announce_sleep's fence).
        fence(Ordering::SeqCst);
        let c = self.cell.get();
        // Clear the flag only to ring: a flag cleared without a ring would
        // leave its owner asleep with nobody to wake it. (A flag that
        // changed between the load and the swap still gets its ring.)
        if c.sleeping.load(Ordering::Relaxed) & what != 0
            && c.sleeping.swap(0, Ordering::AcqRel) != 0
        {
            c.seq.fetch_add(1, Ordering::Release);
            self.ring();
        }
    }

    /// Ring unconditionally (e.g. to make a waiter re-check after shutdown).
    pub fn ring(&self) {
        match &self.bell {
            Bell::EventFd(fd) => {
                let one = 1u64;
                // SAFETY: writing 8 bytes from a local u64 to an eventfd; an
                // error (counter saturated, peer gone) only means a wake-up is
                // already pending or pointless.
                let _ = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
            }
            Bell::Futex => futex_wake(&self.cell.get().seq),
        }
    }
}

/// poll() on one or two fds for reading; returns (first ready, second ready).
fn poll2(a: RawFd, b: Option<RawFd>, timeout: Option<Duration>) -> io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms = match timeout {
        Some(t) => t.as_millis().clamp(1, i32::MAX as u128) as i32,
        None => -1,
    };
    let n = if b.is_some() { 2 } else { 1 };
    // SAFETY: fds is a valid array of `n` pollfd structs for the call's duration.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), n, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok((false, false));
        }
        return Err(e);
    }
    let bad = libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
    Ok((
        fds[0].revents != 0,
        b.is_some() && fds[1].revents & bad != 0,
    ))
}

#[cfg(not(loom))]
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> io::Result<()> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a valid, aligned u32 (an AtomicU32) for the call;
    // FUTEX_WAIT (not private: the word may be in memory shared with another
    // process) only reads it; tsp is null or points to a live timespec.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            tsp,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ETIMEDOUT) => Ok(()),
            _ => Err(e),
        }
    } else {
        Ok(())
    }
}

#[cfg(not(loom))]
fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE does not access
    // memory beyond using its address as a key.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

// Under loom the futex is modelled by yielding until `seq` moves: a lost
// wake-up then shows up as a livelock that loom reports.
#[cfg(loom)]
fn futex_wait(word: &AtomicU32, expected: u32, _timeout: Option<Duration>) -> io::Result<()> {
    while word.load(Ordering::Acquire) == expected {
        loom::thread::yield_now();
    }
    Ok(())
}

#[cfg(loom)]
fn futex_wake(_word: &AtomicU32) {}
