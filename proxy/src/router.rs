//! Routing: service name → upstream, and the upstreams that answer from
//! elsewhere (server apps attached over shm, other proxies over TCP).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshshm_proto::{encode_frame, status, FrameDecoder, ResponseMeta};
use meshshm_ring::{FrameKind, Reassembler, HEADER_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, UpstreamSpec};

/// A response on its way back to a caller: encoded metadata and body.
#[derive(Debug)]
pub struct Resp {
    pub meta: Vec<u8>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn error(code: u32, message: &str) -> Resp {
        let mut meta = Vec::with_capacity(16 + message.len());
        ResponseMeta::encode(&mut meta, code, message, &[]);
        Resp {
            meta,
            body: Vec::new(),
        }
    }
}

/// A request handed to an upstream: its encoded metadata (forwarded as is,
/// with the remaining time patched in) and body.
pub struct Forward {
    pub meta: Vec<u8>,
    pub body: Vec<u8>,
    pub deadline: Option<Instant>,
    pub reply: oneshot::Sender<Resp>,
}

/// Where one request goes.
pub enum Route {
    Echo,
    Local(mpsc::Sender<Forward>),
    Proxy(Arc<RemotePool>),
    NotFound,
}

/// Patch the `timeout_ms` field (bytes 4..8 of request metadata) to the time left.
pub fn patch_timeout(meta: &mut [u8], deadline: Option<Instant>) {
    if let (Some(d), Some(field)) = (deadline, meta.get_mut(4..8)) {
        let left = d
            .saturating_duration_since(Instant::now())
            .as_millis()
            .clamp(1, u32::MAX as u128) as u32;
        field.copy_from_slice(&left.to_le_bytes());
    }
}

struct LocalEntry {
    session: u64,
    tx: mpsc::Sender<Forward>,
}

pub struct Router {
    routes: HashMap<String, UpstreamSpec>,
    pools: HashMap<SocketAddr, Arc<RemotePool>>,
    locals: Mutex<HashMap<String, Vec<LocalEntry>>>,
    rr: AtomicUsize,
    max_message: usize,
}

impl Router {
    pub fn new(cfg: &Config) -> Router {
        let mut routes = HashMap::new();
        let mut pools = HashMap::new();
        for (svc, up) in &cfg.routes {
            let spec = UpstreamSpec::parse(up).expect("checked when the config was parsed");
            if let UpstreamSpec::Proxy(addr) = spec {
                pools.entry(addr).or_insert_with(|| {
                    Arc::new(RemotePool::new(addr, 2, cfg.shm.max_message as usize))
                });
            }
            routes.insert(svc.clone(), spec);
        }
        Router {
            routes,
            pools,
            locals: Mutex::new(HashMap::new()),
            rr: AtomicUsize::new(0),
            max_message: cfg.shm.max_message as usize,
        }
    }

    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Where requests for `service` go now. A service without a route goes
    /// to a server app that registered it, if any.
    pub fn route(&self, service: &str) -> Route {
        match self.routes.get(service) {
            Some(UpstreamSpec::Echo) => Route::Echo,
            Some(UpstreamSpec::Proxy(a)) => Route::Proxy(self.pools[a].clone()),
            Some(UpstreamSpec::Local) | None => {
                let locals = self.locals.lock().unwrap_or_else(|p| p.into_inner());
                match locals.get(service).filter(|v| !v.is_empty()) {
                    Some(v) => {
                        let i = self.rr.fetch_add(1, Ordering::Relaxed) % v.len();
                        Route::Local(v[i].tx.clone())
                    }
                    None => Route::NotFound,
                }
            }
        }
    }

    pub fn register_local(&self, service: &str, session: u64, tx: mpsc::Sender<Forward>) {
        let mut l = self.locals.lock().unwrap_or_else(|p| p.into_inner());
        l.entry(service.to_owned())
            .or_default()
            .push(LocalEntry { session, tx });
    }

    pub fn unregister_local(&self, service: &str, session: u64) {
        let mut l = self.locals.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = l.get_mut(service) {
            v.retain(|e| e.session != session);
            if v.is_empty() {
                l.remove(service);
            }
        }
    }
}

/// Run a forwarded request against a non-inline upstream, within its deadline.
pub async fn call_upstream(
    route: Route,
    mut meta: Vec<u8>,
    body: Vec<u8>,
    deadline: Option<Instant>,
) -> Resp {
    patch_timeout(&mut meta, deadline);
    let fut = async {
        match route {
            Route::Local(tx) => {
                let (reply, rx) = oneshot::channel();
                let fwd = Forward {
                    meta,
                    body,
                    deadline,
                    reply,
                };
                if tx.send(fwd).await.is_err() {
                    return Resp::error(status::UNAVAILABLE, "the server app went away");
                }
                rx.await.unwrap_or_else(|_| {
                    Resp::error(status::UNAVAILABLE, "the server app went away")
                })
            }
            Route::Proxy(pool) => pool.call(meta, body).await,
            Route::Echo | Route::NotFound => {
                Resp::error(status::INTERNAL, "not a forwarding route")
            }
        }
    };
    match deadline {
        Some(d) => match tokio::time::timeout_at(d.into(), fut).await {
            Ok(r) => r,
            Err(_) => Resp::error(status::DEADLINE_EXCEEDED, "deadline exceeded in the proxy"),
        },
        None => fut.await,
    }
}

/// A small pool of multiplexed TCP connections to another meshshm proxy.
pub struct RemotePool {
    addr: SocketAddr,
    conns: Vec<tokio::sync::Mutex<Option<Arc<RemoteConn>>>>,
    next: AtomicUsize,
    max_message: usize,
}

struct RemoteConn {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Resp>>>,
    next_id: AtomicU64,
    alive: std::sync::atomic::AtomicBool,
}

impl RemotePool {
    pub fn new(addr: SocketAddr, size: usize, max_message: usize) -> Self {
        RemotePool {
            addr,
            conns: (0..size.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
            max_message,
        }
    }

    async fn conn(&self) -> Result<Arc<RemoteConn>, String> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let mut g = self.conns[i].lock().await;
        if let Some(c) = g.as_ref().filter(|c| c.alive.load(Ordering::Acquire)) {
            return Ok(c.clone());
        }
        let s = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(self.addr),
        )
        .await
        .map_err(|_| format!("connect to {} timed out", self.addr))?
        .map_err(|e| format!("connect to {}: {e}", self.addr))?;
        let _ = s.set_nodelay(true);
        let (mut r, mut w) = s.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let c = Arc::new(RemoteConn {
            tx,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            alive: std::sync::atomic::AtomicBool::new(true),
        });
        tokio::spawn(async move {
            while let Some(mut buf) = rx.recv().await {
                while let Ok(more) = rx.try_recv() {
                    buf.extend_from_slice(&more);
                }
                if w.write_all(&buf).await.is_err() {
                    break;
                }
            }
        });
        let reader = c.clone();
        let max = self.max_message;
        tokio::spawn(async move {
            let dec = FrameDecoder::new(max);
            let mut reasm = Reassembler::new(max);
            let mut buf = Vec::with_capacity(64 * 1024);
            'outer: loop {
                let mut off = 0;
                while let Ok(Some((h, total))) = dec.decode(&buf[off..]) {
                    let payload = &buf[off + HEADER_LEN..off + HEADER_LEN + h.len as usize];
                    match reasm.feed(&h, payload) {
                        Ok(Some(m)) if m.kind == FrameKind::Response => {
                            let p = reader
                                .pending
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&m.stream_id);
                            if let Some(p) = p {
                                let _ = p.send(Resp {
                                    meta: m.meta().to_vec(),
                                    body: m.body().to_vec(),
                                });
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break 'outer,
                    }
                    off += total;
                }
                if dec.decode(&buf[off..]).is_err() {
                    break;
                }
                buf.drain(..off);
                if buf.capacity() - buf.len() < 16 * 1024 {
                    buf.reserve(64 * 1024);
                }
                match r.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            reader.alive.store(false, Ordering::Release);
            let all: Vec<_> = reader
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain()
                .collect();
            for (_, p) in all {
                let _ = p.send(Resp::error(
                    status::UNAVAILABLE,
                    "connection to the upstream proxy lost",
                ));
            }
        });
        *g = Some(c.clone());
        Ok(c)
    }

    pub async fn call(&self, meta: Vec<u8>, body: Vec<u8>) -> Resp {
        let c = match self.conn().await {
            Ok(c) => c,
            Err(e) => return Resp::error(status::UNAVAILABLE, &e),
        };
        let id = c.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        c.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let mut frame = Vec::with_capacity(meta.len() + body.len() + 32);
        encode_frame(
            &mut frame,
            FrameKind::Request,
            id,
            meta.len(),
            &[&meta, &body],
        );
        if c.tx.send(frame).is_err() {
            c.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Resp::error(status::UNAVAILABLE, "connection to the upstream proxy lost");
        }
        struct CancelOnDrop<'a> {
            c: &'a RemoteConn,
            id: u64,
            armed: bool,
        }
        impl Drop for CancelOnDrop<'_> {
            fn drop(&mut self) {
                if self.armed
                    && self
                        .c
                        .pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&self.id)
                        .is_some()
                {
                    let mut f = Vec::with_capacity(32);
                    encode_frame(&mut f, FrameKind::Cancel, self.id, 0, &[]);
                    let _ = self.c.tx.send(f);
                }
            }
        }
        let mut guard = CancelOnDrop {
            c: &c,
            id,
            armed: true,
        };
        let r = rx.await.unwrap_or_else(|_| {
            Resp::error(status::UNAVAILABLE, "connection to the upstream proxy lost")
        });
        guard.armed = false;
        r
    }
}
