//! One connection to the proxy (either transport) and the call protocol on
//! top of it: register, send, then lead or follow until the response comes.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use meshshm_proto::{status, RequestMeta, ResponseMeta};
use meshshm_ring::{FrameKind, Message, WaitOutcome};

use crate::core::{Core, Notify, Slot};
use crate::error::{Error, Result};
use crate::shm::{Rest, RxState, ShmLink};
use crate::tcp::{TcpLink, TcpRx};
use crate::{Call, Response};

/// One message to send: its frame kind, stream id, metadata and body.
#[derive(Clone, Copy)]
pub(crate) struct Out<'a> {
    pub(crate) kind: FrameKind,
    pub(crate) id: u64,
    pub(crate) meta: &'a [u8],
    pub(crate) body: &'a [u8],
}

impl Out<'_> {
    /// A message of `kind` with neither metadata nor body (Cancel).
    pub(crate) fn empty(kind: FrameKind, id: u64) -> Out<'static> {
        Out {
            kind,
            id,
            meta: &[],
            body: &[],
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.meta.len() + self.body.len()
    }
}

/// What a transport provides to the call protocol.
pub(crate) trait Link: Send + Sync + 'static {
    type Rx;
    fn name(&self) -> &'static str;
    /// Send one message, waiting for room; `idle` runs whenever there is
    /// none (the caller reads responses meanwhile: the room it waits for may
    /// depend on them, and its thread may be the one that reads them).
    fn send(&self, m: Out<'_>, idle: &mut dyn FnMut()) -> Result<()>;
    /// As [`Link::send`] if no other thread is sending now, else `None`
    /// (nothing sent): for a caller that holds the receive side, which
    /// must not wait for the send side (its holder may be waiting for room
    /// that only reading makes). Default: always `None`.
    fn send_if_free(&self, _m: Out<'_>, _idle: &mut dyn FnMut()) -> Option<Result<()>> {
        None
    }
    fn try_rx(&self) -> Option<MutexGuard<'_, Self::Rx>>;
    fn rx(&self) -> MutexGuard<'_, Self::Rx>;
    fn drain(
        &self,
        rx: &mut Self::Rx,
        on: &mut dyn FnMut(&mut Message<'_>) -> Result<()>,
    ) -> Result<usize>;
    fn wait(&self, rx: &mut Self::Rx, deadline: Option<Instant>) -> Result<WaitOutcome>;
    fn interrupt(&self);
    /// Whether the proxy has visibly ended the session (checked without
    /// waiting; `false` when the transport cannot tell).
    fn peer_closed(&self) -> bool {
        false
    }
    /// For a reader task on an async runtime: the fds whose readability
    /// means "look again" (shm: the doorbell, then the control socket; TCP:
    /// the socket).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    fn watch_fds(&self) -> Vec<BorrowedFd<'_>>;
    /// About to sleep on [`Link::watch_fds`]: tell the peer to ring (for
    /// room as well, with `room`). False (and nothing announced) if data came
    /// in meanwhile.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    fn sleep_begin(&self, _rx: &mut Self::Rx, _room: bool) -> Result<bool> {
        Ok(true)
    }
    /// As [`Link::send`], but write nothing and return false if there is no
    /// room for any of the message now (a transport that cannot tell sends,
    /// waiting as `send` does). What happens to the rest of a message cut
    /// by a full ring: see [`Rest`].
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    fn try_send(&self, m: Out<'_>, idle: &mut dyn FnMut(), _rest: Rest) -> Result<bool> {
        self.send(m, idle).map(|()| true)
    }
    /// Send now or leave it to the connection, never waiting for room (a
    /// small message: a Cancel from a dropped future).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    fn send_or_owe(&self, m: Out<'_>) -> Result<()> {
        self.send(m, &mut || {})
    }
    /// The reader task's turn to write what senders left to the connection
    /// ([`Rest::Owe`]), as far as there is room.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    fn write_owed(&self) -> Result<()> {
        Ok(())
    }
    /// A caller waits for room: make sure the reader, if it sleeps, is woken
    /// when room is made.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    fn want_room(&self) {}
    /// Awake again after [`Link::sleep_begin`].
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    fn sleep_end(&self) {}
    /// Let sent frames wait in a buffer until `bytes` of them do or
    /// [`Link::flush`] (a transport with writes to save: TCP).
    fn batch_writes(&self, _bytes: usize) {}
    /// Write what [`Link::batch_writes`] left waiting; `idle` runs while
    /// there is no room (as for [`Link::send`]).
    fn flush(&self, _idle: &mut dyn FnMut()) -> Result<()> {
        Ok(())
    }
    /// Take in what has arrived, without blocking: true if anything did
    /// (TCP: one non-blocking read; shm: the ring is already in memory).
    fn receive_now(&self, _rx: &mut Self::Rx) -> Result<bool> {
        Ok(false)
    }
}

impl Link for ShmLink {
    type Rx = RxState;
    fn name(&self) -> &'static str {
        "shm"
    }
    fn peer_closed(&self) -> bool {
        // After the handshake the proxy never writes to the control socket:
        // readable means EOF, the proxy is gone.
        crate::shm::readable_now(&self.ctl)
    }
    fn send(&self, m: Out<'_>, idle: &mut dyn FnMut()) -> Result<()> {
        ShmLink::send(self, m, idle)
    }
    fn send_if_free(&self, m: Out<'_>, idle: &mut dyn FnMut()) -> Option<Result<()>> {
        ShmLink::send_if_free(self, m, idle)
    }
    fn try_rx(&self) -> Option<MutexGuard<'_, RxState>> {
        ShmLink::try_rx(self)
    }
    fn rx(&self) -> MutexGuard<'_, RxState> {
        ShmLink::rx(self)
    }
    fn drain(
        &self,
        rx: &mut RxState,
        on: &mut dyn FnMut(&mut Message<'_>) -> Result<()>,
    ) -> Result<usize> {
        ShmLink::drain(self, rx, on)
    }
    fn wait(&self, rx: &mut RxState, deadline: Option<Instant>) -> Result<WaitOutcome> {
        ShmLink::wait(self, rx, deadline)
    }
    fn interrupt(&self) {
        ShmLink::interrupt(self)
    }
    fn watch_fds(&self) -> Vec<BorrowedFd<'_>> {
        ShmLink::watch_fds(self)
    }
    fn sleep_begin(&self, rx: &mut RxState, room: bool) -> Result<bool> {
        ShmLink::sleep_begin(self, rx, room)
    }
    fn try_send(&self, m: Out<'_>, idle: &mut dyn FnMut(), rest: Rest) -> Result<bool> {
        ShmLink::try_send(self, m, idle, rest)
    }
    fn send_or_owe(&self, m: Out<'_>) -> Result<()> {
        ShmLink::send_or_owe(self, m)
    }
    fn write_owed(&self) -> Result<()> {
        ShmLink::write_owed_now(self)
    }
    fn want_room(&self) {
        ShmLink::want_room(self)
    }
    fn sleep_end(&self) {
        ShmLink::sleep_end(self)
    }
}

impl Link for TcpLink {
    type Rx = TcpRx;
    fn name(&self) -> &'static str {
        "tcp"
    }
    fn send(&self, m: Out<'_>, idle: &mut dyn FnMut()) -> Result<()> {
        TcpLink::send(self, m, idle)
    }
    fn try_rx(&self) -> Option<MutexGuard<'_, TcpRx>> {
        TcpLink::try_rx(self)
    }
    fn rx(&self) -> MutexGuard<'_, TcpRx> {
        TcpLink::rx(self)
    }
    fn drain(
        &self,
        rx: &mut TcpRx,
        on: &mut dyn FnMut(&mut Message<'_>) -> Result<()>,
    ) -> Result<usize> {
        TcpLink::drain(self, rx, on)
    }
    fn wait(&self, rx: &mut TcpRx, deadline: Option<Instant>) -> Result<WaitOutcome> {
        TcpLink::wait(self, rx, deadline)
    }
    fn interrupt(&self) {
        TcpLink::interrupt(self)
    }
    fn watch_fds(&self) -> Vec<BorrowedFd<'_>> {
        TcpLink::watch_fds(self)
    }
    fn receive_now(&self, rx: &mut TcpRx) -> Result<bool> {
        TcpLink::receive_now(self, rx)
    }
    fn batch_writes(&self, bytes: usize) {
        TcpLink::batch_writes(self, bytes)
    }
    fn flush(&self, idle: &mut dyn FnMut()) -> Result<()> {
        TcpLink::flush(self, idle)
    }
}

/// The transport-independent face of a connection.
pub(crate) trait AnyConn: Send + Sync {
    fn transport(&self) -> &'static str;
    fn accepting(&self) -> bool;
    fn invoke(&self, call: &Call<'_>) -> Result<Response>;
    fn start(&self, call: &Call<'_>, notify: Notify) -> Result<(u64, Arc<Slot>)>;
    /// As [`AnyConn::start`], but `None` (nothing sent, nothing registered)
    /// when the ring has no room for the request now: wait with
    /// [`Core::room`] and try again.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    fn try_start(&self, call: &Call<'_>, notify: Notify) -> Result<Option<(u64, Arc<Slot>)>>;
    /// See [`Link::want_room`].
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    fn want_room(&self);
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    fn core(&self) -> &Core;
    fn cancel(&self, id: u64);
    fn close(&self);
    fn in_flight(&self) -> usize;
    /// Whether the proxy is known gone (a syscall: call it sparingly). If
    /// so, calls in flight fail now.
    fn peer_closed(&self) -> bool;
}

/// How a call made holding the receive side failed: sending its request
/// (a full ring waited out, a message too large: the connection may live
/// on) or reading (the connection is lost).
enum SoloError {
    Send(Error),
    Link(Error),
}

const READER_CALLERS: u8 = 0;
const READER_THREAD: u8 = 1;
const READER_TASK: u8 = 2;

pub(crate) struct Conn<L: Link> {
    core: Core,
    link: L,
    closing: AtomicBool,
    /// Who reads responses: the callers ([`READER_CALLERS`]: one leads, the
    /// others follow), or a reader of the connection's own
    /// ([`READER_THREAD`], [`READER_TASK`]: callers never lead, they wait to
    /// be handed theirs; with a task, a blocking caller may be running on
    /// the very thread the task needs, so it also reads for itself).
    reader: AtomicU8,
}

/// `call`'s request metadata into `buf` (cleared first); its timeout
/// travels in whole milliseconds, at least 1.
pub(crate) fn encode_request_meta(buf: &mut Vec<u8>, call: &Call<'_>) {
    let timeout_ms = call
        .timeout
        .map_or(0, |t| t.as_millis().clamp(1, u32::MAX as u128) as u32);
    buf.clear();
    RequestMeta::encode(
        buf,
        call.service,
        call.method,
        timeout_ms,
        call.priority,
        call.headers,
    );
}

thread_local! {
    static META: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl<L: Link> Conn<L> {
    pub(crate) fn new(link: L) -> Arc<Self> {
        Arc::new(Conn {
            core: Core::new(),
            link,
            closing: AtomicBool::new(false),
            reader: AtomicU8::new(READER_CALLERS),
        })
    }

    /// Give the connection a reader of its own (for the async API, where no
    /// calling thread blocks to read): a task on the current tokio runtime if
    /// there is one, else a thread.
    pub(crate) fn start_reader(self: &Arc<Self>) {
        #[cfg(feature = "tokio")]
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            match self.spawn_task_reader(&rt) {
                Ok(()) => return,
                Err(e) => tracing::debug!(error = %e, "no reader task; using a thread"),
            }
        }
        self.spawn_reader();
    }

    pub(crate) fn spawn_reader(self: &Arc<Self>) {
        self.reader.store(READER_THREAD, Ordering::Release);
        let me = self.clone();
        std::thread::Builder::new()
            .name("meshshm-reader".into())
            .spawn(move || {
                let mut rx = me.link.rx();
                while !me.closing.load(Ordering::Acquire) && me.core.dead().is_none() {
                    if let Err(e) = me.pump_once(&mut rx, None) {
                        me.fail(e);
                    }
                    // (This thread sleeps for data only: async callers waiting
                    // for room look again whenever answers came, which is
                    // when the proxy has read requests.)
                    #[cfg(feature = "tokio")]
                    me.core.room().looked();
                }
            })
            .expect("spawn the meshshm reader thread");
    }

    /// Turn this connection's receive side over to a task on the runtime
    /// `rt`: it waits on the transport's fds in the runtime's own reactor,
    /// so a response reaches its caller's task with no thread hop. If the
    /// runtime shuts down (the task is dropped), the connection is ended:
    /// the next call opens a new one.
    #[cfg(feature = "tokio")]
    pub(crate) fn spawn_task_reader(
        self: &Arc<Self>,
        rt: &tokio::runtime::Handle,
    ) -> std::io::Result<()> {
        use tokio::io::unix::AsyncFd;
        use tokio::io::Interest;
        let _in_rt = rt.enter();
        let mut fds = Vec::new();
        for fd in self.link.watch_fds() {
            // The AsyncFd owns this dup outright, so nothing else can close
            // or reuse the fd behind the registration (the I/O-safety concern
            // that deprecated the safe constructors).
            #[allow(deprecated)]
            fds.push(AsyncFd::with_interest(
                fd.try_clone_to_owned()?,
                Interest::READABLE,
            )?);
        }
        self.reader.store(READER_TASK, Ordering::Release);
        let me = self.clone();
        rt.spawn(async move {
            struct Ended<L: Link>(Arc<Conn<L>>);
            impl<L: Link> Drop for Ended<L> {
                fn drop(&mut self) {
                    self.0
                        .core
                        .kill("the async runtime reading this connection has shut down");
                }
            }
            let ended = Ended(me);
            if let Err(e) = ended.0.read_task(&fds).await {
                ended.0.fail(e);
            }
        });
        Ok(())
    }

    #[cfg(feature = "tokio")]
    async fn read_task(
        &self,
        fds: &[tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>],
    ) -> Result<()> {
        use std::task::Poll;
        loop {
            if self.closing.load(Ordering::Acquire) {
                return Ok(());
            }
            // What senders left to the connection goes first (the proxy
            // may have made room for it: that is one reason to be here).
            self.link.write_owed()?;
            let sleep = {
                let mut rx = self.link.rx();
                self.deliver_arrived(&mut rx)?;
                if self.closing.load(Ordering::Acquire) || self.core.dead().is_some() {
                    return Ok(());
                }
                self.link.sleep_begin(&mut rx, self.core.room().wanted())?
            };
            // Callers waiting for room look again: after the announcement,
            // so that room the proxy makes from now on rings this task.
            self.core.room().looked();
            if !sleep {
                // More came in: go on, but let the tasks just woken run when
                // this one has used its share.
                tokio::task::coop::consume_budget().await;
                continue;
            }
            let woke = std::future::poll_fn(|cx| {
                for (i, fd) in fds.iter().enumerate() {
                    if let Poll::Ready(r) = fd.poll_read_ready(cx) {
                        return Poll::Ready(r.map(|mut g| {
                            g.clear_ready();
                            i
                        }));
                    }
                }
                Poll::Pending
            })
            .await;
            self.link.sleep_end();
            match woke {
                Ok(0) => {}
                Ok(_) if self.link.peer_closed() => {
                    return Err(Error::ProxyGone(
                        "the proxy closed the control socket".into(),
                    ))
                }
                Ok(_) => {}
                Err(e) => return Err(Error::ProxyGone(format!("waiting for the proxy: {e}"))),
            }
        }
    }

    /// Deliver whatever responses have arrived, if no one else is reading
    /// right now (never waits).
    fn pump_now(&self) {
        let Some(mut rx) = self.link.try_rx() else {
            return;
        };
        let r = self.deliver_arrived(&mut rx);
        drop(rx);
        if let Err(e) = r {
            self.fail(e);
        }
    }

    /// Take in what has arrived (without blocking) and deliver every whole
    /// response in it.
    fn deliver_arrived(&self, rx: &mut L::Rx) -> Result<()> {
        self.take_in(rx, &mut |m| self.dispatch(m))
    }

    /// Take in what has arrived (without blocking) and hand every whole
    /// message in it to `on`.
    fn take_in(
        &self,
        rx: &mut L::Rx,
        on: &mut dyn FnMut(&mut Message<'_>) -> Result<()>,
    ) -> Result<()> {
        while self.link.receive_now(rx)? {
            self.link.drain(rx, &mut *on)?;
        }
        self.link.drain(rx, on)?;
        Ok(())
    }

    fn dispatch(&self, m: &mut Message<'_>) -> Result<()> {
        match m.kind {
            FrameKind::Response => {
                // Malformed metadata fails that one call, not the connection
                // (and with it every other call in flight).
                self.core.deliver(m.stream_id, parse_response(m));
                Ok(())
            }
            FrameKind::Goaway => {
                self.core.set_goaway();
                Ok(())
            }
            FrameKind::Pong | FrameKind::Cancel => Ok(()),
            k => Err(Error::Protocol(format!(
                "unexpected {k:?} frame on a client connection"
            ))),
        }
    }

    fn pump_once(&self, rx: &mut L::Rx, deadline: Option<Instant>) -> Result<WaitOutcome> {
        self.link.drain(rx, &mut |m| self.dispatch(m))?;
        if self.closing.load(Ordering::Acquire) {
            return Ok(WaitOutcome::Other);
        }
        self.link.wait(rx, deadline)
    }

    fn lead(&self, rx: &mut L::Rx, deadline: Option<Instant>, slot: &Slot) -> Result<()> {
        loop {
            self.link.drain(rx, &mut |m| self.dispatch(m))?;
            if slot.is_done() || self.closing.load(Ordering::Acquire) {
                return Ok(());
            }
            if self.link.wait(rx, deadline)? == WaitOutcome::TimedOut {
                return Ok(());
            }
        }
    }

    /// A blocking call made holding the receive side `rx`: its request is
    /// sent and its response read by this thread, delivering any other
    /// caller's responses on the way (as a leader does); then the receive
    /// side goes to a waiting caller, if any.
    /// `None` (nothing sent): another thread is sending, make the call the
    /// usual way.
    fn invoke_leading(
        &self,
        mut rx: MutexGuard<'_, L::Rx>,
        call: &Call<'_>,
    ) -> Option<Result<Response>> {
        if let Some(r) = self.core.dead() {
            return Some(Err(Error::ProxyGone(r.clone())));
        }
        let deadline = call.timeout.map(|t| Instant::now() + t);
        let id = self.core.solo_id();
        let mut mine: Option<Result<Response>> = None;
        let res = self.lead_solo(&mut rx, call, id, deadline, &mut mine);
        drop(rx);
        self.core.solo_done();
        self.core.handoff();
        let res = res?;
        // As for a leader's error: the connection ends, every call in
        // flight (this one too) fails with the same reason.
        let lost = |e: Error| Error::ProxyGone(self.fail(e));
        Some(match res {
            Ok(true) => mine.unwrap_or_else(|| Err(Error::Protocol("no response".into()))),
            Ok(false) => {
                // Timed out (a late response for `id` is dropped: it is in
                // no table). The Cancel goes with the receive side free, so
                // that a send waiting for room can have responses read.
                if self.core.dead().is_none() {
                    let _ = self
                        .link
                        .send(Out::empty(FrameKind::Cancel, id), &mut || self.pump_now());
                }
                Err(Error::Timeout(call.timeout.unwrap_or_default()))
            }
            Err(SoloError::Send(e)) => {
                if matches!(e, Error::ProxyGone(_)) {
                    Err(lost(e))
                } else {
                    Err(e)
                }
            }
            Err(SoloError::Link(e)) => Err(lost(e)),
        })
    }

    /// Send call `id` and read until its response is in `mine` (`true`) or
    /// the deadline passes (`false`); `None` if another thread is sending.
    fn lead_solo(
        &self,
        rx: &mut L::Rx,
        call: &Call<'_>,
        id: u64,
        deadline: Option<Instant>,
        mine: &mut Option<Result<Response>>,
    ) -> Option<std::result::Result<bool, SoloError>> {
        let mut taken_in: Result<()> = Ok(());
        let sent = META.with(|meta| {
            let mut meta = meta.borrow_mut();
            encode_request_meta(&mut meta, call);
            let out = Out {
                kind: FrameKind::Request,
                id,
                meta: &meta,
                body: call.body,
            };
            // Waiting for room: read what came meanwhile (the proxy may
            // need room for its answers before it reads on).
            let idle = &mut || {
                if taken_in.is_ok() {
                    taken_in = self.take_in(rx, &mut |m| self.solo_dispatch(id, m, mine));
                }
            };
            self.link.send_if_free(out, idle)
        })?;
        Some(self.read_solo(rx, id, deadline, mine, sent, taken_in))
    }

    fn read_solo(
        &self,
        rx: &mut L::Rx,
        id: u64,
        deadline: Option<Instant>,
        mine: &mut Option<Result<Response>>,
        sent: Result<()>,
        taken_in: Result<()>,
    ) -> std::result::Result<bool, SoloError> {
        sent.map_err(SoloError::Send)?;
        taken_in.map_err(SoloError::Link)?;
        loop {
            self.link
                .drain(rx, &mut |m| self.solo_dispatch(id, m, mine))
                .map_err(SoloError::Link)?;
            if mine.is_some() {
                return Ok(true);
            }
            if self.closing.load(Ordering::Acquire) {
                return Err(SoloError::Link(Error::ProxyGone(
                    "the connection was closed".into(),
                )));
            }
            if self.link.wait(rx, deadline).map_err(SoloError::Link)? == WaitOutcome::TimedOut {
                // (What came with the deadline is taken first.)
                self.link
                    .drain(rx, &mut |m| self.solo_dispatch(id, m, mine))
                    .map_err(SoloError::Link)?;
                return Ok(mine.is_some());
            }
        }
    }

    /// The solo call's response goes to `mine`, others' to their callers.
    fn solo_dispatch(
        &self,
        id: u64,
        m: &mut Message<'_>,
        mine: &mut Option<Result<Response>>,
    ) -> Result<()> {
        if m.kind == FrameKind::Response && m.stream_id == id {
            *mine = Some(parse_response(m));
            Ok(())
        } else {
            self.dispatch(m)
        }
    }

    /// Register a call and send its request; with `wait` false, give up
    /// (unregistered, `None`) if the ring has no room for it now.
    fn start_or_not(
        &self,
        call: &Call<'_>,
        notify: Notify,
        wait: bool,
    ) -> Result<Option<(u64, Arc<Slot>)>> {
        // A task's call leaves the rest of a message cut by a full ring to
        // the connection's reader task (its thread runs other tasks); a
        // thread waits for room itself.
        let rest = match notify {
            Notify::Task if self.reader.load(Ordering::Acquire) == READER_TASK => Rest::Owe,
            _ => Rest::Wait,
        };
        let (id, slot) = self.core.register(notify)?;
        let sent = META.with(|m| {
            let mut m = m.borrow_mut();
            encode_request_meta(&mut m, call);
            let idle = &mut || self.pump_now();
            let out = Out {
                kind: FrameKind::Request,
                id,
                meta: &m,
                body: call.body,
            };
            if wait {
                self.link.send(out, idle).map(|()| true)
            } else {
                self.link.try_send(out, idle, rest)
            }
        });
        match sent {
            Ok(true) => Ok(Some((id, slot))),
            Ok(false) => {
                self.core.forget(id);
                Ok(None)
            }
            Err(e) => {
                self.core.forget(id);
                if matches!(e, Error::ProxyGone(_)) {
                    self.fail(e.clone());
                }
                Err(e)
            }
        }
    }

    /// End the connection: every call in flight fails with the reason,
    /// which is returned.
    fn fail(&self, e: Error) -> String {
        let reason = match e {
            Error::ProxyGone(r) => r,
            other => other.to_string(),
        };
        tracing::warn!(transport = self.link.name(), %reason, "meshshm connection lost");
        self.core.kill(&reason);
        reason
    }
}

impl<L: Link> AnyConn for Conn<L> {
    fn transport(&self) -> &'static str {
        self.link.name()
    }

    fn peer_closed(&self) -> bool {
        let gone = self.link.peer_closed();
        if gone {
            self.fail(Error::ProxyGone(
                "the proxy closed the control socket".into(),
            ));
        }
        gone
    }

    fn accepting(&self) -> bool {
        self.core.accepting() && !self.closing.load(Ordering::Acquire)
    }

    fn start(&self, call: &Call<'_>, notify: Notify) -> Result<(u64, Arc<Slot>)> {
        self.start_or_not(call, notify, true)
            .map(|s| s.expect("a waiting start always sends"))
    }

    fn try_start(&self, call: &Call<'_>, notify: Notify) -> Result<Option<(u64, Arc<Slot>)>> {
        self.start_or_not(call, notify, false)
    }

    fn want_room(&self) {
        self.link.want_room();
    }

    fn core(&self) -> &Core {
        &self.core
    }

    fn invoke(&self, call: &Call<'_>) -> Result<Response> {
        // Nobody reading responses now (one thread calling, the usual
        // case): read ours ourselves, with no slot to register, complete
        // and take, and no thread handle.
        if self.reader.load(Ordering::Acquire) == READER_CALLERS {
            if let Some(rx) = self.link.try_rx() {
                if let Some(r) = self.invoke_leading(rx, call) {
                    return r;
                }
            }
        }
        let deadline = call.timeout.map(|t| Instant::now() + t);
        let (id, slot) = self.start(call, Notify::Thread(std::thread::current()))?;
        loop {
            if let Some(r) = slot.take() {
                return r;
            }
            let reader = self.reader.load(Ordering::Acquire);
            let lead = if reader == READER_CALLERS {
                self.link.try_rx()
            } else {
                None
            };
            if let Some(mut rx) = lead {
                let res = self.lead(&mut rx, deadline, &slot);
                drop(rx);
                self.core.handoff();
                if let Err(e) = res {
                    self.fail(e);
                }
            } else {
                let task_reader = reader == READER_TASK;
                if task_reader {
                    self.pump_now();
                }
                for _ in 0..64 {
                    if slot.is_done() {
                        break;
                    }
                    std::hint::spin_loop();
                }
                if !slot.is_done() {
                    // Woken by delivery or by the leader's hand-off; the cap
                    // bounds the cost of a hand-off that raced with our park
                    // (and, with a task reader that may be waiting for this
                    // thread, how long until we read for ourselves again).
                    let mut t = if task_reader {
                        Duration::from_micros(200)
                    } else {
                        Duration::from_millis(5)
                    };
                    if let Some(d) = deadline {
                        t = t.min(d.saturating_duration_since(Instant::now()));
                    }
                    std::thread::park_timeout(t);
                }
            }
            if slot.is_done() {
                continue;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) && self.core.forget(id) {
                self.cancel(id);
                return Err(Error::Timeout(call.timeout.unwrap_or_default()));
            }
        }
    }

    fn cancel(&self, id: u64) {
        self.core.forget(id);
        if self.core.dead().is_some() {
            return;
        }
        let cancel = Out::empty(FrameKind::Cancel, id);
        // A reader task writes it later if the ring is full now: a dropped
        // future must not hold up its thread.
        let _ = if self.reader.load(Ordering::Acquire) == READER_TASK {
            self.link.send_or_owe(cancel)
        } else {
            self.link.send(cancel, &mut || self.pump_now())
        };
    }

    fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.link.interrupt();
    }

    fn in_flight(&self) -> usize {
        self.core.in_flight()
    }
}

/// Refuse a message above the connection's maximum before writing any of it.
pub(crate) fn check_size(len: usize, max: usize) -> Result<()> {
    if len > max {
        return Err(Error::InvalidArgument(format!(
            "message of {len} bytes exceeds the maximum of {max}"
        )));
    }
    Ok(())
}

/// The lock if free now (a poisoned lock is still usable: its state is a
/// ring position, consistent between operations).
pub(crate) fn try_lock<T>(m: &std::sync::Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

pub(crate) fn parse_response(m: &mut Message<'_>) -> Result<Response> {
    let meta = ResponseMeta::decode(m.meta())
        .map_err(|e| Error::Protocol(format!("response metadata: {e}")))?;
    let (status, message, headers) = (meta.status, meta.message.to_owned(), meta.headers.to_vec());
    Ok(Response {
        status,
        message,
        headers,
        // (A fragmented answer's body is handed over, not copied again.)
        body: m.take_body(),
    })
}

impl Response {
    /// The body if the status is OK, else the status as an error.
    ///
    /// # Errors
    /// [`Error::Status`] for a non-OK status.
    pub fn into_result(self) -> Result<Vec<u8>> {
        if self.status == status::OK {
            Ok(self.body)
        } else {
            Err(Error::Status {
                code: self.status,
                message: self.message,
            })
        }
    }
}
