//! Waiting for many doorbells at once with io_uring (feature `uring`).
//!
//! A [`Uring`] holds *watches*: an fd plus what to wait for on it: a
//! multishot edge-triggered poll ([`WatchKind::Rung`]: an eventfd doorbell,
//! armed once, completes at each ring, never drained), a read of 8 bytes
//! ([`WatchKind::Read`]: waits for a ring and consumes it), or a one-shot
//! poll for input/hang-up ([`WatchKind::Poll`]: a control socket, whose EOF
//! is the peer's death). [`Uring::arm`] queues the operation of a watch;
//! [`Uring::wait`] submits every queued operation in one `io_uring_enter`,
//! optionally sleeps until at least one completes, and reports the keys of
//! the watches that completed. `Read` and `Poll` complete once per
//! [`Uring::arm`]; `Rung` stays armed.
//!
//! Everything unsafe about io_uring lives here: the kernel writes a read's
//! 8 bytes into memory that must stay valid until the operation completes,
//! and reads from an fd that must stay open until the operation was
//! submitted. A watch owns both (a heap cell and the fd), and a watch with
//! an operation in flight is never freed: [`Uring::unregister`] cancels
//! the operation and frees the watch only when the kernel reports it ended.
//! If that cannot be confirmed when the `Uring` is dropped, the watches are
//! leaked rather than freed.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring, Probe};

/// What a watch waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchKind {
    /// Read 8 bytes (an eventfd: waits until it is rung, and resets it).
    /// The completion's result is 8 on success.
    Read,
    /// Wait until the fd is readable or hung up (POLLIN | POLLRDHUP). The
    /// completion's result is the poll event mask.
    Poll,
    /// A multishot, edge-triggered poll for input (an eventfd doorbell that
    /// is never drained, as in tokio's epoll): armed once, it completes
    /// (result: the event mask) each time the fd is written, and stays
    /// armed, so a sleep costs no submission. Re-arming is needed only if
    /// the kernel ends it (then [`Uring::is_armed`] is false again).
    Rung,
}

/// A registered watch (a handle; [`Uring::unregister`] ends it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watch {
    idx: u32,
    gen: u32,
}

/// A completed wait: the key given to [`Uring::register`] and the kernel's
/// result (negative: `-errno`, e.g. `-EAGAIN` for a spurious wake-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The watch's key.
    pub key: u64,
    /// The operation's result.
    pub result: i32,
}

struct Slot {
    gen: u32,
    /// The watched fd's owner (an `OwnedFd`, or an `Arc` shared with its user).
    fd: Option<Box<dyn AsFd + Send>>,
    kind: WatchKind,
    key: u64,
    /// Where a read's 8 bytes go: a heap cell with a stable address.
    buf: Box<u64>,
    /// An operation of this slot is queued or in the kernel.
    armed: bool,
    /// Unregistered while armed: freed when its completion arrives.
    dying: bool,
}

/// `user_data` of cancel requests (their completions are ignored).
const CANCEL: u64 = u64::MAX;

/// An io_uring that waits on many fds at once. Not `Sync`; use it from one
/// thread.
pub struct Uring {
    ring: IoUring,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// Operations in flight (submitted or queued), cancels excluded.
    inflight: usize,
    /// Completions reaped early (to make room while submitting), handed
    /// out by the next [`Uring::wait`] if their watch still lives.
    backlog: Vec<(Watch, Completion)>,
}

fn user_data(w: Watch) -> u64 {
    (u64::from(w.gen) << 32) | u64::from(w.idx)
}

impl Uring {
    /// A new ring with room for `entries` queued submissions (more are
    /// submitted early; operations in flight are not limited by it).
    ///
    /// # Errors
    /// When `io_uring_setup` is refused (old kernel, seccomp, sysctl
    /// `kernel.io_uring_disabled`).
    pub fn new(entries: u32) -> io::Result<Uring> {
        let n = entries.clamp(8, 4096).next_power_of_two();
        // Completions are run as task work of this thread. Cooperatively
        // (5.19+): no interrupt of the thread while it runs user code; it
        // picks them up when it next enters the kernel, which `wait` does
        // when the kernel flags pending work (IORING_SQ_TASKRUN).
        let ring = match IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(n)
        {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(n)?,
            Err(e) => return Err(e),
        };
        Ok(Uring {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            inflight: 0,
            backlog: Vec::new(),
        })
    }

    /// Check that this process may use io_uring for what [`Uring`] does:
    /// the ring can be set up, the kernel knows the opcodes (read, poll,
    /// cancel), and a read of a non-blocking eventfd waits for a ring
    /// instead of failing at once. `Err` says why not, for a log line.
    pub fn probe() -> Result<(), String> {
        let mut u = Uring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
        let mut p = Probe::new();
        u.ring
            .submitter()
            .register_probe(&mut p)
            .map_err(|e| format!("io_uring probe: {e}"))?;
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::PollAdd::CODE, "POLL_ADD"),
            (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        ] {
            if !p.is_supported(code) {
                return Err(format!("the kernel's io_uring lacks IORING_OP_{name}"));
            }
        }
        let efd = eventfd().map_err(|e| format!("eventfd: {e}"))?;
        let raw = efd.as_raw_fd();
        let w = u.register(efd, WatchKind::Read, 7);
        u.arm(w).map_err(|e| format!("io_uring submit: {e}"))?;
        let mut out = Vec::new();
        u.wait(false, &mut out)
            .map_err(|e| format!("io_uring submit: {e}"))?;
        if let Some(c) = out.first() {
            return Err(format!(
                "an io_uring read of an idle eventfd completed at once (result {})",
                c.result
            ));
        }
        ring_eventfd(raw);
        let t0 = Instant::now();
        while out.is_empty() && t0.elapsed() < Duration::from_secs(1) {
            std::thread::sleep(Duration::from_millis(1));
            u.wait(false, &mut out)
                .map_err(|e| format!("io_uring: {e}"))?;
        }
        match out.first() {
            Some(c) if c.key == 7 && c.result == 8 => {}
            Some(c) => {
                return Err(format!(
                    "an io_uring read of a rung eventfd returned {}",
                    c.result
                ))
            }
            None => return Err("an io_uring read of a rung eventfd never completed".into()),
        }
        // A multishot poll (5.13+): completes for each ring, stays armed.
        let efd = eventfd().map_err(|e| format!("eventfd: {e}"))?;
        let raw = efd.as_raw_fd();
        let w = u.register(efd, WatchKind::Rung, 8);
        u.arm(w).map_err(|e| format!("io_uring submit: {e}"))?;
        for round in 0..2 {
            out.clear();
            ring_eventfd(raw);
            let t0 = Instant::now();
            while out.is_empty() && t0.elapsed() < Duration::from_secs(1) {
                u.wait(false, &mut out)
                    .map_err(|e| format!("io_uring: {e}"))?;
                if out.is_empty() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            match out.first() {
                Some(c) if c.key == 8 && c.result > 0 && u.is_armed(w) => {}
                Some(c) => {
                    return Err(format!(
                        "io_uring multishot poll, ring {round}: result {}, armed {}",
                        c.result,
                        u.is_armed(w)
                    ))
                }
                None => return Err(format!("io_uring multishot poll: ring {round} not seen")),
            }
        }
        Ok(())
    }

    /// Add a watch on `fd`: an owner of the fd (an `OwnedFd`, or an
    /// `Arc<OwnedFd>` or `Arc<UnixStream>` shared with the caller), kept
    /// until the watch ends and no operation of it is in flight. `key`
    /// comes back in each [`Completion`] of it. Not armed yet.
    pub fn register(&mut self, fd: impl AsFd + Send + 'static, kind: WatchKind, key: u64) -> Watch {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let gen = self
            .slots
            .get(idx as usize)
            .and_then(|s| s.as_ref().map(|s| s.gen.wrapping_add(1)))
            .unwrap_or(0);
        self.slots[idx as usize] = Some(Slot {
            gen,
            fd: Some(Box::new(fd)),
            kind,
            key,
            buf: Box::new(0),
            armed: false,
            dying: false,
        });
        Watch { idx, gen }
    }

    fn slot(&mut self, w: Watch) -> Option<&mut Slot> {
        self.slots
            .get_mut(w.idx as usize)?
            .as_mut()
            .filter(|s| s.gen == w.gen && !s.dying)
    }

    /// Whether the watch has an operation queued or in flight.
    pub fn is_armed(&self, w: Watch) -> bool {
        self.slots
            .get(w.idx as usize)
            .and_then(Option::as_ref)
            .is_some_and(|s| s.gen == w.gen && s.armed)
    }

    /// Queue the watch's operation (submitted by the next [`Uring::wait`]),
    /// unless it already has one. No-op for an unknown watch.
    ///
    /// # Errors
    /// When the submission queue is full and submitting it fails.
    pub fn arm(&mut self, w: Watch) -> io::Result<()> {
        let Some(s) = self.slot(w) else {
            return Ok(());
        };
        if s.armed {
            return Ok(());
        }
        let Some(fd) = s.fd.as_ref() else {
            return Ok(());
        };
        let fd = types::Fd(fd.as_fd().as_raw_fd());
        let e = match s.kind {
            WatchKind::Read => opcode::Read::new(fd, (&mut *s.buf as *mut u64).cast(), 8).build(),
            WatchKind::Poll => {
                opcode::PollAdd::new(fd, (libc::POLLIN | libc::POLLRDHUP) as u32).build()
            }
            WatchKind::Rung => opcode::PollAdd::new(fd, libc::POLLIN as u32)
                .multi(true)
                .build(),
        }
        .user_data(user_data(w));
        self.push(&e)?;
        if let Some(s) = self.slot(w) {
            s.armed = true;
        }
        self.inflight += 1;
        Ok(())
    }

    fn push(&mut self, e: &io_uring::squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the entry is a read into `Slot::buf`, a poll, or a
            // cancel. The buffer is a heap cell owned by a slot that stays
            // allocated while its operation is in flight (`armed`: cleared
            // only when the completion is reaped; an armed slot is never
            // freed or reused, and `Drop` leaks the slots unless every
            // operation is confirmed ended). The fd is owned by the same
            // slot and stays open at least until the entry is submitted.
            let pushed = unsafe { self.ring.submission().push(e) };
            if pushed.is_ok() {
                return Ok(());
            }
            // Full: hand the queued entries to the kernel and retry.
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // The completion queue is full (a burst of doorbells): the
                // kernel takes no more until some are reaped. Reap them now,
                // for the next `wait` to hand out, else this loop never ends.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    let mut early = std::mem::take(&mut self.backlog);
                    self.reap_into(|w, c| early.push((w, c)));
                    self.backlog = early;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// End a watch: cancel its operation if one is in flight (the watch,
    /// its fd and buffer live until the kernel confirms), else free it now.
    pub fn unregister(&mut self, w: Watch) {
        let Some(s) = self.slot(w) else {
            return;
        };
        if s.armed {
            s.dying = true;
            // The fd stays open until the completion: a queued, not yet
            // submitted operation still names it.
            let e = opcode::AsyncCancel::new(user_data(w))
                .build()
                .user_data(CANCEL);
            // A failure here leaves the operation to complete on its own
            // (the watch is freed then).
            let _ = self.push(&e);
        } else {
            self.slots[w.idx as usize] = Some(Slot {
                gen: w.gen,
                fd: None,
                kind: WatchKind::Read,
                key: 0,
                buf: Box::new(0),
                armed: false,
                dying: true,
            });
            self.free.push(w.idx);
        }
    }

    /// Submit what is queued; with `block`, sleep until at least one
    /// operation completes (returns at once if some already have; a signal
    /// may end the sleep early). Appends the completions of live watches
    /// to `out`.
    ///
    /// # Errors
    /// A failing `io_uring_enter` (not EINTR).
    pub fn wait(&mut self, block: bool, out: &mut Vec<Completion>) -> io::Result<()> {
        let block = block && self.backlog.is_empty();
        for (w, c) in std::mem::take(&mut self.backlog) {
            if self.slot(w).is_some() {
                out.push(c);
            }
        }
        let pending = {
            let sq = self.ring.submission();
            // Completions wait as task work until this thread enters the
            // kernel (cooperative task running), and completions past a
            // full completion queue wait in the kernel's overflow list until
            // an enter flushes them: enter if the kernel says either.
            !sq.is_empty() || sq.taskrun() || sq.cq_overflow()
        };
        let ready = !self.ring.completion().is_empty();
        if block && !ready {
            if let Err(e) = self.ring.submit_and_wait(1) {
                match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN) => {}
                    _ => return Err(e),
                }
            }
        } else if pending {
            if let Err(e) = self.ring.submit() {
                match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN) => {}
                    _ => return Err(e),
                }
            }
        }
        self.reap(out);
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.reap_into(|_, c| out.push(c));
    }

    /// Take every completion the kernel posted; those of live watches go
    /// to `sink` with their watch.
    fn reap_into(&mut self, mut sink: impl FnMut(Watch, Completion)) {
        let mut cq = self.ring.completion();
        cq.sync();
        for c in &mut cq {
            let ud = c.user_data();
            if ud == CANCEL {
                continue;
            }
            let w = Watch {
                idx: ud as u32,
                gen: (ud >> 32) as u32,
            };
            let Some(Some(s)) = self.slots.get_mut(w.idx as usize) else {
                continue;
            };
            if s.gen != w.gen || !s.armed {
                continue;
            }
            // A multishot poll stays armed while the kernel says MORE.
            let more = s.kind == WatchKind::Rung && io_uring::cqueue::more(c.flags());
            if !more {
                s.armed = false;
                self.inflight -= 1;
            }
            if more && s.dying {
                continue;
            }
            if s.dying {
                s.fd = None;
                self.free.push(w.idx);
            } else {
                sink(
                    w,
                    Completion {
                        key: s.key,
                        result: c.result(),
                    },
                );
            }
        }
    }

    /// Watches registered (live or dying).
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether no watch is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // Cancel everything in flight and wait (bounded) for the kernel to
        // confirm; if it does not, leak the buffers rather than free memory
        // the kernel might still write.
        let armed: Vec<u64> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let s = s.as_ref()?;
                s.armed.then_some(user_data(Watch {
                    idx: i as u32,
                    gen: s.gen,
                }))
            })
            .collect();
        for ud in armed {
            let e = opcode::AsyncCancel::new(ud).build().user_data(CANCEL);
            let _ = self.push(&e);
        }
        for s in self.slots.iter_mut().flatten() {
            s.dying = true;
        }
        let t0 = Instant::now();
        let mut sink = Vec::new();
        while self.inflight > 0 && t0.elapsed() < Duration::from_millis(500) {
            let _ = self.ring.submit();
            std::thread::sleep(Duration::from_micros(200));
            self.reap(&mut sink);
        }
        if self.inflight > 0 {
            std::mem::forget(std::mem::take(&mut self.slots));
        }
    }
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory-safety preconditions; the result is
    // checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ring_eventfd(fd: i32) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a live local to an fd this module owns.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// For tests of the fallback: make `io_uring_setup` fail with EPERM in
/// this process and every program it executes from now on (a seccomp
/// filter; sets no_new_privs). x86_64 and aarch64 only.
///
/// # Errors
/// When the kernel refuses the filter, or on another architecture.
#[doc(hidden)]
pub fn deny_io_uring_for_tests() -> io::Result<()> {
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    return Err(io::Error::other("unsupported architecture"));
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        const SYS_IO_URING_SETUP: u32 = 425;
        let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
        let jeq = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
        let ret = (libc::BPF_RET | libc::BPF_K) as u16;
        let f = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
        // seccomp_data: nr at offset 0, arch at offset 4.
        let prog = [
            f(ld, 0, 0, 4),
            f(jeq, 1, 0, ARCH),
            f(ret, 0, 0, libc::SECCOMP_RET_ALLOW),
            f(ld, 0, 0, 0),
            f(jeq, 0, 1, SYS_IO_URING_SETUP),
            f(ret, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
            f(ret, 0, 0, libc::SECCOMP_RET_ALLOW),
        ];
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr().cast_mut(),
        };
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fprog` points to `prog`, both alive for the call; the
        // kernel copies the program.
        let r = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const libc::sock_fprog,
                0,
                0,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfd_read_and_cancel() {
        if let Err(why) = Uring::probe() {
            eprintln!("skipped: {why}");
            return;
        }
        let mut u = Uring::new(8).unwrap();
        let a = eventfd().unwrap();
        let b = eventfd().unwrap();
        let (ra, rb) = (a.as_raw_fd(), b.as_raw_fd());
        let wa = u.register(a, WatchKind::Read, 1);
        let wb = u.register(b, WatchKind::Poll, 2);
        u.arm(wa).unwrap();
        u.arm(wb).unwrap();
        u.arm(wa).unwrap(); // already armed: no second read
        let mut out = Vec::new();
        u.wait(false, &mut out).unwrap();
        assert!(out.is_empty());
        ring_eventfd(rb);
        ring_eventfd(ra);
        while out.len() < 2 {
            u.wait(true, &mut out).unwrap();
        }
        out.sort_by_key(|c| c.key);
        assert_eq!(out[0], Completion { key: 1, result: 8 });
        assert_eq!(out[1].key, 2);
        assert!(out[1].result & libc::POLLIN as i32 != 0);
        assert!(!u.is_armed(wa));
        // Armed, then unregistered: cancelled, freed once confirmed.
        u.arm(wa).unwrap();
        u.unregister(wa);
        u.unregister(wb);
        out.clear();
        let t0 = Instant::now();
        while !u.is_empty() && t0.elapsed() < Duration::from_secs(2) {
            u.wait(false, &mut out).unwrap();
        }
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(u.len(), 0);
        // A stale handle does nothing.
        u.arm(wa).unwrap();
        assert!(!u.is_armed(wa));
    }

    #[test]
    fn multishot_poll_stays_armed() {
        if let Err(why) = Uring::probe() {
            eprintln!("skipped: {why}");
            return;
        }
        let mut u = Uring::new(8).unwrap();
        let e = eventfd().unwrap();
        let raw = e.as_raw_fd();
        let w = u.register(e, WatchKind::Rung, 3);
        u.arm(w).unwrap();
        let mut out = Vec::new();
        for _ in 0..3 {
            out.clear();
            ring_eventfd(raw);
            while out.is_empty() {
                u.wait(true, &mut out).unwrap();
            }
            assert_eq!(out.len(), 1, "{out:?}");
            assert_eq!(out[0].key, 3);
            assert!(out[0].result & libc::POLLIN as i32 != 0);
            assert!(u.is_armed(w));
        }
        // Not drained, not rung again: no completion (edge-triggered).
        out.clear();
        std::thread::sleep(Duration::from_millis(20));
        u.wait(false, &mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");
        u.unregister(w);
        let t0 = Instant::now();
        while !u.is_empty() && t0.elapsed() < Duration::from_secs(2) {
            u.wait(false, &mut out).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(u.is_empty());
        assert!(out.is_empty(), "{out:?}");
    }

    /// A burst of doorbells larger than the completion queue while more
    /// waits are being queued (a flood by hostile apps): nothing hangs, and
    /// every doorbell is reported (re-arming the multishot polls the
    /// overflow ended).
    #[test]
    fn completion_queue_overflow_loses_no_doorbell_and_never_hangs() {
        if let Err(why) = Uring::probe() {
            eprintln!("skipped: {why}");
            return;
        }
        const N: usize = 96;
        let mut u = Uring::new(8).unwrap();
        let mut raws = Vec::new();
        let mut watches = Vec::new();
        for k in 0..N {
            let e = eventfd().unwrap();
            raws.push(e.as_raw_fd());
            let w = u.register(e, WatchKind::Rung, k as u64);
            u.arm(w).unwrap();
            watches.push(w);
        }
        let mut out = Vec::new();
        u.wait(false, &mut out).unwrap();
        let t0 = Instant::now();
        for round in 0..3 {
            for &r in &raws {
                ring_eventfd(r);
            }
            // More submissions while the completions pile up: pushes past
            // the small submission queue submit early.
            let mut extra = Vec::new();
            for k in 0..N {
                let e = eventfd().unwrap();
                let w = u.register(e, WatchKind::Read, 1000 + k as u64);
                u.arm(w).unwrap();
                extra.push(w);
            }
            let mut seen = [false; N];
            while seen.iter().any(|s| !s) {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "round {round}: doorbells never reported: {:?}",
                    seen.iter()
                        .enumerate()
                        .filter(|(_, s)| !**s)
                        .map(|(i, _)| i)
                        .collect::<Vec<_>>()
                );
                out.clear();
                u.wait(false, &mut out).unwrap();
                for c in &out {
                    if (c.key as usize) < N {
                        seen[c.key as usize] = true;
                    }
                }
                for (k, &w) in watches.iter().enumerate() {
                    if !u.is_armed(w) {
                        // Ended by the overflow: re-arm, and ring again so
                        // that a doorbell lost with it is seen.
                        u.arm(w).unwrap();
                        ring_eventfd(raws[k]);
                    }
                }
            }
            for w in extra {
                u.unregister(w);
            }
        }
    }
}
