//! The inbound side: an app that serves a service through the proxy.

use std::path::Path;
use std::time::{Duration, Instant};

use meshshm_proto::{default_socket_path, RequestMeta, ResponseMeta, Role};
use meshshm_ring::{FrameKind, WaitOutcome};

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
                timeout: Duration::from_secs(5),
            },
        )?;
        Ok(Server {
            link,
            service: service.to_owned(),
            closing: std::sync::atomic::AtomicBool::new(false),
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
            let mut got = None;
            let mut stop = false;
            // Take one request at a time; leave the rest in the ring.
            self.link
                .drain_one(&mut rx, |m: &meshshm_ring::Message<'_>| {
                    match m.kind {
                        FrameKind::Request => {
                            let meta = RequestMeta::decode(m.meta())
                                .map_err(|e| Error::Protocol(format!("request metadata: {e}")))?;
                            got = Some(Request {
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
                        }
                        FrameKind::Goaway => stop = true,
                        _ => {}
                    }
                    Ok(())
                })?;
            if got.is_some() {
                return Ok(got);
            }
            if stop {
                return Err(Error::ProxyGone("the proxy is shutting down".into()));
            }
            if self.link.wait(&mut rx, deadline)? == WaitOutcome::TimedOut {
                return Ok(None);
            }
        }
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
        let mut meta = Vec::with_capacity(16);
        ResponseMeta::encode(&mut meta, status, message, headers);
        // The proxy always reads a server's ring: room comes without us.
        self.link
            .send(FrameKind::Response, id, &meta, body, &mut || {})
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
