//! The loopback-TCP listener's sessions: the same frames on a socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use meshshm_proto::{encode_frame, FrameDecoder, ResponseMeta};
use meshshm_ring::{FrameKind, Reassembler, HEADER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::dispatch::{complete, handle_request, InFlight, Inbound, Outcome};
use crate::gov::Tally;
use crate::tls::PeerIdentity;
use crate::Shared;

pub async fn run(sh: Arc<Shared>, s: TcpStream, id: u64, shutdown: watch::Receiver<bool>) {
    // Plaintext or TLS, by the listener's mode (crate::tls); then `serve`.
    crate::tls::accept(sh, s, id, shutdown).await
}

/// Serve one session on a plaintext or TLS stream. `identity` is the
/// verified identity of a TLS peer (`None`: plaintext).
pub async fn serve<S>(
    sh: Arc<Shared>,
    s: S,
    peer: Option<SocketAddr>,
    identity: Option<Arc<PeerIdentity>>,
    id: u64,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (mut r, mut w) = tokio::io::split(s);
    let max = sh.router.max_message();
    let dec = FrameDecoder::new(max);
    let mut reasm = Reassembler::new(max);
    let mut tally = Tally::default();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u64, _, crate::router::Resp)>();
    let mut inflight = InFlight::default();
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut draining = false;
    let who = sh.gov.peer(
        None,
        identity.as_deref().map(|i| i.name().to_owned()),
        crate::gov::Transport::Tcp,
    );
    let reason: String = 'session: loop {
        let paused = inflight.len() >= sh.cfg.shm.max_in_flight
            || inflight.bytes() >= sh.cfg.shm.max_buffered;
        tokio::select! {
            res = r.read_buf(&mut buf), if !paused && !draining => match res {
                Ok(0) => break 'session "peer closed".into(),
                Err(e) => break 'session format!("read: {e}"),
                Ok(_) => {}
            },
            Some((sid, task, resp)) = done_rx.recv() => {
                if complete(&mut inflight, sid, task) {
                    encode_frame(&mut out, FrameKind::Response, sid, resp.meta.len(), &[&resp.meta, &resp.body]);
                }
            }
            _ = shutdown.changed(), if !draining => {
                draining = true;
                encode_frame(&mut out, FrameKind::Goaway, 0, 0, &[]);
            }
        }
        while let Ok((sid, task, resp)) = done_rx.try_recv() {
            if !complete(&mut inflight, sid, task) {
                continue;
            }
            encode_frame(
                &mut out,
                FrameKind::Response,
                sid,
                resp.meta.len(),
                &[&resp.meta, &resp.body],
            );
        }
        let mut off = 0;
        loop {
            let (h, total) = match dec.decode(&buf[off..]) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => break 'session format!("bad frame: {e}"),
            };
            let payload = &buf[off + HEADER_LEN..off + HEADER_LEN + h.len as usize];
            let m = match reasm.feed(&h, payload) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    off += total;
                    continue;
                }
                Err(e) => break 'session format!("bad message: {e}"),
            };
            match m.kind {
                FrameKind::Request => {
                    // Identity-based rules (tls.allow) first, then routing.
                    let outcome = match sh.tls.check_call(identity.as_deref(), m.meta()) {
                        Some(denied) => Outcome::Reply(denied),
                        None => handle_request(
                            &sh,
                            &mut tally,
                            &who,
                            Inbound {
                                stream_id: m.stream_id,
                                meta: m.meta(),
                                body: m.body(),
                                arrived: Instant::now(),
                            },
                            &done_tx,
                            &mut inflight,
                        ),
                    };
                    match outcome {
                        Outcome::Echo => encode_frame(
                            &mut out,
                            FrameKind::Response,
                            m.stream_id,
                            ResponseMeta::OK.len(),
                            &[&ResponseMeta::OK, m.body()],
                        ),
                        Outcome::Reply(resp) => encode_frame(
                            &mut out,
                            FrameKind::Response,
                            m.stream_id,
                            resp.meta.len(),
                            &[&resp.meta, &resp.body],
                        ),
                        Outcome::Spawned => {}
                        Outcome::Reused => {
                            break 'session format!(
                                "stream id {} reused while its request is in flight",
                                m.stream_id
                            )
                        }
                    }
                }
                FrameKind::Cancel => {
                    if let Some(h) = inflight.remove(m.stream_id) {
                        h.abort();
                    }
                }
                FrameKind::Ping => encode_frame(
                    &mut out,
                    FrameKind::Pong,
                    m.stream_id,
                    0,
                    &[m.meta(), m.body()],
                ),
                FrameKind::Pong | FrameKind::Goaway => {}
                k => break 'session format!("unexpected {k:?} frame"),
            }
            off += total;
        }
        buf.drain(..off);
        // The answers' metrics before the answers.
        sh.gov.flush(&mut tally);
        if !out.is_empty() {
            // flush: a TLS stream may hold records back otherwise.
            if let Err(e) = w.write_all(&out).await {
                break 'session format!("write: {e}");
            }
            if let Err(e) = w.flush().await {
                break 'session format!("write: {e}");
            }
            out.clear();
            if out.capacity() > 4 << 20 {
                out.shrink_to(64 * 1024);
            }
        }
        if draining && inflight.is_empty() {
            break 'session "shutdown".into();
        }
    };
    sh.gov.flush(&mut tally);
    for h in inflight.drain() {
        h.abort();
    }
    let identity = identity.as_deref().map(PeerIdentity::name);
    tracing::info!(session = id, ?peer, ?identity, %reason, "tcp session closed");
}
