//! Routing: service name → upstream, and the upstreams that answer from
//! elsewhere (server apps attached over shm, other proxies over TCP).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

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
    /// Unique among all forwards of this proxy: the stream id the server app
    /// sees, and how a cancellation names this request.
    pub key: u64,
    pub meta: Vec<u8>,
    pub body: Vec<u8>,
    pub deadline: Option<Instant>,
    pub reply: oneshot::Sender<Resp>,
}

/// The intake of a server app's session: requests, and the keys of
/// requests whose caller gave up (cancelled, timed out, or went away).
#[derive(Clone)]
pub struct LocalTx {
    pub fwd: mpsc::Sender<Forward>,
    pub cancel: mpsc::UnboundedSender<u64>,
}

/// Where one request goes.
pub enum Route {
    Echo,
    Local(LocalTx),
    Proxy(Arc<RemotePool>),
    /// A plain HTTP/1.1 service.
    Http(Arc<crate::http::HttpUpstream>),
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
    tx: LocalTx,
}

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

/// Services a uid may use, from one `[access.call]` or `[access.serve]` table.
#[derive(Default)]
struct Rules {
    by_uid: HashMap<u32, HashSet<String>>,
    /// The "*" entry: for uids without one of their own, and TCP peers.
    rest: Option<HashSet<String>>,
}

impl Rules {
    fn new(t: &BTreeMap<String, Vec<String>>) -> Rules {
        let mut r = Rules::default();
        for (k, v) in t {
            let set: HashSet<String> = v.iter().cloned().collect();
            match k.parse::<u32>() {
                Ok(uid) => {
                    r.by_uid.insert(uid, set);
                }
                // Keys were checked with the config: anything else is "*".
                Err(_) => r.rest = Some(set),
            }
        }
        r
    }

    fn allows(&self, uid: Option<u32>, service: &str) -> bool {
        let set = uid.and_then(|u| self.by_uid.get(&u)).or(self.rest.as_ref());
        match set {
            None => true,
            Some(s) => s.contains("*") || s.contains(service),
        }
    }
}

/// The reloadable part of the router: routes and their upstream pools.
struct Table {
    routes: HashMap<String, UpstreamSpec>,
    pools: HashMap<SocketAddr, Arc<RemotePool>>,
    https: HashMap<SocketAddr, Arc<crate::http::HttpUpstream>>,
}

pub struct Router {
    /// Swapped whole on a config reload (crate::reload).
    table: arc_swap::ArcSwap<Table>,
    locals: Mutex<HashMap<String, Vec<LocalEntry>>>,
    rr: AtomicUsize,
    max_message: usize,
    /// `[access.call]` and `[access.serve]`, swapped whole on a reload.
    uid_rules: arc_swap::ArcSwap<UidRules>,
}

struct UidRules {
    call: Rules,
    serve: Rules,
}

impl UidRules {
    fn new(cfg: &Config) -> UidRules {
        UidRules {
            call: Rules::new(&cfg.access.call),
            serve: Rules::new(&cfg.access.serve),
        }
    }
}

impl Router {
    pub fn new(cfg: &Config, tls: &Arc<crate::tls::Tls>) -> Router {
        Router {
            table: arc_swap::ArcSwap::from_pointee(Self::table(cfg, tls, None)),
            locals: Mutex::new(HashMap::new()),
            rr: AtomicUsize::new(0),
            max_message: cfg.shm.max_message as usize,
            uid_rules: arc_swap::ArcSwap::from_pointee(UidRules::new(cfg)),
        }
    }

    /// Build the route table; pools to addresses `old` has are kept (with
    /// their connections).
    fn table(cfg: &Config, tls: &Arc<crate::tls::Tls>, old: Option<&Table>) -> Table {
        let mut routes = HashMap::new();
        let mut pools = HashMap::new();
        let mut https = HashMap::new();
        for (svc, up) in &cfg.routes {
            let spec = UpstreamSpec::parse(up).expect("checked when the config was parsed");
            if let UpstreamSpec::Proxy(addr) = spec {
                pools.entry(addr).or_insert_with(|| {
                    old.and_then(|t| t.pools.get(&addr).cloned())
                        .unwrap_or_else(|| {
                            Arc::new(RemotePool::new(
                                2,
                                cfg.shm.max_message as usize,
                                tls.upstream(addr),
                            ))
                        })
                });
            }
            if let UpstreamSpec::Http(addr) = spec {
                https.entry(addr).or_insert_with(|| {
                    old.and_then(|t| t.https.get(&addr).cloned())
                        .unwrap_or_else(|| {
                            Arc::new(crate::http::HttpUpstream::new(
                                addr,
                                cfg.shm.max_message as usize,
                            ))
                        })
                });
            }
            routes.insert(svc.clone(), spec);
        }
        Table {
            routes,
            pools,
            https,
        }
    }

    /// Swap in the routes and the `[access.call]`/`[access.serve]` uid
    /// tables of a new (checked) configuration. Sessions already up keep
    /// serving (a uid no longer allowed to serve stays registered until it
    /// reconnects); calls are checked against the new tables at once.
    pub fn reload_routes(&self, cfg: &Config, tls: &Arc<crate::tls::Tls>) {
        let next = Self::table(cfg, tls, Some(&self.table.load()));
        self.table.store(Arc::new(next));
        self.uid_rules.store(Arc::new(UidRules::new(cfg)));
    }

    /// Whether a peer with `uid` (`None`: a TCP peer) may call `service`.
    pub fn may_call(&self, uid: Option<u32>, service: &str) -> bool {
        self.uid_rules.load().call.allows(uid, service)
    }

    /// Whether a peer with `uid` may register as a server of `service`.
    pub fn may_serve(&self, uid: u32, service: &str) -> bool {
        self.uid_rules.load().serve.allows(Some(uid), service)
    }

    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Where requests for `service` go now. A service without a route goes
    /// to a server app that registered it, if any.
    pub fn route(&self, service: &str) -> Route {
        let t = self.table.load();
        match t.routes.get(service) {
            Some(UpstreamSpec::Echo) => Route::Echo,
            Some(UpstreamSpec::Proxy(a)) => Route::Proxy(t.pools[a].clone()),
            Some(UpstreamSpec::Http(a)) => Route::Http(t.https[a].clone()),
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

    pub fn register_local(&self, service: &str, session: u64, tx: LocalTx) {
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
                let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
                let (reply, rx) = oneshot::channel();
                // Dropped before the answer (caller cancelled or gone, deadline
                // passed): tells the server app's session to cancel `key`.
                let mut guard = CancelForward {
                    cancel: &tx.cancel,
                    key,
                    rx: Some(rx),
                    armed: true,
                };
                let fwd = Forward {
                    key,
                    meta,
                    body,
                    deadline,
                    reply,
                };
                if tx.fwd.send(fwd).await.is_err() {
                    guard.armed = false;
                    return Resp::error(status::UNAVAILABLE, "the server app went away");
                }
                let r = guard.rx.as_mut().expect("set above").await;
                guard.armed = false;
                r.unwrap_or_else(|_| Resp::error(status::UNAVAILABLE, "the server app went away"))
            }
            Route::Proxy(pool) => pool.call(meta, body).await,
            Route::Http(h) => h.call(meta, body).await,
            Route::Echo | Route::NotFound => {
                Resp::error(status::INTERNAL, "not a forwarding route")
            }
        }
    };
    let r = match deadline {
        Some(d) => match tokio::time::timeout_at(d.into(), fut).await {
            Ok(r) => r,
            Err(_) => Resp::error(status::DEADLINE_EXCEEDED, "deadline exceeded in the proxy"),
        },
        None => fut.await,
    };
    // The caller's shim parses this metadata: an upstream must not be able
    // to hand it bytes that break the caller's connection.
    if ResponseMeta::decode(&r.meta).is_err() {
        return Resp::error(
            status::INTERNAL,
            "the upstream sent malformed response metadata",
        );
    }
    r
}

/// See `call_upstream`: cancels a forwarded request whose answer is no
/// longer awaited. The receiver is closed first, so that a session taking
/// the request after the cancellation sees it closed and skips it.
struct CancelForward<'a> {
    cancel: &'a mpsc::UnboundedSender<u64>,
    key: u64,
    rx: Option<oneshot::Receiver<Resp>>,
    armed: bool,
}

impl Drop for CancelForward<'_> {
    fn drop(&mut self) {
        drop(self.rx.take());
        if self.armed {
            let _ = self.cancel.send(self.key);
        }
    }
}

/// A small pool of multiplexed TCP connections to another meshshm proxy.
pub struct RemotePool {
    conns: Vec<tokio::sync::Mutex<Option<Arc<RemoteConn>>>>,
    next: AtomicUsize,
    max_message: usize,
    /// Plaintext or mutual TLS (crate::tls), per the upstream's mode.
    tls: crate::tls::Upstream,
}

struct RemoteConn {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Resp>>>,
    next_id: AtomicU64,
    alive: std::sync::atomic::AtomicBool,
}

impl RemotePool {
    /// `tls` says where the pool connects, and how (plaintext or mutual TLS).
    pub fn new(size: usize, max_message: usize, tls: crate::tls::Upstream) -> Self {
        RemotePool {
            conns: (0..size.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
            max_message,
            tls,
        }
    }

    async fn conn(&self) -> Result<Arc<RemoteConn>, String> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let mut g = self.conns[i].lock().await;
        if let Some(c) = g.as_ref().filter(|c| c.alive.load(Ordering::Acquire)) {
            return Ok(c.clone());
        }
        let (mut r, mut w) = self.tls.connect().await?;
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
                // flush: a TLS stream may hold records back otherwise.
                if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
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
            let mut lost = String::from("connection to the upstream proxy lost");
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
                    Ok(0) => break,
                    // The reason (a TLS alert, say) travels to the callers.
                    Err(e) => {
                        lost = format!("{lost}: {e}");
                        break;
                    }
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
                let _ = p.send(Resp::error(status::UNAVAILABLE, &lost));
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
