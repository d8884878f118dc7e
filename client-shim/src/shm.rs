//! The shared-memory transport: handshake on the control socket, then
//! frames through the segment's rings.

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use meshshm_proto::{recv_with_fds, write_control, Answer, Hello, Role, Welcome};
use meshshm_ring::{
    write_message, write_message_rest, Bell, Consumer, Endpoint, FrameKind, Message, Notifier,
    Producer, Reassembler, Segment, Side, WaitOutcome, Waiter, WriteProgress,
};

use crate::conn::{check_size, try_lock, Out};
use crate::error::{Error, Result};

/// A connected shm session: control socket plus this app's end of the segment.
pub(crate) struct ShmLink {
    pub(crate) ctl: UnixStream,
    tx: Mutex<Tx>,
    rx: Mutex<RxState>,
    waiter: Waiter,
    peer: Notifier,
    pub(crate) max_message: usize,
    pub(crate) welcome: Welcome,
    /// Set (for good) by [`ShmLink::interrupt`]: waits return at once.
    interrupted: std::sync::atomic::AtomicBool,
    /// `tx.owed.len()`, readable without the lock.
    owing: AtomicUsize,
    /// Bytes published to the proxy so far (the producer's count, readable
    /// without the lock): a wait after a large message polls longer
    /// ([`Waiter::wait_after`]).
    published: AtomicU64,
}

/// The send side.
pub(crate) struct Tx {
    producer: Producer,
    /// Messages (or their rests) that must go before anything else, in
    /// order: left by senders that did not wait for room ([`Rest::Owe`],
    /// [`ShmLink::send_or_owe`]).
    owed: VecDeque<Owed>,
    /// Set when a write published something (see `write_all`).
    wrote: bool,
}

/// A message owed to the ring: its bytes from `base` on (a copy).
struct Owed {
    kind: FrameKind,
    id: u64,
    /// Metadata bytes at the start of the message (used when `base` is 0).
    meta_len: usize,
    total: usize,
    base: usize,
    bytes: Vec<u8>,
    progress: WriteProgress,
}

impl Owed {
    /// What is left of `m` once `progress` of it is written (all of it
    /// when nothing is), copied.
    fn rest_of(m: Out<'_>, progress: WriteProgress) -> Owed {
        let base = progress.sent;
        let skip_meta = base.min(m.meta.len());
        let mut bytes = Vec::with_capacity(m.len() - base);
        bytes.extend_from_slice(&m.meta[skip_meta..]);
        bytes.extend_from_slice(&m.body[base - skip_meta..]);
        Owed {
            kind: m.kind,
            id: m.id,
            meta_len: m.meta.len(),
            total: m.len(),
            base,
            bytes,
            progress,
        }
    }
}

/// What a sender that wrote part of a message and found the ring full
/// does with the rest.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Rest {
    /// Wait for room here (a thread that may block).
    Wait,
    /// Leave a copy to the connection, written before anything sent after
    /// it: by the next sender, or by the reader task when room is made (an
    /// async caller, whose thread runs other tasks).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    Owe,
}

pub(crate) struct RxState {
    consumer: Consumer,
    reasm: Reassembler,
}

/// Settings of the handshake.
pub(crate) struct HelloOpts<'a> {
    pub(crate) role: Role,
    pub(crate) service: &'a str,
    pub(crate) token: &'a str,
    pub(crate) ring_size: u64,
    pub(crate) spin: u32,
    pub(crate) spin_adaptive: bool,
    pub(crate) timeout: Duration,
}

impl ShmLink {
    /// Connect to the proxy's control socket and set up the session.
    pub(crate) fn connect(path: &Path, o: &HelloOpts<'_>) -> Result<ShmLink> {
        let target = path.display();
        // (A signal may interrupt a connect that waits for the listener's
        // backlog: a Unix socket is then not connected, try again.)
        let mut ctl = loop {
            match UnixStream::connect(path) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r.map_err(|e| Error::connect(&target, e))?,
            }
        };
        ctl.set_read_timeout(Some(o.timeout))
            .and_then(|_| ctl.set_write_timeout(Some(o.timeout)))
            .map_err(|e| Error::connect(&target, e))?;
        let hello = Hello {
            role: o.role,
            service: o.service.to_owned(),
            token: o.token.to_owned(),
            ring_up: o.ring_size,
            ring_down: o.ring_size,
        };
        write_control(&mut ctl, &hello.encode()).map_err(|e| Error::connect(&target, e))?;
        let mut buf = vec![0u8; 4096];
        let (n, mut fds) =
            recv_with_fds(ctl.as_fd(), &mut buf).map_err(|e| Error::connect(&target, e))?;
        if n < 4 {
            return Err(Error::connect(
                &target,
                "the proxy closed the connection during the handshake",
            ));
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > buf.len() - 4 {
            return Err(Error::Protocol(format!("handshake answer of {len} bytes")));
        }
        if n < 4 + len {
            ctl.read_exact(&mut buf[n..4 + len])
                .map_err(|e| Error::connect(&target, e))?;
        }
        let welcome = match Answer::decode(&buf[4..4 + len]) {
            Ok(Answer::Welcome(w)) => w,
            Ok(Answer::Reject(r)) => return Err(Error::Rejected(r.reason)),
            Err(e) => return Err(Error::Protocol(format!("handshake answer: {e}"))),
        };
        if fds.len() != 3 {
            return Err(Error::Protocol(format!(
                "welcome carried {} fds, expected 3",
                fds.len()
            )));
        }
        let proxy_bell = Bell::from_eventfd(fds.pop().expect("3 fds"));
        let app_bell = Bell::from_eventfd(fds.pop().expect("3 fds"));
        let seg = Segment::open(fds.pop().expect("3 fds"))
            .map_err(|e| Error::Protocol(format!("segment from the proxy: {e}")))?;
        let Endpoint {
            tx,
            rx,
            mut waiter,
            peer,
            max_message,
        } = seg.into_endpoint(Side::App, app_bell, proxy_bell);
        waiter.set_spin_adaptive(o.spin_adaptive);
        waiter.set_spin(o.spin);
        // This side waits for answers, never for room (a full ring is
        // waited out by polling): the proxy need not ring when it only
        // released what it read.
        waiter.set_want(meshshm_ring::WANT_DATA);
        ctl.set_read_timeout(None)
            .map_err(|e| Error::connect(&target, e))?;
        // The waiter blocks in an epoll set: the doorbell edge-triggered
        // (no read to drain it per wake-up) and the control socket, whose
        // EOF is the proxy's death.
        waiter
            .watch(ctl.as_fd())
            .map_err(|e| Error::connect(&target, e))?;
        Ok(ShmLink {
            ctl,
            tx: Mutex::new(Tx {
                producer: tx,
                owed: VecDeque::new(),
                wrote: false,
            }),
            rx: Mutex::new(RxState {
                consumer: rx,
                reasm: Reassembler::new(max_message as usize),
            }),
            waiter,
            peer,
            max_message: max_message as usize,
            welcome,
            interrupted: std::sync::atomic::AtomicBool::new(false),
            owing: AtomicUsize::new(0),
            published: AtomicU64::new(0),
        })
    }

    /// Send one message (as many frames as it takes), waiting for room when
    /// the ring is full (running `idle` first each time). Fails if the proxy
    /// goes away meanwhile.
    pub(crate) fn send(&self, m: Out<'_>, idle: &mut dyn FnMut()) -> Result<()> {
        check_size(m.len(), self.max_message)?;
        self.send_held(&mut self.lock_tx(), m, idle)
    }

    /// Send with the send side held: what is owed first, then `m`.
    fn send_held(&self, tx: &mut Tx, m: Out<'_>, idle: &mut dyn FnMut()) -> Result<()> {
        self.write_all(tx, idle, |me, tx| me.write_owed(tx))?;
        let mut progress = WriteProgress { sent: 0 };
        self.write_all(tx, idle, |me, tx| me.write_some(tx, m, &mut progress))
    }

    /// As [`ShmLink::send`] if no other thread holds the send side now,
    /// else `None` (nothing sent; see `Link::send_if_free`).
    pub(crate) fn send_if_free(&self, m: Out<'_>, idle: &mut dyn FnMut()) -> Option<Result<()>> {
        if let Err(e) = check_size(m.len(), self.max_message) {
            return Some(Err(e));
        }
        let mut tx = try_lock(&self.tx)?;
        Some(self.send_held(&mut tx, m, idle))
    }

    /// As [`ShmLink::send`], but if there is no room for any of the message
    /// now (or messages owed are still waiting for it), write nothing and
    /// return false: the caller waits for room its own way. Once part of a
    /// message is written its frames must not interleave with another
    /// message's: with [`Rest::Wait`] the rest is waited for here, with
    /// [`Rest::Owe`] a copy of it is left to the connection (see
    /// [`ShmLink::write_owed`]) and the message counts as sent.
    pub(crate) fn try_send(&self, m: Out<'_>, idle: &mut dyn FnMut(), rest: Rest) -> Result<bool> {
        check_size(m.len(), self.max_message)?;
        let mut tx = self.lock_tx();
        if !self.write_owed(&mut tx)? {
            return Ok(false);
        }
        let mut progress = WriteProgress { sent: 0 };
        if self.write_some(&mut tx, m, &mut progress)? {
            return Ok(true);
        }
        if progress.sent == 0 {
            return Ok(false);
        }
        match rest {
            Rest::Owe => {
                self.owe(&mut tx, Owed::rest_of(m, progress))?;
                Ok(true)
            }
            Rest::Wait => {
                self.write_all(&mut tx, idle, |me, tx| me.write_some(tx, m, &mut progress))?;
                Ok(true)
            }
        }
    }

    /// Send `m` if the ring has room for it now and nothing is owed ahead of
    /// it, else owe it: it is written, in order, before anything sent after
    /// it (a Cancel from a dropped future, which must not wait).
    pub(crate) fn send_or_owe(&self, m: Out<'_>) -> Result<()> {
        check_size(m.len(), self.max_message)?;
        if self.try_send(m, &mut || {}, Rest::Owe)? {
            return Ok(());
        }
        let mut tx = self.lock_tx();
        self.owe(&mut tx, Owed::rest_of(m, WriteProgress { sent: 0 }))
    }

    /// Leave `o` to the connection, then have a sleeping reader woken for
    /// room too and look once more (room made before that rang nobody; a
    /// reader about to sleep sees `owing` after its announcement).
    fn owe(&self, tx: &mut Tx, o: Owed) -> Result<()> {
        tx.owed.push_back(o);
        self.owing.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.waiter.widen_sleep(meshshm_ring::WANT_ROOM);
        self.write_owed(tx)?;
        Ok(())
    }

    /// Write what is owed (the rests of messages whose senders did not wait
    /// for room, in order) as far as the ring has room; true once nothing is
    /// owed. Every sender calls it first; the reader task calls it each time
    /// it looks at the ring, and asks the proxy to ring for room meanwhile.
    pub(crate) fn write_owed(&self, tx: &mut Tx) -> Result<bool> {
        let Tx {
            producer,
            owed,
            wrote,
        } = tx;
        while let Some(o) = owed.front_mut() {
            let done = if o.base == 0 {
                write_message(
                    producer,
                    o.kind,
                    o.id,
                    o.meta_len,
                    &[&o.bytes],
                    &mut o.progress,
                )
            } else {
                write_message_rest(
                    producer,
                    o.kind,
                    o.id,
                    o.total,
                    o.base,
                    &o.bytes,
                    &mut o.progress,
                )
            };
            let done = done?;
            self.publish(producer, wrote);
            if !done {
                return Ok(false);
            }
            owed.pop_front();
            self.owing.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(true)
    }

    /// The reader task's turn: write what is owed as far as there is room,
    /// unless a sender holds the send side (the reader looks again before
    /// it sleeps: see [`ShmLink::sleep_begin`]).
    pub(crate) fn write_owed_now(&self) -> Result<()> {
        if self.owing.load(Ordering::SeqCst) > 0 {
            if let Some(mut tx) = try_lock(&self.tx) {
                self.write_owed(&mut tx)?;
            }
        }
        Ok(())
    }

    fn lock_tx(&self) -> MutexGuard<'_, Tx> {
        self.tx.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write as much of the message as fits from `progress` on, publish
    /// it and ring the proxy if it sleeps; true once all of it is written.
    /// (Even with nothing of the message written, a pad to the end of the
    /// ring may have been: it is published too.)
    fn write_some(&self, tx: &mut Tx, m: Out<'_>, progress: &mut WriteProgress) -> Result<bool> {
        let parts = [m.meta, m.body];
        let done = write_message(
            &mut tx.producer,
            m.kind,
            m.id,
            m.meta.len(),
            &parts,
            progress,
        )?;
        self.publish(&mut tx.producer, &mut tx.wrote);
        Ok(done)
    }

    /// Publish what was written (a pad to the end of the ring included) and
    /// ring the proxy if it sleeps; note in `wrote` that something went.
    fn publish(&self, producer: &mut Producer, wrote: &mut bool) {
        if producer.publish() {
            *wrote = true;
            self.published
                .store(producer.bytes_sent(), Ordering::Relaxed);
            self.peer.notify();
        }
    }

    /// Repeat `step` (a write that returns true when done), waiting for room
    /// between tries.
    fn write_all(
        &self,
        tx: &mut Tx,
        idle: &mut dyn FnMut(),
        mut step: impl FnMut(&Self, &mut Tx) -> Result<bool>,
    ) -> Result<()> {
        const FIRST_PAUSE: Duration = Duration::from_micros(5);
        let mut pause = FIRST_PAUSE;
        loop {
            tx.wrote = false;
            if step(self, tx)? {
                return Ok(());
            }
            // A step that wrote something (a fragment of a large message)
            // starts the backoff again: the proxy is reading, and the next
            // room comes as soon as it has read as much.
            if tx.wrote {
                pause = FIRST_PAUSE;
            }
            // The ring is full: the proxy frees room as it reads, and it may
            // be waiting for us to read its answers first.
            idle();
            // Short pauses sleep (poll() would round them up to 1 ms) and then
            // check the control socket; long ones sleep on it, so that the
            // proxy's death ends the wait either way.
            let gone = if pause < Duration::from_millis(1) {
                std::thread::sleep(pause);
                readable_now(&self.ctl)
            } else {
                wait_readable(&self.ctl, pause)
            };
            if gone {
                return Err(Error::ProxyGone(
                    "the proxy closed the control socket".into(),
                ));
            }
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// The receive side, if no other thread is reading.
    pub(crate) fn try_rx(&self) -> Option<MutexGuard<'_, RxState>> {
        try_lock(&self.rx)
    }

    /// The receive side, waiting for it.
    pub(crate) fn rx(&self) -> MutexGuard<'_, RxState> {
        self.rx.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read every complete message now in the ring, handing each to `on`,
    /// then hand the room back to the proxy.
    pub(crate) fn drain(
        &self,
        rx: &mut RxState,
        on: impl FnMut(&mut Message<'_>) -> Result<()>,
    ) -> Result<usize> {
        self.drain_n(rx, usize::MAX, on)
    }

    /// As [`ShmLink::drain`], but stop after one complete message that is
    /// handed to `on`.
    pub(crate) fn drain_one(
        &self,
        rx: &mut RxState,
        on: impl FnMut(&mut Message<'_>) -> Result<()>,
    ) -> Result<usize> {
        self.drain_n(rx, 1, on)
    }

    fn drain_n(
        &self,
        rx: &mut RxState,
        max: usize,
        mut on: impl FnMut(&mut Message<'_>) -> Result<()>,
    ) -> Result<usize> {
        let mut n = 0;
        let RxState { consumer, reasm } = rx;
        while n < max {
            let Some(f) = consumer.peek()? else { break };
            let h = *f.header();
            if let Some(mut m) = reasm.feed(&h, f.payload())? {
                match m.kind {
                    FrameKind::Ping => {
                        let payload = m.to_vec();
                        let pong = Out {
                            body: &payload,
                            ..Out::empty(FrameKind::Pong, m.stream_id)
                        };
                        self.send(pong, &mut || {})?;
                    }
                    _ => on(&mut m)?,
                }
                n += 1;
            }
            f.release();
            if consumer.unpublished() >= consumer.capacity() / 4 {
                consumer.publish();
                self.peer.notify_room();
            }
        }
        if consumer.publish() {
            // Room for the proxy: it is woken only if it waits for room.
            self.peer.notify_room();
        }
        Ok(n)
    }

    /// Wait until the ring has data, the deadline passes, or the proxy dies.
    pub(crate) fn wait(&self, rx: &mut RxState, deadline: Option<Instant>) -> Result<WaitOutcome> {
        use std::sync::atomic::Ordering::Acquire;
        let out = self
            .waiter
            .wait_after(
                self.published.load(Ordering::Relaxed),
                || rx.consumer.has_data().unwrap_or(true) || self.interrupted.load(Acquire),
                deadline,
                None,
            )
            .map_err(|e| Error::ProxyGone(format!("waiting for the proxy: {e}")))?;
        if out == WaitOutcome::Other {
            return Err(Error::ProxyGone(
                "the proxy closed the control socket".into(),
            ));
        }
        Ok(out)
    }

    /// The doorbell's eventfd and the control socket (EOF: the proxy died).
    pub(crate) fn watch_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        let mut v = Vec::with_capacity(2);
        v.extend(self.waiter.bell().fd());
        v.push(self.ctl.as_fd());
        v
    }

    /// Ask the proxy to ring before sleeping (for room as well, with `room`
    /// — a caller waits for it — or when messages are owed); false (nothing
    /// announced: look again now) if a response is already waiting, the
    /// link was interrupted, or what is owed could not be looked at.
    pub(crate) fn sleep_begin(&self, rx: &mut RxState, room: bool) -> Result<bool> {
        use meshshm_ring::{WANT_DATA, WANT_ROOM};
        self.waiter.announce_sleep_for(if room {
            WANT_DATA | WANT_ROOM
        } else {
            WANT_DATA
        });
        if rx.consumer.has_data().unwrap_or(true)
            || self.interrupted.load(std::sync::atomic::Ordering::Acquire)
        {
            self.waiter.cancel_sleep();
            return Ok(false);
        }
        // After the announcement (a sender that owes from now on widens it
        // itself, see `owe`), what is owed is written or waits for the
        // proxy's ring for room. A busy send lock means "look again", not
        // "its holder will see to it": the holder may have looked for room
        // already, before the proxy made it (loom model
        // `doorbell_owed_rest_is_written_or_the_reader_rung`).
        if self.owing.load(Ordering::SeqCst) > 0 {
            self.waiter.widen_sleep(WANT_ROOM);
            match try_lock(&self.tx) {
                Some(mut tx) => {
                    self.write_owed(&mut tx)?;
                }
                None => {
                    self.waiter.cancel_sleep();
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// A caller now waits for room: if this side's reader sleeps, have the
    /// proxy ring it for room too. Re-check the room afterwards.
    pub(crate) fn want_room(&self) {
        self.waiter.widen_sleep(meshshm_ring::WANT_ROOM);
    }

    pub(crate) fn sleep_end(&self) {
        self.waiter.cancel_sleep();
    }

    /// Wake a thread blocked in [`ShmLink::wait`], and make every later
    /// wait return at once (used to stop a reader or a server).
    pub(crate) fn interrupt(&self) {
        self.interrupted
            .store(true, std::sync::atomic::Ordering::Release);
        self.waiter.interrupt();
    }
}

/// Whether the socket is readable right now (poll with a zero timeout).
pub(crate) fn readable_now(s: &UnixStream) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

/// poll() the socket for `t`; true if it became readable (EOF or data:
/// either way the proxy ended the session).
pub(crate) fn wait_readable(s: &UnixStream, t: Duration) -> bool {
    poll_for(s.as_fd(), nix::poll::PollFlags::POLLIN, t)
}

/// poll() one fd for `events`, at most `t` (rounded up to 1 ms); true if
/// it became ready.
pub(crate) fn poll_for(
    fd: std::os::fd::BorrowedFd<'_>,
    events: nix::poll::PollFlags,
    t: Duration,
) -> bool {
    use nix::poll::{poll, PollFd, PollTimeout};
    let ms = t.as_millis().clamp(1, i32::MAX as u128) as i32;
    let mut fds = [PollFd::new(fd, events)];
    poll(
        &mut fds,
        PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
    )
    .is_ok_and(|n| n > 0)
}
