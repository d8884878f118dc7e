//! Shared-memory sessions: the control-socket handshake, then one future per
//! session (`Session::run`) that services its rings.
//!
//! While traffic flows the session makes no syscall per message: it reads
//! every frame the app published, answers inline where it can (echo),
//! publishes its answers with one store, and rings the app's doorbell only
//! if the app said it sleeps. When idle it polls for up to `spin_us` (all of
//! it while requests come during the poll, less as idle spells outlast it:
//! `shm.spin_adaptive`), then announces sleep and waits on its eventfd (plus
//! the control socket, for the app's death, and its completion channels).
//!
//! Where the session runs and how it sleeps depends on `shm.waiter`
//! ([`start_waiter`]):
//! - `io_uring`: on one of a fixed set of shm driver threads
//!   ([`crate::driver`]), each a small executor that sleeps in one
//!   `io_uring_enter` holding a multishot poll of each session's doorbell
//!   eventfd, a poll of each control socket, and a poll of its own eventfd
//!   (rung by wakers from other threads: forwarded-request completions,
//!   channels, timers). A doorbell wakes the driver thread directly: no
//!   tokio park/driver/scheduler on the way.
//! - `epoll`: as a tokio task, the eventfd and the control socket
//!   registered with tokio's reactor (`AsyncFd`, edge-triggered).
//!
//! Either way echo is answered inline, other upstreams run as tokio tasks,
//! and a session yields to the others of its thread every 50 µs.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshshm_proto::{
    frame_control, peer_credentials, send_with_fds, status, Answer, Hello, PeerCred, Reject,
    ResponseMeta, Role, Welcome, MAX_CONTROL, PROTOCOL_VERSION,
};
use meshshm_ring::{
    next_frame_len, next_streamed_frame_len, write_message, write_message_streamed, Bell, Endpoint,
    FrameKind, Reassembler, RingError, Segment, SegmentOptions, Side, WriteProgress, FLAG_CONT,
    FLAG_MORE,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

use crate::dispatch::{complete, handle_request, InFlight, Inbound, Outcome};
use crate::gov::Tally;
use crate::router::{Forward, LocalTx, Resp};
use crate::Shared;

/// Echo answers of one pass are published (and the app rung if it sleeps)
/// each time this many bytes of them, or this many answers, wait
/// unpublished (see `Session::read_incoming`).
const PUBLISH_EVERY: usize = 16 << 10;
const PUBLISH_EVERY_N: usize = 16;

/// Choose how shm sessions wait (`shm.waiter`) and start the driver
/// threads if io_uring: `Ok(None)` = epoll (tokio tasks). `auto` falls back
/// to epoll with one log line saying why; a forced `io_uring` that the
/// kernel refuses is an error.
pub fn start_waiter(
    cfg: &crate::config::Config,
    rt: &tokio::runtime::Handle,
) -> Result<Option<crate::driver::Drivers>, String> {
    let want = cfg.shm.waiter.as_str();
    if want == "epoll" {
        tracing::info!("shm waiter: epoll (one tokio task per session)");
        return Ok(None);
    }
    if let Err(why) = meshshm_ring::uring::Uring::probe() {
        if want == "io_uring" {
            return Err(format!("shm.waiter = \"io_uring\": {why}"));
        }
        tracing::warn!(reason = %why, "shm waiter: io_uring not usable here; falling back to epoll");
        return Ok(None);
    }
    let n = if cfg.shm.drivers == 0 {
        cfg.runtime.threads
    } else {
        cfg.shm.drivers
    };
    let d = crate::driver::Drivers::start(n, rt.clone())
        .map_err(|e| format!("starting the shm driver threads: {e}"))?;
    tracing::info!(
        threads = d.len(),
        "shm waiter: io_uring (shm driver threads)"
    );
    Ok(Some(d))
}

/// How a sleeping session waits for its doorbell and its control socket.
enum Waits {
    /// tokio's reactor (epoll): the eventfd edge-triggered, no drain read.
    Epoll {
        bell: AsyncFd<OwnedFd>,
        ctl: UnixStream,
    },
    /// The driver thread's io_uring: a multishot poll of the eventfd
    /// (edge-triggered, no drain read) and a poll of the control socket.
    Uring {
        bell: crate::driver::Watched,
        ctl_watch: crate::driver::Watched,
        ctl: Arc<std::os::unix::net::UnixStream>,
    },
}

impl Waits {
    fn epoll(ep: &Endpoint, ctl: UnixStream) -> std::io::Result<Waits> {
        let bell_fd = ep
            .waiter
            .bell()
            .fd()
            .ok_or_else(|| std::io::Error::other("not an eventfd bell"))?
            .try_clone_to_owned()?;
        // The AsyncFd owns this dup of the eventfd outright, so nothing else
        // can close or reuse the fd behind the registration (the I/O-safety
        // concern that deprecated `AsyncFd::new` in favour of an unsafe fn).
        #[allow(deprecated)]
        let bell = AsyncFd::new(bell_fd)?;
        Ok(Waits::Epoll { bell, ctl })
    }

    /// The watches share the eventfd and the control socket with the
    /// session (no dup: a session holds the same fds as during its
    /// handshake).
    fn uring(
        io: &crate::driver::Io,
        bell: Arc<OwnedFd>,
        ctl: std::os::unix::net::UnixStream,
    ) -> std::io::Result<Waits> {
        use meshshm_ring::uring::WatchKind;
        let ctl = Arc::new(ctl);
        let bell = io.watch(bell, WatchKind::Rung)?;
        let ctl_watch = io.watch(ctl.clone(), WatchKind::Poll)?;
        Ok(Waits::Uring {
            bell,
            ctl_watch,
            ctl,
        })
    }

    /// The doorbell rang (`Ok(true)`), or a spurious wake-up; `Err` ends
    /// the session.
    async fn bell(&self) -> Result<bool, String> {
        match self {
            Waits::Epoll { bell, .. } => {
                // No drain read: tokio (mio) registers the eventfd
                // edge-triggered and every ring is a new edge, so the
                // counter is left to grow (2^64 rings from now).
                match bell.readable().await {
                    Ok(mut g) => {
                        g.clear_ready();
                        Ok(true)
                    }
                    Err(_) => Ok(false),
                }
            }
            // A multishot poll, edge-triggered: like epoll, no drain read.
            Waits::Uring { bell, .. } => match bell.ready().await {
                r if r > 0 => Ok(true),
                0 => Ok(false),
                r if [libc_errno::EAGAIN, libc_errno::EINTR, libc_errno::ECANCELED]
                    .contains(&-r) =>
                {
                    Ok(false)
                }
                r => Err(format!(
                    "waiting for the doorbell: {}",
                    std::io::Error::from_raw_os_error(-r)
                )),
            },
        }
    }

    /// The control socket became readable: why the session ends, if it does.
    async fn ctl(&self) -> Option<String> {
        let mut b = [0u8; 64];
        let (r, read) = match self {
            Waits::Epoll { ctl, .. } => {
                let r = ctl.readable().await;
                (r, ctl.try_read(&mut b))
            }
            Waits::Uring { ctl_watch, ctl, .. } => {
                let r = ctl_watch.ready().await;
                if r < 0 && -r != libc_errno::ECANCELED && -r != libc_errno::EINTR {
                    return Some(format!(
                        "control socket: {}",
                        std::io::Error::from_raw_os_error(-r)
                    ));
                }
                (Ok(()), (&**ctl).read(&mut b))
            }
        };
        match (r, read) {
            (Ok(()), Ok(0)) => Some("app closed the control socket".to_owned()),
            (Ok(()), Ok(_)) => Some("unexpected bytes on the control socket".to_owned()),
            (_, Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            (_, Err(e)) => Some(format!("control socket: {e}")),
            (Err(e), _) => Some(format!("control socket: {e}")),
        }
    }
}

/// errno values the io_uring waits report (negated) that only mean "look again".
mod libc_errno {
    pub(super) use nix::libc::{EAGAIN, ECANCELED, EINTR};
}

/// Run one control connection: handshake, then the session.
pub async fn serve(sh: Arc<Shared>, mut s: UnixStream, id: u64, shutdown: watch::Receiver<bool>) {
    let cred = match peer_credentials(s.as_fd()) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(session = id, error = %e, "no peer credentials; closing");
            return;
        }
    };
    let handshake = Duration::from_millis(sh.cfg.listen.handshake_timeout_ms);
    let hello = match tokio::time::timeout(handshake, read_hello(&mut s)).await {
        Ok(Ok(h)) => h,
        Ok(Err(reason)) => {
            tracing::warn!(session = id, pid = cred.pid, uid = cred.uid, %reason, "handshake refused");
            reject(&s, &reason).await;
            return;
        }
        Err(_) => {
            tracing::warn!(session = id, pid = cred.pid, "handshake timed out");
            return;
        }
    };
    let allowed = &sh.cfg.listen.allowed_uids;
    let refusal = if !allowed.is_empty() && !allowed.contains(&cred.uid) {
        Some(format!("uid {} may not connect to this proxy", cred.uid))
    } else if hello.role == Role::Server && !sh.router.may_serve(cred.uid, &hello.service) {
        Some(format!(
            "uid {} may not serve service {:?}",
            cred.uid, hello.service
        ))
    } else {
        None
    };
    if let Some(reason) = refusal {
        tracing::warn!(session = id, pid = cred.pid, uid = cred.uid, gid = cred.gid, %reason, "access refused");
        reject(&s, &reason).await;
        return;
    }
    // Tokens (access.identity.tokens) prove the identity the Hello names.
    let peer = match sh.gov.peer_shm(cred.uid, &hello.service, &hello.token) {
        Ok(p) => p,
        Err(reason) => {
            tracing::warn!(session = id, pid = cred.pid, uid = cred.uid, %reason, "access refused");
            reject(&s, &reason).await;
            return;
        }
    };
    // A server is routable before its Welcome goes out: once `bind`
    // returns in the app, calls to its service reach it.
    let fwd_rx = (hello.role == Role::Server && !hello.service.is_empty()).then(|| {
        let (fwd, rx) = mpsc::channel(1024);
        let (cancel, cancel_rx) = mpsc::unbounded_channel();
        sh.router
            .register_local(&hello.service, id, LocalTx { fwd, cancel });
        (rx, cancel_rx)
    });
    let ep = match welcome(&sh, &s, id, &hello).await {
        Ok(ep) => ep,
        Err(reason) => {
            if fwd_rx.is_some() {
                sh.router.unregister_local(&hello.service, id);
            }
            tracing::warn!(session = id, pid = cred.pid, %reason, "session setup failed");
            reject(&s, &reason).await;
            return;
        }
    };
    tracing::info!(
        session = id, pid = cred.pid, uid = cred.uid, gid = cred.gid,
        role = ?hello.role, service = %hello.service,
        "shm session up"
    );
    let session = Session::new(sh.clone(), ep, id, cred, &hello, fwd_rx, peer);
    let reason = match &sh.drivers {
        None => match Waits::epoll(&session.ep, s) {
            Ok(w) => session.run(w, shutdown).await,
            Err(e) => format!("registering the doorbell: {e}"),
        },
        Some(drivers) => {
            // Hand the session to a driver thread; this task only waits for
            // its end (for the listener's count and shutdown drain).
            let fds = |s: UnixStream| -> std::io::Result<_> {
                let Bell::EventFd(bell) = session.ep.waiter.bell().clone() else {
                    return Err(std::io::Error::other("not an eventfd doorbell"));
                };
                Ok((s.into_std()?, bell))
            };
            let (tx, rx) = oneshot::channel::<String>();
            match fds(s) {
                Ok((ctl, bell)) => {
                    drivers.spawn(Box::new(move |io| {
                        Box::pin(async move {
                            let mut tx = tx;
                            let waits = match Waits::uring(&io, bell, ctl) {
                                Ok(w) => w,
                                Err(e) => {
                                    let _ = tx.send(format!("registering the doorbell: {e}"));
                                    return;
                                }
                            };
                            tokio::select! {
                                r = session.run(waits, shutdown) => {
                                    let _ = tx.send(r);
                                }
                                // The listener gave up on the session (shutdown grace over).
                                _ = tx.closed() => {}
                            }
                        })
                    }));
                    rx.await
                        .unwrap_or_else(|_| "the shm driver thread dropped the session".into())
                }
                Err(e) => format!("handing over the session: {e}"),
            }
        }
    };
    tracing::info!(session = id, pid = cred.pid, uid = cred.uid, gid = cred.gid, %reason, "shm session closed");
}

async fn read_hello(s: &mut UnixStream) -> Result<Hello, String> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)
        .await
        .map_err(|e| format!("reading hello: {e}"))?;
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_CONTROL {
        return Err(format!("hello of {n} bytes is too large"));
    }
    let mut body = vec![0u8; n];
    s.read_exact(&mut body)
        .await
        .map_err(|e| format!("reading hello: {e}"))?;
    Hello::decode(&body).map_err(|e| format!("{e}"))
}

async fn send_control(
    s: &UnixStream,
    body: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> std::io::Result<()> {
    let msg = frame_control(body);
    loop {
        s.writable().await?;
        match s.try_io(Interest::WRITABLE, || send_with_fds(s.as_fd(), &msg, fds)) {
            Ok(n) if n == msg.len() => return Ok(()),
            Ok(_) => return Err(std::io::Error::other("short write of a control message")),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn reject(s: &UnixStream, reason: &str) {
    let _ = send_control(
        s,
        &Reject {
            reason: reason.to_owned(),
        }
        .encode(),
        &[],
    )
    .await;
}

fn ring_size(requested: u64, default: u64, max: u64) -> u64 {
    if requested == 0 {
        default
    } else {
        requested
            .clamp(meshshm_ring::MIN_CAPACITY as u64, max)
            .next_power_of_two()
            .min(max)
    }
}

async fn welcome(sh: &Shared, s: &UnixStream, id: u64, h: &Hello) -> Result<Endpoint, String> {
    let c = &sh.cfg.shm;
    if h.role == Role::Server && h.service.is_empty() {
        return Err("a server must name the service it serves".into());
    }
    let up = ring_size(h.ring_up, c.ring_size, c.max_ring_size);
    let down = ring_size(h.ring_down, c.ring_size, c.max_ring_size);
    let mut seg = Segment::create(&SegmentOptions {
        app_to_proxy: up as usize,
        proxy_to_app: down as usize,
        max_message: c.max_message,
        backing: sh.cfg.backing(),
    })
    .map_err(|e| format!("creating the segment: {e}"))?;
    let app_bell = Bell::eventfd().map_err(|e| format!("eventfd: {e}"))?;
    let proxy_bell = Bell::eventfd().map_err(|e| format!("eventfd: {e}"))?;
    let w = Welcome {
        session_id: id,
        ring_up: up,
        ring_down: down,
        max_message: c.max_message,
    };
    debug_assert_eq!(Answer::decode(&w.encode()), Ok(Answer::Welcome(w)));
    let fds = [
        seg.fd(),
        app_bell.fd().expect("eventfd bell"),
        proxy_bell.fd().expect("eventfd bell"),
    ];
    send_control(s, &w.encode(), &fds)
        .await
        .map_err(|e| format!("sending welcome: {e}"))?;
    // The app holds the fd now (in flight or received): the name can go.
    seg.unlink();
    let _ = PROTOCOL_VERSION;
    Ok(seg.into_endpoint(Side::Proxy, proxy_bell, app_bell))
}

struct OutMsg {
    kind: FrameKind,
    id: u64,
    meta: Vec<u8>,
    body: Vec<u8>,
    progress: WriteProgress,
}

impl Drop for Session {
    fn drop(&mut self) {
        // What a session that ended mid-pass counted.
        self.sh.gov.flush(&mut self.tally);
    }
}

struct Session {
    sh: Arc<Shared>,
    ep: Endpoint,
    id: u64,
    cred: PeerCred,
    /// Who the app is, for governance (uid, verified identity).
    peer: crate::gov::Peer,
    role: Role,
    service: String,
    reasm: Reassembler,
    out: VecDeque<OutMsg>,
    out_bytes: usize,
    /// The request at the head of the app's ring waits for room for its
    /// answer's first frame, of this many bytes, in the other ring.
    stalled: Option<usize>,
    done_tx: crate::dispatch::Done,
    done_rx: mpsc::UnboundedReceiver<(u64, tokio::task::Id, Resp)>,
    inflight: InFlight,
    /// Metrics counted by this session, added to the shared ones before
    /// its answers are published (crate::gov::Tally).
    tally: Tally,
    /// Request metadata copied out of shared memory before it is parsed.
    meta_buf: Vec<u8>,
    // Server role: requests forwarded to this app, awaiting its responses
    // (keyed by `Forward::key`, the stream id the app sees), and the keys
    // of forwards whose caller stopped waiting.
    fwd_rx: Option<mpsc::Receiver<Forward>>,
    cancel_rx: Option<mpsc::UnboundedReceiver<u64>>,
    waiting: HashMap<u64, oneshot::Sender<Resp>>,
    /// Forwards cancelled because their caller stopped waiting.
    cancelled: u64,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    fn new(
        sh: Arc<Shared>,
        ep: Endpoint,
        id: u64,
        cred: PeerCred,
        h: &Hello,
        fwd: Option<(mpsc::Receiver<Forward>, mpsc::UnboundedReceiver<u64>)>,
        peer: crate::gov::Peer,
    ) -> Session {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let max = ep.max_message as usize;
        let (fwd_rx, cancel_rx) = fwd.map_or((None, None), |(f, c)| (Some(f), Some(c)));
        Session {
            sh,
            ep,
            id,
            cred,
            peer,
            role: h.role,
            service: h.service.clone(),
            reasm: Reassembler::new(max),
            out: VecDeque::new(),
            out_bytes: 0,
            stalled: None,
            done_tx,
            done_rx,
            inflight: InFlight::default(),
            tally: Tally::default(),
            meta_buf: Vec::new(),
            fwd_rx,
            cancel_rx,
            waiting: HashMap::new(),
            cancelled: 0,
        }
    }

    fn enqueue(&mut self, kind: FrameKind, id: u64, meta: Vec<u8>, body: Vec<u8>) {
        self.out_bytes += meta.len() + body.len();
        self.out.push_back(OutMsg {
            kind,
            id,
            meta,
            body,
            progress: WriteProgress { sent: 0 },
        });
    }

    /// Publish what was written and released (the metrics of the answers
    /// first), ringing the app as `Endpoint::flush` does.
    fn publish(&mut self) {
        self.sh.gov.flush(&mut self.tally);
        self.ep.flush();
    }

    /// Write queued messages into the ring while it has room.
    fn flush_out(&mut self) -> Result<bool, RingError> {
        let mut any = false;
        while let Some(m) = self.out.front_mut() {
            let before = m.progress.sent;
            let done = write_message(
                &mut self.ep.tx,
                m.kind,
                m.id,
                m.meta.len(),
                &[&m.meta, &m.body],
                &mut m.progress,
            )?;
            any |= m.progress.sent != before || done;
            if !done {
                break;
            }
            let m = self.out.pop_front().expect("front exists");
            self.out_bytes -= m.meta.len() + m.body.len();
        }
        Ok(any)
    }

    /// Whatever waits to go to the app — the next frame of the first queued
    /// answer, else the answer a stalled request needs — has room now?
    /// Polled before sleeping (without it, a session that polls would poll
    /// its whole `spin_us` for each fragment of a large answer) and checked
    /// again after announcing sleep, so that room made just before is not
    /// missed. (The check may stage a pad to the end of the ring, which must
    /// reach the app for the room behind it to come.)
    fn room_for_waiting(&mut self) -> bool {
        let need = match (self.out.front(), self.stalled) {
            (Some(m), _) => {
                next_frame_len(&self.ep.tx, m.meta.len() + m.body.len(), m.progress.sent)
            }
            (None, Some(need)) => need,
            (None, None) => return false,
        };
        let fits = self.ep.tx.fits_now(need).unwrap_or(true);
        if !fits {
            self.publish();
        }
        fits
    }

    /// Too much queued towards the app: stop adding to it.
    fn backlogged(&self) -> bool {
        self.out_bytes > 4 * self.ep.tx.capacity()
    }

    /// Whether to stop reading the app's ring (backpressure). A client's
    /// ring carries requests: pause while too many are in flight or too
    /// much waits to go back. A server's ring carries the responses that
    /// drain its queue: never pause it (that could deadlock with an app
    /// blocked writing a response); its intake of forwards waits instead.
    fn paused(&self) -> bool {
        match self.role {
            Role::Client => {
                self.stalled.is_some()
                    || self.inflight.len() >= self.sh.cfg.shm.max_in_flight
                    || self.inflight.bytes() + self.out_bytes >= self.sh.cfg.shm.max_buffered
                    || self.backlogged()
            }
            Role::Server => false,
        }
    }

    /// Whether a server session takes more forwarded requests now.
    fn intake_open(&self) -> bool {
        self.fwd_rx.is_some()
            && self.waiting.len() < self.sh.cfg.shm.max_in_flight
            && !self.backlogged()
    }

    /// Read and handle what the app published. Returns frames consumed.
    ///
    /// (`PUBLISH_EVERY`: 1 KiB, 128 in flight through a `Pipeline`, 2
    /// rounds: publishing only at the end of the pass, shm-block 806–872k
    /// req/s; every 16 KiB 2.60–2.84M; every answer 2.14–2.22M; every 64 KiB
    /// 1.50M. Spinning: 2.1–2.2M, 2.9–3.3M, 1.5–1.6M, 3.1–3.3M. By bytes
    /// alone, 64 B answers went at the end of the pass only: 64 B ×128
    /// shm-block 1.10–1.14M; also every 8, 16, 32 answers: 2.96–3.16M,
    /// 3.11–3.29M, 3.19–3.25M, and 1 KiB unchanged.)
    fn read_incoming(&mut self) -> Result<usize, String> {
        let mut n = 0;
        let mut arrived = None;
        // Whether this pass has published an answer yet.
        let mut rang = false;
        // Echo answers written since the last publish.
        let mut unpub = 0usize;
        while n < 1024 {
            let Some(f) = self.ep.rx.peek().map_err(|e| e.to_string())? else {
                break;
            };
            let h = *f.header();
            let m = match self.reasm.feed(&h, f.payload()) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    f.release();
                    n += 1;
                    continue;
                }
                Err(e) => return Err(e.to_string()),
            };
            match (m.kind, self.role) {
                (FrameKind::Request, Role::Client) => {
                    // Backpressure without copies: a request read in place is
                    // taken only while an answer of its size could go straight
                    // into the app's ring. Otherwise it stays in the app's ring
                    // (the app then waits for room there) instead of being
                    // answered into a queue.
                    let in_place = h.flags & (FLAG_MORE | FLAG_CONT) == 0;
                    if in_place {
                        // (The answer's first frame: all of it, or its first
                        // fragment when it is too large for one.)
                        let reply = ResponseMeta::OK.len() + m.body().len();
                        let first = next_streamed_frame_len(&self.ep.tx, reply, 0);
                        let fits = self.out.is_empty()
                            && self.ep.tx.fits_now(first).map_err(|e| e.to_string())?;
                        if !fits {
                            self.stalled = Some(first);
                            break;
                        }
                    }
                    // Parsed bytes are copied out of shared memory first: the
                    // app could change them between the check and the use.
                    self.meta_buf.clear();
                    self.meta_buf.extend_from_slice(m.meta());
                    let arrived = *arrived.get_or_insert_with(Instant::now);
                    match handle_request(
                        &self.sh,
                        &mut self.tally,
                        &self.peer,
                        Inbound {
                            stream_id: m.stream_id,
                            meta: &self.meta_buf,
                            body: m.body(),
                            arrived,
                        },
                        &self.done_tx,
                        &mut self.inflight,
                    ) {
                        Outcome::Echo => {
                            let ok = &ResponseMeta::OK;
                            let mut p = WriteProgress { sent: 0 };
                            // A large answer streams: the app reads each
                            // fragment while the next is written.
                            let peer = &self.ep.peer;
                            let done = self.out.is_empty()
                                && write_message_streamed(
                                    &mut self.ep.tx,
                                    FrameKind::Response,
                                    m.stream_id,
                                    ok.len(),
                                    &[ok, m.body()],
                                    &mut p,
                                    &mut |tx| {
                                        if tx.publish() {
                                            peer.notify();
                                        }
                                    },
                                )
                                .map_err(|e| e.to_string())?;
                            // The first answer of a pass is published (and
                            // the app rung if it sleeps) at once: the app's
                            // wake-up, which takes longer than the rest of
                            // the pass here, overlaps it (1 KiB, 16 in
                            // flight: +6..18% req/s). The others go each
                            // time PUBLISH_EVERY bytes or PUBLISH_EVERY_N
                            // answers of them wait, so that
                            // an app that keeps sending reads answers while
                            // the pass goes on, instead of waiting for its
                            // end (and sleeping meanwhile).
                            unpub += done as usize;
                            if done
                                && (!rang
                                    || self.ep.tx.unpublished() >= PUBLISH_EVERY
                                    || unpub >= PUBLISH_EVERY_N)
                            {
                                unpub = 0;
                                rang = true;
                                // (The answers' metrics first.)
                                self.sh.gov.flush(&mut self.tally);
                                if self.ep.tx.publish() {
                                    self.ep.peer.notify();
                                }
                            }
                            if !done {
                                self.out_bytes += ok.len() + m.body().len();
                                self.out.push_back(OutMsg {
                                    kind: FrameKind::Response,
                                    id: m.stream_id,
                                    meta: ok.to_vec(),
                                    body: m.body().to_vec(),
                                    progress: p,
                                });
                            }
                        }
                        Outcome::Reply(r) => {
                            let sid = m.stream_id;
                            f.release();
                            self.enqueue(FrameKind::Response, sid, r.meta, r.body);
                            n += 1;
                            continue;
                        }
                        Outcome::Spawned => {}
                        Outcome::Reused => {
                            return Err(format!(
                                "stream id {} reused while its request is in flight",
                                m.stream_id
                            ))
                        }
                    }
                }
                (FrameKind::Response, Role::Server) => {
                    if let Some(tx) = self.waiting.remove(&m.stream_id) {
                        let _ = tx.send(Resp {
                            meta: m.meta().to_vec(),
                            body: m.body().to_vec(),
                        });
                    }
                }
                (FrameKind::Cancel, _) => {
                    if let Some(h) = self.inflight.remove(m.stream_id) {
                        h.abort();
                    }
                }
                (FrameKind::Ping, _) => {
                    // Best effort: no answer while the app leaves its
                    // answers unread (a server's ring is never paused).
                    if self.out_bytes <= 4 * self.ep.tx.capacity() {
                        let (sid, data) = (m.stream_id, m.to_vec());
                        f.release();
                        self.enqueue(FrameKind::Pong, sid, Vec::new(), data);
                        n += 1;
                        continue;
                    }
                }
                (FrameKind::Pong | FrameKind::Goaway, _) => {}
                (k, r) => return Err(format!("unexpected {k:?} frame from a {r:?} app")),
            }
            f.release();
            n += 1;
            if self.ep.rx.unpublished() >= self.ep.rx.capacity() / 4 {
                self.publish();
            }
            if self.paused() {
                break;
            }
        }
        Ok(n)
    }

    fn take_completions(&mut self) -> bool {
        let mut any = false;
        while let Ok((sid, task, r)) = self.done_rx.try_recv() {
            if complete(&mut self.inflight, sid, task) {
                self.enqueue(FrameKind::Response, sid, r.meta, r.body);
                any = true;
            }
        }
        while let Some(key) = self.cancel_rx.as_mut().and_then(|c| c.try_recv().ok()) {
            self.cancel_forward(key);
            any = true;
        }
        while self.intake_open() {
            match self.fwd_rx.as_mut().map(|rx| rx.try_recv()) {
                Some(Ok(f)) => {
                    self.forward(f);
                    any = true;
                }
                _ => break,
            }
        }
        any
    }

    fn forward(&mut self, f: Forward) {
        // Its caller stopped waiting before we took it: do not pass it on.
        if f.reply.is_closed() {
            return;
        }
        let mut meta = f.meta;
        crate::router::patch_timeout(&mut meta, f.deadline);
        self.waiting.insert(f.key, f.reply);
        self.enqueue(FrameKind::Request, f.key, meta, f.body);
    }

    /// The caller of forward `key` stopped waiting: drop the request if it
    /// is still queued here, else tell the server app to cancel it.
    fn cancel_forward(&mut self, key: u64) {
        if self.waiting.remove(&key).is_none() {
            return;
        }
        self.cancelled += 1;
        let queued = self
            .out
            .iter()
            .position(|m| m.kind == FrameKind::Request && m.id == key && m.progress.sent == 0);
        match queued {
            Some(i) => {
                let m = self.out.remove(i).expect("index from position");
                self.out_bytes -= m.meta.len() + m.body.len();
            }
            None => self.enqueue(FrameKind::Cancel, key, Vec::new(), Vec::new()),
        }
    }

    /// One pass over everything that may need doing; true if anything moved.
    fn step(&mut self) -> Result<bool, String> {
        if crate::metrics::fill_due() {
            self.sh.gov.metrics.sample_ring_fill(&self.ep);
        }
        let mut any = self.flush_out().map_err(|e| e.to_string())?;
        // Stalled on room for an answer: look again once nothing is queued
        // ahead of it (read_incoming checks the room and may stall again).
        if self.out.is_empty() {
            self.stalled = None;
        }
        any |= self.take_completions();
        if !self.paused() {
            any |= self.read_incoming()? > 0;
        }
        any |= self.flush_out().map_err(|e| e.to_string())?;
        self.publish();
        Ok(any)
    }

    fn has_work(&mut self) -> bool {
        (!self.paused() && self.ep.rx.has_data().unwrap_or(true))
            // (The first test keeps the polling loop's usual case, nothing
            // waiting, inline: calling out for it cost 2..10% req/s spinning.)
            || ((!self.out.is_empty() || self.stalled.is_some()) && self.room_for_waiting())
            || !self.done_rx.is_empty()
            || self.cancel_rx.as_ref().is_some_and(|r| !r.is_empty())
            || (self.intake_open() && self.fwd_rx.as_ref().is_some_and(|r| !r.is_empty()))
    }

    async fn run(mut self, waits: Waits, mut shutdown: watch::Receiver<bool>) -> String {
        // Polling time before a sleep, in µs, following the load
        // (meshshm_ring::IdlePoll; shm.spin_adaptive), longer after a large
        // answer, whose next request cannot come before the app copied it.
        let spin = meshshm_ring::IdlePoll::new(
            u32::try_from(self.sh.cfg.shm.spin_us).unwrap_or(u32::MAX),
            self.sh.cfg.shm.spin_adaptive,
        );
        let mut draining = false;
        // Yield to the other sessions of this worker at most every SLICE:
        // a tokio yield may poll the I/O driver (a syscall), so yielding per
        // batch or per poll would put a syscall on the hot path. The clock
        // is read when the session goes idle, every 64 polls after that, and
        // every 8th step in a row with work, never between a request's
        // arrival and its answer (each read costs ~20 ns; with one request
        // in flight, steps and idle spells alternate).
        const SLICE: Duration = Duration::from_micros(50);
        let mut slice_start = Instant::now();
        let mut busy_steps = 0u32;
        let reason = loop {
            match self.step() {
                Ok(true) => {
                    busy_steps = busy_steps.wrapping_add(1);
                    if busy_steps % 8 == 0 && slice_start.elapsed() >= SLICE {
                        tokio::task::yield_now().await;
                        slice_start = Instant::now();
                    }
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(session = self.id, pid = self.cred.pid, error = %e, "closing session: protocol violation");
                    break e;
                }
            }
            if draining
                && self.inflight.is_empty()
                && self.out.is_empty()
                && self.waiting.is_empty()
            {
                break "shutdown".to_owned();
            }
            // Idle: poll for a while (in slices, yielding between them).
            let mut now = Instant::now();
            if now.duration_since(slice_start) >= SLICE {
                tokio::task::yield_now().await;
                now = Instant::now();
                slice_start = now;
            }
            let plan = spin.start(self.ep.tx.bytes_sent());
            let poll_for = Duration::from_micros(plan.budget_us.into());
            let t0 = now;
            let mut polled = Duration::ZERO;
            let mut woke = false;
            'spin: while polled < poll_for {
                for _ in 0..64 {
                    if self.has_work() {
                        woke = true;
                        break 'spin;
                    }
                    std::hint::spin_loop();
                }
                now = Instant::now();
                polled = now.duration_since(t0);
                if now.duration_since(slice_start) >= SLICE {
                    tokio::task::yield_now().await;
                    slice_start = Instant::now();
                }
            }
            if woke {
                // (`polled` is as of the last clock read: a wait that ended
                // within 64 polls counts as an early hit.)
                spin.hit(plan, polled.as_micros().try_into().unwrap_or(u32::MAX));
                continue;
            }
            spin.missed(plan);
            // Sleep on the doorbell, the control socket and the channels;
            // woken by the app for room only while answers wait for it.
            self.ep
                .waiter
                .announce_sleep_for(if self.out.is_empty() && self.stalled.is_none() {
                    meshshm_ring::WANT_DATA
                } else {
                    meshshm_ring::WANT_ANY
                });
            let flushed = if self.out.is_empty() {
                Ok(false)
            } else {
                self.flush_out()
            };
            if let Err(e) = flushed {
                // Keep the first reason: later calls only say "poisoned".
                tracing::warn!(session = self.id, pid = self.cred.pid, error = %e, "closing session: protocol violation");
                break e.to_string();
            }
            if self.has_work() || flushed == Ok(true) {
                self.ep.waiter.cancel_sleep();
                continue;
            }
            let fwd_open = self.intake_open();
            let mut ended = None;
            tokio::select! {
                r = waits.bell() => match r {
                    Ok(true) => {
                        self.sh.gov.metrics.doorbell_wakeups.inc();
                    }
                    Ok(false) => {}
                    Err(e) => ended = Some(e),
                },
                Some((sid, task, r)) = self.done_rx.recv() => {
                    if complete(&mut self.inflight, sid, task) {
                        self.enqueue(FrameKind::Response, sid, r.meta, r.body);
                    }
                }
                Some(f) = async { self.fwd_rx.as_mut()?.recv().await }, if fwd_open => {
                    self.forward(f);
                }
                Some(key) = async { self.cancel_rx.as_mut()?.recv().await } => {
                    self.cancel_forward(key);
                }
                r = waits.ctl() => ended = r,
                _ = shutdown.changed(), if !draining => {
                    draining = true;
                    self.enqueue(FrameKind::Goaway, 0, Vec::new(), Vec::new());
                }
                _ = tokio::time::sleep(Duration::from_millis(100)), if draining => {}
            }
            self.ep.waiter.cancel_sleep();
            if let Some(r) = ended {
                break r;
            }
        };
        self.close();
        reason
    }

    fn close(&mut self) {
        // Aborting a forwarding task cancels its request at the upstream
        // (a server app gets a Cancel frame; a remote proxy too).
        let aborted = self.inflight.len();
        for h in self.inflight.drain() {
            h.abort();
        }
        if aborted > 0 || self.cancelled > 0 {
            tracing::info!(
                session = self.id,
                pid = self.cred.pid,
                aborted,
                cancelled_forwards = self.cancelled,
                "cancelled the upstream requests of the session"
            );
        }
        if self.fwd_rx.is_some() {
            self.sh.router.unregister_local(&self.service, self.id);
            for (_, tx) in self.waiting.drain() {
                let _ = tx.send(Resp::error(status::UNAVAILABLE, "the server app went away"));
            }
            if let Some(mut rx) = self.fwd_rx.take() {
                rx.close();
                while let Ok(f) = rx.try_recv() {
                    let _ = f
                        .reply
                        .send(Resp::error(status::UNAVAILABLE, "the server app went away"));
                }
            }
        }
    }
}

/// Refuse a connection before any handshake work (limits).
pub async fn refuse(mut s: UnixStream, reason: &str, wait: Duration) {
    // Read the hello (bounded) so the app gets the answer, not a reset.
    let _ = tokio::time::timeout(wait, read_hello(&mut s)).await;
    reject(&s, reason).await;
}
