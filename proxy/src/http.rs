//! HTTP/1.1 ingress (hyper): `curl -d BODY http://ADDR/SERVICE/METHOD`
//! reaches the service like any call over shm or TCP, through the same
//! dispatcher (access rules, routing, overload, metrics with
//! transport="http").
//!
//! Request headers travel as request headers, except the hop-by-hop ones
//! and two that set call options: `x-meshshm-timeout-ms` (the deadline) and
//! `x-meshshm-priority` (0 low, 1 normal, 2+ high). The response carries the
//! meshshm status in `x-meshshm-status` (and `x-meshshm-message`), mapped to
//! an HTTP status: ok 200, invalid argument 400, permission denied 403,
//! not found 404, resource exhausted 429, unavailable 503, deadline
//! exceeded 504, anything else 500.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use meshshm_proto::{status, RequestMeta, ResponseMeta};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::dispatch::{handle_request, InFlight, Inbound, Outcome};
use crate::gov::{Peer, Tally, Transport};
use crate::router::Resp;
use crate::Shared;

/// `[http]`: the HTTP/1.1 ingress listener.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCfg {
    /// "127.0.0.1:8080"; "" = off (the default).
    #[serde(default)]
    pub listen: String,
}

/// Bind the ingress (if configured) and serve it in the background.
pub async fn spawn(sh: Arc<Shared>) {
    let addr = sh.cfg.http.listen.clone();
    if addr.is_empty() {
        return;
    }
    let l = match TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot bind the HTTP ingress; it is off");
            return;
        }
    };
    let local = l.local_addr().map(|a| a.to_string()).unwrap_or(addr);
    tracing::info!(http = %local, "HTTP/1.1 ingress listening");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let sh = sh.clone();
            tokio::spawn(async move {
                let peer = Arc::new(sh.gov.peer(None, None, Transport::Http));
                let svc = hyper::service::service_fn(move |req| {
                    let (sh, peer) = (sh.clone(), peer.clone());
                    async move { Ok::<_, Infallible>(handle(sh, &peer, req).await) }
                });
                let io = hyper_util::rt::TokioIo::new(s);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await
                {
                    tracing::debug!(error = %e, "http connection");
                }
            });
        }
    });
}

/// Aborts the request's upstream task if the HTTP exchange is dropped
/// (client gone).
struct AbortOnDrop(InFlight);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in self.0.drain() {
            h.abort();
        }
    }
}

fn reply(
    code: u32,
    message: &str,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
) -> Response<Full<Bytes>> {
    let http = match code {
        status::OK => StatusCode::OK,
        status::INVALID_ARGUMENT => StatusCode::BAD_REQUEST,
        status::PERMISSION_DENIED => StatusCode::FORBIDDEN,
        status::NOT_FOUND => StatusCode::NOT_FOUND,
        status::RESOURCE_EXHAUSTED => StatusCode::TOO_MANY_REQUESTS,
        status::UNAVAILABLE => StatusCode::SERVICE_UNAVAILABLE,
        status::DEADLINE_EXCEEDED => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut b = Response::builder()
        .status(http)
        .header("x-meshshm-status", code.to_string());
    if !message.is_empty() {
        // Header values cannot hold control characters.
        let m: String = message.chars().filter(|c| !c.is_control()).collect();
        b = b.header("x-meshshm-message", m);
    }
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            hyper::header::HeaderValue::from_bytes(&v),
        ) {
            b = b.header(k, v);
        }
    }
    b.body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn from_resp(r: Resp) -> Response<Full<Bytes>> {
    match ResponseMeta::decode(&r.meta) {
        Ok(m) => {
            let headers = m
                .headers
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_vec()))
                .collect();
            reply(m.status, m.message, headers, r.body)
        }
        Err(_) => reply(
            status::INTERNAL,
            "malformed response metadata",
            Vec::new(),
            Vec::new(),
        ),
    }
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "content-length",
    "host",
    "expect",
];

async fn handle(sh: Arc<Shared>, peer: &Peer, req: Request<Incoming>) -> Response<Full<Bytes>> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let path = req.uri().path().trim_start_matches('/').to_owned();
    let Some((service, method)) = path.split_once('/') else {
        return reply(
            status::INVALID_ARGUMENT,
            "expected a path /SERVICE/METHOD",
            Vec::new(),
            Vec::new(),
        );
    };
    let mut timeout_ms = 0u32;
    let mut priority = 1u8;
    let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
    for (k, v) in req.headers() {
        match k.as_str() {
            "x-meshshm-timeout-ms" => {
                timeout_ms = std::str::from_utf8(v.as_bytes())
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0)
            }
            "x-meshshm-priority" => {
                priority = std::str::from_utf8(v.as_bytes())
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(1)
            }
            k if HOP_BY_HOP.contains(&k) => {}
            k => headers.push((k.to_owned(), v.as_bytes().to_vec())),
        }
    }
    let (service, method) = (service.to_owned(), method.to_owned());
    let max = sh.router.max_message();
    let body = match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return reply(
                status::INVALID_ARGUMENT,
                &format!("request body: {e}"),
                Vec::new(),
                Vec::new(),
            )
        }
    };
    let hv: Vec<(&str, &[u8])> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let mut meta = Vec::with_capacity(64);
    RequestMeta::encode(&mut meta, &service, &method, timeout_ms, priority, &hv);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut inflight = AbortOnDrop(InFlight::default());
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let req = Inbound {
        stream_id: id,
        meta: &meta,
        body: &body,
        arrived: Instant::now(),
    };
    let mut tally = Tally::default();
    let outcome = handle_request(&sh, &mut tally, peer, req, &done_tx, &mut inflight.0);
    sh.gov.flush(&mut tally);
    match outcome {
        Outcome::Echo => reply(status::OK, "", Vec::new(), body.to_vec()),
        Outcome::Reply(r) => from_resp(r),
        Outcome::Reused => reply(status::INTERNAL, "stream id reused", Vec::new(), Vec::new()),
        Outcome::Spawned => match done_rx.recv().await {
            Some((_, _, r)) => {
                // Answered: nothing left to abort.
                inflight.0 = InFlight::default();
                from_resp(r)
            }
            None => reply(status::INTERNAL, "request lost", Vec::new(), Vec::new()),
        },
    }
}

/// An HTTP/1.1 upstream (`http:HOST:PORT`): a request for SERVICE/METHOD
/// becomes `POST /METHOD` with the request headers and body; the HTTP
/// status maps back to a meshshm status (2xx ok, 400 invalid argument,
/// 401/403 permission denied, 404 not found, 429 resource exhausted,
/// 502/503 unavailable, 504 deadline exceeded, else unknown). Idle
/// connections are kept for reuse.
pub struct HttpUpstream {
    addr: std::net::SocketAddr,
    max_message: usize,
    idle: std::sync::Mutex<Vec<hyper::client::conn::http1::SendRequest<Full<Bytes>>>>,
}

impl HttpUpstream {
    pub fn new(addr: std::net::SocketAddr, max_message: usize) -> HttpUpstream {
        HttpUpstream {
            addr,
            max_message,
            idle: std::sync::Mutex::new(Vec::new()),
        }
    }

    async fn conn(&self) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
        loop {
            let c = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match c {
                Some(mut c) if !c.is_closed() => {
                    if c.ready().await.is_ok() {
                        return Ok(c);
                    }
                }
                Some(_) => {}
                None => break,
            }
        }
        let s = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connecting to http upstream {}: {e}", self.addr))?;
        let _ = s.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
            .await
            .map_err(|e| format!("http upstream {}: {e}", self.addr))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(send)
    }

    /// Forward one request (encoded metadata and body).
    pub async fn call(&self, meta: Vec<u8>, body: Vec<u8>) -> Resp {
        let m = match RequestMeta::decode(&meta) {
            Ok(m) => m,
            Err(e) => return Resp::error(status::INVALID_ARGUMENT, &format!("{e}")),
        };
        let mut b = Request::builder()
            .method("POST")
            .uri(format!("/{}", m.method.trim_start_matches('/')))
            .header("host", self.addr.to_string())
            .header("x-meshshm-service", m.service);
        if m.timeout_ms > 0 {
            b = b.header("x-meshshm-timeout-ms", m.timeout_ms.to_string());
        }
        for (k, v) in m.headers {
            if let (Ok(k), Ok(v)) = (
                hyper::header::HeaderName::from_bytes(k.as_bytes()),
                hyper::header::HeaderValue::from_bytes(v),
            ) {
                if !HOP_BY_HOP.contains(&k.as_str()) {
                    b = b.header(k, v);
                }
            }
        }
        let req = match b.body(Full::new(Bytes::from(body))) {
            Ok(r) => r,
            Err(e) => return Resp::error(status::INVALID_ARGUMENT, &format!("{e}")),
        };
        let mut c = match self.conn().await {
            Ok(c) => c,
            Err(e) => return Resp::error(status::UNAVAILABLE, &e),
        };
        let resp = match c.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                return Resp::error(
                    status::UNAVAILABLE,
                    &format!("http upstream {}: {e}", self.addr),
                )
            }
        };
        let code = match resp.status().as_u16() {
            200..=299 => status::OK,
            400 => status::INVALID_ARGUMENT,
            401 | 403 => status::PERMISSION_DENIED,
            404 => status::NOT_FOUND,
            429 => status::RESOURCE_EXHAUSTED,
            502 | 503 => status::UNAVAILABLE,
            504 => status::DEADLINE_EXCEEDED,
            _ => status::UNKNOWN,
        };
        let reason = if code == status::OK {
            String::new()
        } else {
            format!("http upstream answered {}", resp.status())
        };
        let headers: Vec<(String, Vec<u8>)> = resp
            .headers()
            .iter()
            .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        let body = match Limited::new(resp.into_body(), self.max_message)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes().to_vec(),
            Err(e) => {
                return Resp::error(
                    status::UNAVAILABLE,
                    &format!("http upstream {}: body: {e}", self.addr),
                )
            }
        };
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(c);
        let hv: Vec<(&str, &[u8])> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        let mut meta = Vec::with_capacity(32);
        ResponseMeta::encode(&mut meta, code, &reason, &hv);
        Resp { meta, body }
    }
}
