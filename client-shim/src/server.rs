//! The inbound side: an app that serves a service through the proxy.

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meshshm_proto::{default_socket_path, RequestMeta, ResponseMeta, Role};
use meshshm_ring::{FrameKind, WaitOutcome};

use crate::conn::Out;
use crate::error::{Error, Result};
use crate::shm::{HelloOpts, ShmLink};

/// A request delivered to a [`Server`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Answer with this id ([`Server::reply`]).
    pub id: u64,
    /// The service called.
    pub service: String,
    /// The method called.
    pub method: String,
    /// Request headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
    /// When the caller stops waiting (if it set a timeout).
    pub deadline: Option<Instant>,
    /// 0 = low, 1 = normal, 2+ = high.
    pub priority: u8,
}

/// An app registered with the proxy as the handler of one service.
///
/// `next` is meant for one thread at a time (others wait their turn);
/// `reply` may be called from any thread.
///
/// ```no_run
/// let server = meshshm::Server::bind(None, "greeter")?;
/// while let Some(req) = server.next(None)? {
///     server.reply(req.id, 0, &req.body)?;
/// }
/// # Ok::<(), meshshm::Error>(())
/// ```
pub struct Server {
    link: ShmLink,
    service: String,
    closing: std::sync::atomic::AtomicBool,
    calls: Mutex<Calls>,
}

/// Requests read ahead of `next` (while looking for cancels), and the ids
/// handed out whose callers still wait for an answer.
#[derive(Default)]
struct Calls {
    queued: VecDeque<Request>,
    open: HashSet<u64>,
    goaway: bool,
}

impl Server {
    /// Connect to the proxy (default socket if `None`) and register as `service`.
    ///
    /// # Errors
    /// When the proxy cannot be reached or refuses.
    pub fn bind(socket: Option<&Path>, service: &str) -> Result<Server> {
        let path = socket
            .map(Path::to_path_buf)
            .unwrap_or_else(default_socket_path);
        let link = ShmLink::connect(
            &path,
            &HelloOpts {
                role: Role::Server,
                service,
                token: "",
                ring_size: 0,
                spin: 2000,
                spin_adaptive: true,
                timeout: Duration::from_secs(5),
            },
        )?;
        Ok(Server {
            link,
            service: service.to_owned(),
            closing: std::sync::atomic::AtomicBool::new(false),
            calls: Mutex::new(Calls::default()),
        })
    }

    /// The service this server answers for.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The next request; `Ok(None)` when `timeout` passes first.
    ///
    /// # Errors
    /// [`Error::ProxyGone`] when the proxy goes away; [`Error::Protocol`]
    /// when it breaks the protocol.
    pub fn next(&self, timeout: Option<Duration>) -> Result<Option<Request>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut rx = self.link.rx();
        loop {
            if self.closing.load(std::sync::atomic::Ordering::Acquire) {
                return Err(Error::Closed);
            }
            {
                let mut c = self.calls();
                if let Some(r) = c.queued.pop_front() {
                    c.open.insert(r.id);
                    return Ok(Some(r));
                }
                if c.goaway {
                    return Err(Error::ProxyGone("the proxy is shutting down".into()));
                }
            }
            // Take one request at a time; leave the rest in the ring.
            if self.take(&mut rx, true)? > 0 {
                continue;
            }
            if self.link.wait(&mut rx, deadline)? == WaitOutcome::TimedOut {
                return Ok(None);
            }
        }
    }

    /// Whether no one waits for an answer to request `id` any more: its
    /// caller stopped waiting (timeout, or gone; the proxy said so with a
    /// Cancel), or it was answered already. A handler doing long work can
    /// check now and then and give up; a reply to such a request is dropped
    /// here without being sent. Reads what the proxy sent meanwhile (never
    /// waits).
    ///
    /// # Errors
    /// When the proxy broke the protocol.
    pub fn is_cancelled(&self, id: u64) -> Result<bool> {
        if let Some(mut rx) = self.link.try_rx() {
            self.take(&mut rx, false)?;
        }
        Ok(!self.calls().open.contains(&id))
    }

    fn calls(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read what is in the ring (up to the first request if `one`),
    /// queueing requests and marking cancels. Returns requests queued.
    fn take(&self, rx: &mut crate::shm::RxState, one: bool) -> Result<usize> {
        let n = std::cell::Cell::new(0);
        let mut on = |m: &mut meshshm_ring::Message<'_>| {
            match m.kind {
                FrameKind::Request => {
                    let meta = RequestMeta::decode(m.meta())
                        .map_err(|e| Error::Protocol(format!("request metadata: {e}")))?;
                    self.calls().queued.push_back(Request {
                        id: m.stream_id,
                        service: meta.service.to_owned(),
                        method: meta.method.to_owned(),
                        headers: meta.headers.to_vec(),
                        body: m.body().to_vec(),
                        deadline: (meta.timeout_ms > 0).then(|| {
                            Instant::now() + Duration::from_millis(meta.timeout_ms as u64)
                        }),
                        priority: meta.priority,
                    });
                    n.set(n.get() + 1);
                }
                FrameKind::Cancel => {
                    let mut c = self.calls();
                    if !c.open.remove(&m.stream_id) {
                        // Not handed out yet: its caller is gone, drop it.
                        c.queued.retain(|r| r.id != m.stream_id);
                    }
                }
                FrameKind::Goaway => self.calls().goaway = true,
                _ => {}
            }
            Ok(())
        };
        if one {
            // Leave later requests in the ring (and the proxy's backpressure
            // on them) until this server asks for them.
            while n.get() == 0 && self.link.drain_one(rx, &mut on)? > 0 {}
        } else {
            self.link.drain(rx, &mut on)?;
        }
        Ok(n.get())
    }

    /// Make [`Server::next`] return [`Error::Closed`] now and from now on,
    /// in whatever thread it waits (for a binding's `stop()`/`close()`).
    pub fn shutdown(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Release);
        self.link.interrupt();
    }

    /// Answer request `id` with `status` (0 = OK) and `body`.
    ///
    /// # Errors
    /// When the proxy is gone or the body is too large.
    pub fn reply(&self, id: u64, status: u32, body: &[u8]) -> Result<()> {
        self.reply_with(id, status, "", &[], body)
    }

    /// Answer with a status message and headers as well.
    ///
    /// # Errors
    /// As [`Server::reply`].
    pub fn reply_with(
        &self,
        id: u64,
        status: u32,
        message: &str,
        headers: &[(&str, &[u8])],
        body: &[u8],
    ) -> Result<()> {
        if !self.calls().open.remove(&id) {
            // Its caller gave up (or it was answered): the proxy would drop
            // the answer anyway.
            return Ok(());
        }
        let mut meta = Vec::with_capacity(16);
        ResponseMeta::encode(&mut meta, status, message, headers);
        // The proxy always reads a server's ring: room comes without us.
        self.link.send(
            Out {
                kind: FrameKind::Response,
                id,
                meta: &meta,
                body,
            },
            &mut || {},
        )
    }

    /// Serve requests with `handler` until the proxy goes away; the handler
    /// returns a status and a body.
    ///
    /// # Errors
    /// The error that ended serving ([`Error::ProxyGone`] normally).
    pub fn serve(&self, mut handler: impl FnMut(&Request) -> (u32, Vec<u8>)) -> Result<()> {
        loop {
            if let Some(req) = self.next(None)? {
                let (code, body) = handler(&req);
                self.reply(req.id, code, &body)?;
            }
        }
    }
}
