//! The bare two-process ring echo (the floors `ring-floor` and
//! `ring-floor-block`): one segment with two rings straight on
//! `meshshm-ring`, a child process that echoes each request frame back,
//! no proxy, no routing, no session protocol beyond handing over the fds.
//! It does the same copies as the path through the proxy (request into the
//! ring, echo from ring to ring, response out of the ring into the
//! caller's buffer) and waits the same way (spin, then the eventfd
//! doorbell, with the control socket as the second fd, like the shim);
//! what it leaves out is exactly the proxy's own work.
//!
//! The child connects to a socket of the parent's and then receives, per
//! session, a small message with the segment and both eventfds
//! (SCM_RIGHTS, `meshshm_proto::send_with_fds`). A Goaway frame in the
//! ring ends a session; EOF on the socket ends the child.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshshm_proto::{recv_with_fds, send_with_fds, ResponseMeta};
use meshshm_ring::{
    write_message, write_message_streamed, Backing, Bell, Consumer, Endpoint, FrameHeader,
    FrameKind, IdlePoll, Message, Notifier, Producer, Reassembler, Segment, SegmentOptions, Side,
    WaitOutcome, WriteProgress, DEFAULT_MAX_MESSAGE,
};

use crate::mux::{Mux, MuxConn, MuxTx};
use crate::wire::{check_response_meta, request_meta};

/// What [`drain`] hands each answer to: its stream, and the message or why
/// its metadata is wrong.
type OnMessage<'a> = dyn FnMut(u64, Result<&mut Message<'_>, String>) + 'a;

/// Ring size per direction unless asked otherwise: the proxy's default
/// (`shm.ring_size`), so large messages fragment the same way as through it.
pub const RING: usize = 2 << 20;

/// How a floor session is set up.
#[derive(Debug, Clone, Copy)]
pub struct FloorOpts {
    /// client polls before sleeping
    pub client_spin: u32,
    /// child µs of polling before sleeping
    pub server_spin_us: u64,
    /// both sides' polling follows the load (`meshshm_ring::AdaptiveSpin`,
    /// as the shim and the proxy by default)
    pub adaptive: bool,
    /// bytes per ring direction (power of two)
    pub ring: usize,
}
const MAGIC: &[u8; 4] = b"MSB1";

fn s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

// ---------------------------------------------------------------- child

/// The hidden `ring-echo` subcommand.
pub fn child_main(connect: &Path, parent: i32) -> std::process::ExitCode {
    crate::procs::child_guard(parent);
    match child(connect) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ring-echo: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn child(connect: &Path) -> Result<(), String> {
    let ctl = UnixStream::connect(connect).map_err(|e| format!("{}: {e}", connect.display()))?;
    println!("ring-echo ready");
    let _ = std::io::stdout().flush();
    loop {
        let mut b = [0u8; 64];
        let (n, fds) = recv_with_fds(ctl.as_fd(), &mut b).map_err(s)?;
        if n == 0 {
            return Ok(());
        }
        if n != 13 || &b[..4] != MAGIC || fds.len() != 3 {
            return Err(format!(
                "bad session message ({n} bytes, {} fds)",
                fds.len()
            ));
        }
        let spin_us = u64::from_le_bytes(b[4..12].try_into().expect("8"));
        let spin = IdlePoll::new(u32::try_from(spin_us).unwrap_or(u32::MAX), b[12] != 0);
        let mut fds = fds.into_iter();
        let seg = Segment::open(fds.next().expect("3 fds")).map_err(s)?;
        let app = Bell::from_eventfd(fds.next().expect("3 fds"));
        let me = Bell::from_eventfd(fds.next().expect("3 fds"));
        let mut ep = seg.into_endpoint(Side::Proxy, me, app);
        // Wait as the shim does: eventfd edge-triggered with the control socket.
        ep.waiter.watch(ctl.as_fd()).map_err(s)?;
        serve(ep, spin)?;
    }
}

struct Out {
    id: u64,
    body: Vec<u8>,
    progress: WriteProgress,
}

/// Echo until Goaway (or until the parent starts another session / goes).
fn serve(mut ep: Endpoint, spin: IdlePoll) -> Result<(), String> {
    let mut reasm = Reassembler::new(ep.max_message as usize);
    let mut out: VecDeque<Out> = VecDeque::new();
    loop {
        let mut moved = flush_out(&mut ep.tx, &mut out)?;
        if out.is_empty() {
            let (n, goaway) = read_incoming(&mut ep, &mut reasm, &mut out)?;
            if goaway {
                ep.flush();
                return Ok(());
            }
            moved |= n > 0;
        }
        moved |= flush_out(&mut ep.tx, &mut out)?;
        ep.flush();
        if moved {
            continue;
        }
        // Idle: poll for up to `spin` µs (as the proxy does), then sleep on the
        // doorbell, the control socket being the second fd.
        let Endpoint {
            tx,
            rx,
            waiter,
            peer,
            ..
        } = &mut ep;
        // (Longer after a large answer, as the proxy: IdlePoll.)
        let plan = spin.start(tx.bytes_sent());
        let pending = !out.is_empty();
        // As the proxy: woken for room only while answers wait for it.
        waiter.set_want(if pending {
            meshshm_ring::WANT_ANY
        } else {
            meshshm_ring::WANT_DATA
        });
        let mut ready = || {
            if pending {
                // Answers wait for room: try again (wait_until does so after
                // announcing sleep, so room the parent frees meanwhile cannot
                // be missed; a pad written on the way is published).
                let moved = flush_out(tx, &mut out).unwrap_or(true);
                if tx.publish() {
                    peer.notify();
                }
                moved
            } else {
                rx.has_data().unwrap_or(true)
            }
        };
        if plan.budget_us > 0 {
            let poll_for = Duration::from_micros(plan.budget_us.into());
            let t0 = Instant::now();
            let mut hit = false;
            while t0.elapsed() < poll_for {
                if ready() {
                    hit = true;
                    break;
                }
                std::hint::spin_loop();
            }
            if hit {
                spin.hit(
                    plan,
                    t0.elapsed().as_micros().try_into().unwrap_or(u32::MAX),
                );
                continue;
            }
            spin.missed(plan);
        }
        match waiter.wait_until(ready, None, None).map_err(s)? {
            WaitOutcome::Other => return Ok(()),
            WaitOutcome::Ready | WaitOutcome::TimedOut => {}
        }
    }
}

fn flush_out(tx: &mut Producer, out: &mut VecDeque<Out>) -> Result<bool, String> {
    let ok = &ResponseMeta::OK;
    let mut any = false;
    while let Some(o) = out.front_mut() {
        let before = o.progress.sent;
        let done = write_message(
            tx,
            FrameKind::Response,
            o.id,
            ok.len(),
            &[ok, &o.body],
            &mut o.progress,
        )
        .map_err(s)?;
        any |= o.progress.sent != before || done;
        if !done {
            break;
        }
        out.pop_front();
    }
    Ok(any)
}

/// Answer what the parent published: each request's body is written
/// straight from its ring into the other (one copy), as the proxy's echo does.
fn read_incoming(
    ep: &mut Endpoint,
    reasm: &mut Reassembler,
    out: &mut VecDeque<Out>,
) -> Result<(usize, bool), String> {
    let ok = &ResponseMeta::OK;
    let mut n = 0;
    while n < 1024 {
        let Some(f) = ep.rx.peek().map_err(s)? else {
            break;
        };
        let h = *f.header();
        let mut goaway = false;
        if let Some(m) = reasm.feed(&h, f.payload()).map_err(s)? {
            match m.kind {
                FrameKind::Request => {
                    let mut p = WriteProgress { sent: 0 };
                    // (As the proxy: a large answer streams.)
                    let peer = &ep.peer;
                    let done = out.is_empty()
                        && write_message_streamed(
                            &mut ep.tx,
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
                        .map_err(s)?;
                    if !done {
                        out.push_back(Out {
                            id: m.stream_id,
                            body: m.body().to_vec(),
                            progress: p,
                        });
                    }
                }
                FrameKind::Goaway => goaway = true,
                k => return Err(format!("unexpected {k:?} frame")),
            }
        }
        f.release();
        n += 1;
        if goaway {
            return Ok((n, true));
        }
        if ep.rx.unpublished() >= ep.rx.capacity() / 4 {
            ep.flush();
        }
        if !out.is_empty() {
            break;
        }
    }
    Ok((n, false))
}

// ---------------------------------------------------------------- parent

/// Start a session with the child: a fresh memfd segment and two eventfds.
fn open_session(ctl: &UnixStream, o: &FloorOpts) -> Result<Endpoint, String> {
    let seg = Segment::create(&SegmentOptions {
        app_to_proxy: o.ring,
        proxy_to_app: o.ring,
        max_message: DEFAULT_MAX_MESSAGE,
        backing: Backing::Memfd,
    })
    .map_err(s)?;
    let app = Bell::eventfd().map_err(s)?;
    let child = Bell::eventfd().map_err(s)?;
    let mut msg = MAGIC.to_vec();
    msg.extend_from_slice(&o.server_spin_us.to_le_bytes());
    msg.push(u8::from(o.adaptive));
    let fds = [
        seg.fd(),
        app.fd().expect("eventfd bell"),
        child.fd().expect("eventfd bell"),
    ];
    send_with_fds(ctl.as_fd(), &msg, &fds).map_err(|e| format!("handing over the segment: {e}"))?;
    Ok(seg.into_endpoint(Side::App, app, child))
}

/// Whether the child is gone (its end of the control socket is readable:
/// it never writes, so that means EOF).
fn child_gone(ctl: &UnixStream) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(ctl.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Write one request (as many frames as it takes), waiting for room with
/// a short backoff when the ring is full.
fn send_message(
    tx: &mut Producer,
    peer: &Notifier,
    ctl: &UnixStream,
    id: u64,
    meta: &[u8],
    body: &[u8],
) -> Result<(), String> {
    let mut p = WriteProgress { sent: 0 };
    let mut pause = Duration::from_micros(5);
    loop {
        let done = write_message(
            tx,
            FrameKind::Request,
            id,
            meta.len(),
            &[meta, body],
            &mut p,
        )
        .map_err(s)?;
        tx.publish();
        peer.notify();
        if done {
            return Ok(());
        }
        if child_gone(ctl) {
            return Err("the ring-echo child went away".into());
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

/// Read every whole response now in the ring, then hand the room back.
fn drain(
    rx: &mut Consumer,
    reasm: &mut Reassembler,
    peer: &Notifier,
    on: &mut OnMessage<'_>,
) -> Result<usize, String> {
    let mut n = 0;
    while let Some(f) = rx.peek().map_err(s)? {
        let h = *f.header();
        if let Some(mut m) = reasm.feed(&h, f.payload()).map_err(s)? {
            if m.kind != FrameKind::Response {
                return Err(format!("unexpected {:?} frame", m.kind));
            }
            let sid = m.stream_id;
            on(sid, check_response_meta(m.meta()).map(|()| &mut m));
            n += 1;
        }
        f.release();
        if rx.unpublished() >= rx.capacity() / 4 {
            rx.publish();
            peer.notify_room();
        }
    }
    if rx.publish() {
        peer.notify_room();
    }
    Ok(n)
}

fn goodbye(tx: &mut Producer, peer: &Notifier) {
    let _ = tx.try_push(FrameHeader::single(FrameKind::Goaway, 0, 0, 0), &[]);
    tx.publish();
    peer.notify();
}

/// One request at a time, on the calling thread.
pub struct FloorConn {
    ep: Endpoint,
    reasm: Reassembler,
    ctl: UnixStream,
    meta: Vec<u8>,
    next: u64,
}

impl FloorConn {
    pub fn open(ctl: &UnixStream, o: &FloorOpts) -> Result<FloorConn, String> {
        let mut ep = open_session(ctl, o)?;
        ep.waiter.set_spin_adaptive(o.adaptive);
        ep.waiter.set_spin(o.client_spin);
        ep.waiter.set_want(meshshm_ring::WANT_DATA);
        let ctl = ctl.try_clone().map_err(s)?;
        ep.waiter.watch(ctl.as_fd()).map_err(s)?;
        Ok(FloorConn {
            reasm: Reassembler::new(ep.max_message as usize),
            ep,
            ctl,
            meta: request_meta(),
            next: 1,
        })
    }

    pub fn call(&mut self, body: &[u8], resp: &mut Vec<u8>) -> Result<(), String> {
        let id = self.next;
        self.next += 1;
        let Endpoint {
            tx,
            rx,
            waiter,
            peer,
            ..
        } = &mut self.ep;
        send_message(tx, peer, &self.ctl, id, &self.meta, body)?;
        loop {
            let mut got: Option<Result<(), String>> = None;
            drain(rx, &mut self.reasm, peer, &mut |sid, r| {
                got = Some(match r {
                    // (As the shim: one copy out of the ring, by fragment
                    // for a streamed answer.)
                    Ok(m) if sid == id => {
                        *resp = m.take_body();
                        Ok(())
                    }
                    Ok(_) => Err(format!("response to stream {sid}, expected {id}")),
                    Err(e) => Err(e),
                });
            })?;
            if let Some(r) = got {
                return r;
            }
            let out = waiter
                // (As the shim: the wait after a large request polls longer.)
                .wait_after(
                    tx.bytes_sent(),
                    || rx.has_data().unwrap_or(true),
                    None,
                    None,
                )
                .map_err(s)?;
            if out == WaitOutcome::Other {
                return Err("the ring-echo child went away".into());
            }
        }
    }
}

impl Drop for FloorConn {
    fn drop(&mut self) {
        goodbye(&mut self.ep.tx, &self.ep.peer);
    }
}

struct FloorTx {
    tx: Producer,
    peer: Notifier,
    ctl: UnixStream,
    meta: Vec<u8>,
    /// Bytes sent so far, for the reader's waits (as the shim's).
    published: Arc<AtomicU64>,
}

impl MuxTx for FloorTx {
    fn send(&mut self, id: u64, body: &[u8]) -> Result<(), String> {
        send_message(&mut self.tx, &self.peer, &self.ctl, id, &self.meta, body)?;
        self.published
            .store(self.tx.bytes_sent(), Ordering::Relaxed);
        Ok(())
    }
    fn finish(&mut self) {
        goodbye(&mut self.tx, &self.peer);
    }
}

/// Many requests in flight: callers write, a reader thread completes them.
pub fn connect_mux(ctl: &UnixStream, o: &FloorOpts) -> Result<MuxConn, String> {
    let Endpoint {
        tx,
        mut rx,
        mut waiter,
        peer,
        max_message,
    } = open_session(ctl, o)?;
    waiter.set_spin_adaptive(o.adaptive);
    waiter.set_spin(o.client_spin);
    waiter.set_want(meshshm_ring::WANT_DATA);
    let closing = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let ftx = FloorTx {
        tx,
        peer: peer.clone(),
        ctl: ctl.try_clone().map_err(s)?,
        meta: request_meta(),
        published: published.clone(),
    };
    let rctl = ctl.try_clone().map_err(s)?;
    waiter.watch(rctl.as_fd()).map_err(s)?;
    let (c2, w2) = (closing.clone(), waiter.clone());
    MuxConn::start(
        Box::new(ftx),
        move |mux: Arc<Mux>| {
            let mut reasm = Reassembler::new(max_message as usize);
            loop {
                if let Err(e) = drain(&mut rx, &mut reasm, &peer, &mut |sid, r| {
                    mux.deliver(sid, r.map(Message::take_body))
                }) {
                    mux.fail(e);
                    return;
                }
                if closing.load(Ordering::Acquire) {
                    return;
                }
                match waiter.wait_after(
                    published.load(Ordering::Relaxed),
                    || closing.load(Ordering::Acquire) || rx.has_data().unwrap_or(true),
                    None,
                    None,
                ) {
                    Ok(WaitOutcome::Other) => {
                        mux.fail("the ring-echo child went away".into());
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        mux.fail(e.to_string());
                        return;
                    }
                }
            }
        },
        Box::new(move || {
            c2.store(true, Ordering::Release);
            w2.interrupt();
        }),
    )
}
