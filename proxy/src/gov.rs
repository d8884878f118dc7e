//! Mesh governance (docs/GOVERNANCE.md): per-service policies (overload
//! protection, timeouts and retries, attribute routing), access rules with
//! enforce / dry-run modes and handshake tokens, clusters of endpoints with
//! dynamic weights and outlier ejection.
//!
//! Everything here is rebuilt from the configuration on reload and swapped
//! in atomically (`arc-swap`); per-service counters and in-flight counts
//! live in [`SvcState`], which outlives reloads.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use meshshm_proto::{status, HeaderIter, ResponseMeta};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::config::Config;
use crate::metrics::{Hist, Lazy, Metrics, L};
use crate::router::{RemotePool, Resp, Route, Router};

// ---------------------------------------------------------------- config

/// `[admin]`: the loopback admin HTTP port.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminCfg {
    /// "127.0.0.1:15090"; "" = off.
    #[serde(default)]
    pub listen: String,
}

/// `[services.NAME]`: the policy of one service ("*": every service
/// without a section of its own).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceCfg {
    /// Send the service's requests to this cluster ("" = its [routes] entry).
    pub cluster: String,
    /// Overload: most requests in flight (queued or at the upstream); 0 = no limit.
    pub max_in_flight: usize,
    /// Priority 0 is shed past this fraction of `max_in_flight`.
    pub shed_low_at: f64,
    /// Priority 1 is shed past this fraction of `max_in_flight`.
    pub shed_normal_at: f64,
    /// Queueing time (EWMA, ms) past which priority 0 is shed (1 at twice it); 0 = off.
    pub max_queue_ms: u64,
    /// Requests at the upstream at once; more wait in the proxy's queue (0 = no limit).
    pub max_concurrency: usize,
    /// Host CPU use (0..1) past which priority 0 is shed; 0 = off.
    pub shed_low_cpu: f64,
    /// Whole-request timeout (ms, 0 = none): shortens, never extends, the caller's deadline.
    pub timeout_ms: u64,
    /// Timeout of each try (ms, 0 = none).
    pub try_timeout_ms: u64,
    /// Extra tries after a retry-safe failure.
    pub retries: u32,
    /// Retries may add at most this percentage of the service's requests.
    pub retry_budget_percent: f64,
    /// First backoff (ms), doubled per retry.
    pub retry_backoff_ms: u64,
    /// Methods safe to retry after a try timed out (UNAVAILABLE is always retry-safe).
    pub idempotent_methods: Vec<String>,
    /// Request-attribute routes, first match wins.
    pub attribute_routes: Vec<AttrRouteCfg>,
}

impl Default for ServiceCfg {
    fn default() -> Self {
        ServiceCfg {
            cluster: String::new(),
            max_in_flight: 0,
            shed_low_at: 0.5,
            shed_normal_at: 0.8,
            max_queue_ms: 0,
            max_concurrency: 0,
            shed_low_cpu: 0.0,
            timeout_ms: 0,
            try_timeout_ms: 0,
            retries: 0,
            retry_budget_percent: 10.0,
            retry_backoff_ms: 10,
            idempotent_methods: Vec::new(),
            attribute_routes: Vec::new(),
        }
    }
}

/// One request-attribute route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttrRouteCfg {
    pub header: String,
    pub value: String,
    /// "echo" | "local:SERVICE" | "proxy:HOST:PORT" | "cluster:NAME"
    pub to: String,
    /// Share of matching requests sent to `to` (0..=100).
    #[serde(default = "hundred")]
    pub percent: f64,
    /// Only count where traffic would have gone.
    #[serde(default)]
    pub dry_run: bool,
}

fn hundred() -> f64 {
    100.0
}
fn one() -> f64 {
    1.0
}

/// `[clusters.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterCfg {
    /// "weighted-round-robin" (default) or "least-request".
    #[serde(default)]
    pub lb: String,
    /// Scale static weights by measured latency (EWMA) and error rate.
    #[serde(default = "yes")]
    pub dynamic: bool,
    pub endpoints: Vec<EndpointCfg>,
    /// Consecutive failures that eject an endpoint (0 = never).
    #[serde(default = "five")]
    pub eject_after: u32,
    /// How long an ejected endpoint stays out (ms).
    #[serde(default = "eject_ms")]
    pub eject_ms: u64,
}

fn yes() -> bool {
    true
}
fn five() -> u32 {
    5
}
fn eject_ms() -> u64 {
    5000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointCfg {
    /// "echo" | "local:SERVICE" | "proxy:HOST:PORT"
    pub to: String,
    #[serde(default = "one")]
    pub weight: f64,
}

/// `[access.identity]`: tokens that prove the identity a Hello names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityCfg {
    /// Identity (Hello.service) → its token (a string, or a table with an
    /// expiry).
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenCfg>,
    /// A missing, expired or invalid token: "deny" (default; the handshake
    /// is refused) or "allow-degraded" (the session goes on without an
    /// identity).
    #[serde(default)]
    pub invalid_token: String,
    /// Keys (at least 32 bytes each) of signed tokens (crate::token): a
    /// token signed by any of them proves its identity until its expiry.
    /// `meshshm-proxy token mint` signs with the first.
    #[serde(default)]
    pub signing_keys: Vec<String>,
}

/// One `[access.identity.tokens]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenCfg {
    /// `name = "secret"`: valid until the configuration changes.
    Static(String),
    /// `name = { token = "secret", expires = 2027-01-31T00:00:00Z }`.
    Expiring(ExpiringTokenCfg),
}

/// A static token with an expiry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpiringTokenCfg {
    pub token: String,
    /// A TOML offset date-time (with `Z` or `+hh:mm`).
    pub expires: toml::value::Datetime,
}

/// Unix seconds of an offset date-time.
fn unix_secs(d: &toml::value::Datetime) -> Result<u64, String> {
    let (Some(date), Some(time), Some(offset)) = (d.date, d.time, d.offset) else {
        return Err(format!(
            "expires = {d}: give a date, a time and an offset (e.g. 2027-01-31T00:00:00Z)"
        ));
    };
    // Days from 1970-01-01 (proleptic Gregorian; H. Hinnant's days_from_civil).
    let (m, dd) = (date.month as i64, date.day as i64);
    let y = date.year as i64 - (m <= 2) as i64;
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let off = match offset {
        toml::value::Offset::Z => 0,
        toml::value::Offset::Custom { minutes } => minutes as i64 * 60,
    };
    let secs = days * 86_400
        + time.hour as i64 * 3600
        + time.minute as i64 * 60
        + time.second.unwrap_or(0) as i64
        - off;
    u64::try_from(secs).map_err(|_| format!("expires = {d}: before 1970"))
}

/// `[[access.rules]]`: who may call which services.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRuleCfg {
    /// Services the rule covers ("*" = all).
    pub services: Vec<String>,
    /// Methods it covers (empty = all).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Peers allowed by uid (shm).
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Peers allowed by identity: a Hello.service proven by its token, or
    /// an mTLS peer's identity ("*" = any verified identity).
    #[serde(default)]
    pub identities: Vec<String>,
    /// "enforce" (default) or "dry-run".
    #[serde(default)]
    pub mode: String,
}

/// Check the governance parts of a configuration.
pub fn check(c: &Config) -> Result<(), String> {
    if !c.http.listen.is_empty() {
        c.http
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| format!("http.listen = {:?}: {e}", c.http.listen))?;
    }
    if !c.admin.listen.is_empty() {
        c.admin
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| format!("admin.listen = {:?}: {e}", c.admin.listen))?;
    }
    match c.access.identity.invalid_token.as_str() {
        "" | "deny" | "allow-degraded" => {}
        o => {
            return Err(format!(
                "access.identity.invalid_token = {o:?}: expected \"deny\" or \"allow-degraded\""
            ))
        }
    }
    for (name, t) in &c.access.identity.tokens {
        if let TokenCfg::Expiring(e) = t {
            unix_secs(&e.expires).map_err(|x| format!("access.identity.tokens.{name}: {x}"))?;
        }
    }
    for (i, k) in c.access.identity.signing_keys.iter().enumerate() {
        if k.len() < crate::token::MIN_KEY_LEN {
            return Err(format!(
                "access.identity.signing_keys[{i}]: at least {} bytes (meshshm-proxy token keygen makes one)",
                crate::token::MIN_KEY_LEN
            ));
        }
    }
    for (i, r) in c.access.rules.iter().enumerate() {
        match r.mode.as_str() {
            "" | "enforce" | "dry-run" => {}
            o => {
                return Err(format!(
                    "access.rules[{i}].mode = {o:?}: expected \"enforce\" or \"dry-run\""
                ))
            }
        }
        if r.services.is_empty() {
            return Err(format!("access.rules[{i}]: services is empty"));
        }
    }
    for (name, cl) in &c.clusters {
        if cl.endpoints.is_empty() {
            return Err(format!("clusters.{name}: no endpoints"));
        }
        match cl.lb.as_str() {
            "" | "weighted-round-robin" | "least-request" => {}
            o => return Err(format!("clusters.{name}.lb = {o:?}: expected \"weighted-round-robin\" or \"least-request\"")),
        }
        for e in &cl.endpoints {
            if e.to.starts_with("cluster:") {
                return Err(format!("clusters.{name}: an endpoint cannot be a cluster"));
            }
            parse_dest(&e.to, c).map_err(|x| format!("clusters.{name}: {x}"))?;
            if e.weight.is_nan() || e.weight <= 0.0 {
                return Err(format!(
                    "clusters.{name}: endpoint {:?}: weight must be > 0",
                    e.to
                ));
            }
        }
    }
    for (svc, s) in &c.services {
        let at = |f: f64| (0.0..=1.0).contains(&f);
        if !at(s.shed_low_at) || !at(s.shed_normal_at) || !at(s.shed_low_cpu) {
            return Err(format!(
                "services.{svc}: shed_low_at, shed_normal_at, shed_low_cpu must be in 0..=1"
            ));
        }
        if !s.cluster.is_empty() && !c.clusters.contains_key(&s.cluster) {
            return Err(format!(
                "services.{svc}.cluster = {:?}: no such cluster",
                s.cluster
            ));
        }
        if !(0.0..=100.0).contains(&s.retry_budget_percent) {
            return Err(format!(
                "services.{svc}.retry_budget_percent must be in 0..=100"
            ));
        }
        for r in &s.attribute_routes {
            if !(0.0..=100.0).contains(&r.percent) {
                return Err(format!(
                    "services.{svc}.attribute_routes: percent must be in 0..=100"
                ));
            }
            parse_dest(&r.to, c).map_err(|x| format!("services.{svc}.attribute_routes: {x}"))?;
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq)]
enum DestSpec {
    Echo,
    Local(String),
    Proxy(SocketAddr),
    Http(SocketAddr),
    Cluster(String),
}

fn parse_dest(s: &str, c: &Config) -> Result<DestSpec, String> {
    if s == "echo" {
        return Ok(DestSpec::Echo);
    }
    if let Some(n) = s.strip_prefix("local:") {
        return Ok(DestSpec::Local(n.to_owned()));
    }
    if let Some(a) = s.strip_prefix("proxy:") {
        return a
            .parse()
            .map(DestSpec::Proxy)
            .map_err(|e| format!("{s:?}: bad address: {e}"));
    }
    if let Some(a) = s.strip_prefix("http:") {
        return a
            .parse()
            .map(DestSpec::Http)
            .map_err(|e| format!("{s:?}: bad address: {e}"));
    }
    if let Some(n) = s.strip_prefix("cluster:") {
        if !c.clusters.contains_key(n) {
            return Err(format!("{s:?}: no such cluster"));
        }
        return Ok(DestSpec::Cluster(n.to_owned()));
    }
    Err(format!(
        "destination {s:?}: expected \"echo\", \"local:SERVICE\", \"proxy:HOST:PORT\", \"http:HOST:PORT\" or \"cluster:NAME\""
    ))
}

// ---------------------------------------------------------------- peers

/// What one session counts of its requests (and of the echo answers it
/// writes itself), added to the shared metrics in one go by
/// [`Governor::flush`], which the session calls before its answers go out.
/// A shared counter's update is a locked instruction, and on x86 that also
/// waits for every store before it to leave the core — here, the copies of
/// the answers just written into the app's ring. (1 KiB, 128 in flight:
/// four such updates per echo answer were ~9% of the proxy's CPU.)
#[derive(Default)]
pub struct Tally {
    svc: Option<(Arc<SvcState>, Transport)>,
    /// What this session knows to be a plain echo ([`Governor::echo_known`]).
    echo: KnownEcho,
    requests: u64,
    ok: u64,
    latency: crate::metrics::LocalHist,
}

impl Tally {
    /// Count for `st` on `tr` from now on (what was counted for another
    /// service goes to the shared metrics first).
    fn to(&mut self, m: &Metrics, st: &Arc<SvcState>, tr: Transport) {
        match &self.svc {
            Some((s, t)) if Arc::ptr_eq(s, st) && *t == tr => {}
            _ => {
                self.flush(m);
                self.svc = Some((st.clone(), tr));
                self.echo.holds = false;
            }
        }
    }

    fn flush(&mut self, m: &Metrics) {
        let Some((st, tr)) = &self.svc else { return };
        let pt = &st.t[*tr as usize];
        if self.requests > 0 {
            pt.requests.inc_by(std::mem::take(&mut self.requests));
        }
        if self.ok > 0 {
            st.count_statuses(m, *tr, status::OK, std::mem::take(&mut self.ok));
        }
        self.latency.flush_into(&pt.latency);
    }
}

/// A service whose calls from one session are answered by echo with no
/// policy to apply, under configuration generation `generation` (and it is
/// the service the session's [`Tally`] counts for); `holds` says whether
/// this is known at all.
#[derive(Default)]
struct KnownEcho {
    service: String,
    generation: u64,
    holds: bool,
}

/// The transport a session came on (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Shm = 0,
    Tcp = 1,
    Http = 2,
}

const TRANSPORTS: [&str; 3] = ["shm", "tcp", "http"];

/// Who is on the other end of a session, resolved once at its start.
pub struct Peer {
    /// SO_PEERCRED uid (shm); `None` over TCP.
    pub uid: Option<u32>,
    /// A verified identity: Hello.service proven by its token, or a TLS
    /// peer's certificate identity.
    pub identity: Option<String>,
    pub transport: Transport,
    sessions: Gauge,
    /// Unix time at which `identity` stops counting (its token's expiry).
    identity_until: Option<u64>,
    /// The expiry was seen (and counted) during the session.
    expired_seen: AtomicBool,
}

impl Peer {
    /// The verified identity, while its token has not expired. Past the
    /// expiry the session goes on without it (counted once, as
    /// `reason="expired", action="dropped"`).
    fn identity(&self, m: &Metrics) -> Option<&str> {
        let id = self.identity.as_deref()?;
        match self.identity_until {
            Some(t) if crate::token::now_unix() >= t => {
                if !self.expired_seen.swap(true, Ordering::Relaxed) {
                    count_token_failure(m, "expired", "dropped");
                    tracing::warn!(
                        identity = id,
                        uid = ?self.uid,
                        "the session's token expired: its identity no longer counts \
                         (the app must reconnect with a new token)"
                    );
                }
                None
            }
            _ => Some(id),
        }
    }
}

fn count_token_failure(m: &Metrics, reason: &str, action: &str) {
    m.token_failures
        .get_or_create(&vec![
            ("reason", reason.to_owned()),
            ("action", action.to_owned()),
        ])
        .inc();
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.sessions.dec();
    }
}

// ---------------------------------------------------------------- state

/// Per-service counters and measurements; outlive reloads.
pub struct SvcState {
    name: String,
    policy: ArcSwapOption<Policy>,
    /// Forwarded requests in flight (the gauge is the counter).
    in_flight: Gauge,
    /// EWMA of queueing time, µs (f64 bits).
    queue_us: AtomicU64,
    /// Retry budget, in thousandths of a retry.
    retry_tokens: AtomicI64,
    t: [PerTransport; 3],
    shed: [Lazy; 3],
    /// Dropped unserved while queued: [deadline passed, caller gone/cancelled].
    expired: [Lazy; 2],
    denied: [Lazy; 2],
    retries: Lazy,
}

struct PerTransport {
    requests: Counter,
    status: [Lazy; 17],
    latency: Hist,
}

impl SvcState {
    fn new(name: &str, m: &Metrics, policy: Option<Arc<Policy>>) -> SvcState {
        let pt = |t: &str| {
            let l: L = vec![("service", name.to_owned()), ("transport", t.to_owned())];
            PerTransport {
                requests: m.requests.get_or_create(&l).clone(),
                status: std::array::from_fn(|_| Lazy::new()),
                latency: m.latency.get_or_create(&l).clone(),
            }
        };
        SvcState {
            name: name.to_owned(),
            policy: ArcSwapOption::new(policy),
            in_flight: m
                .in_flight
                .get_or_create(&vec![("service", name.to_owned())])
                .clone(),
            queue_us: AtomicU64::new(0f64.to_bits()),
            retry_tokens: AtomicI64::new(10_000),
            t: [pt("shm"), pt("tcp"), pt("http")],
            shed: std::array::from_fn(|_| Lazy::new()),
            expired: std::array::from_fn(|_| Lazy::new()),
            denied: std::array::from_fn(|_| Lazy::new()),
            retries: Lazy::new(),
        }
    }

    fn count_status(&self, m: &Metrics, tr: Transport, code: u32) {
        self.count_statuses(m, tr, code, 1);
    }

    fn count_statuses(&self, m: &Metrics, tr: Transport, code: u32, n: u64) {
        let i = (code as usize).min(16);
        self.t[tr as usize].status[i]
            .get(&m.responses, || {
                vec![
                    ("service", self.name.clone()),
                    ("transport", TRANSPORTS[tr as usize].to_owned()),
                    ("status", status::name(code).replace(' ', "_")),
                ]
            })
            .inc_by(n);
    }

    /// Count a request dropped unserved from the queue (0: deadline, 1: cancelled).
    fn dropped(&self, m: &Metrics, why: usize) {
        self.expired[why]
            .get(&m.expired, || {
                vec![
                    ("service", self.name.clone()),
                    ("reason", ["deadline", "cancelled"][why].to_owned()),
                ]
            })
            .inc();
    }

    fn queue_ewma(&self) -> f64 {
        f64::from_bits(self.queue_us.load(Ordering::Relaxed))
    }

    fn record_queue(&self, d: Duration) {
        let old = self.queue_ewma();
        let new = old * 0.8 + d.as_micros() as f64 * 0.2;
        self.queue_us.store(new.to_bits(), Ordering::Relaxed);
    }
}

/// Decrements a service's in-flight count when the request ends (or its
/// task is aborted).
struct InFlightGuard(Gauge);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

// ---------------------------------------------------------------- policy

struct Rule {
    methods: Vec<String>,
    uids: Vec<u32>,
    identities: Vec<String>,
    enforce: bool,
}

impl Rule {
    fn covers_method(&self, m: &str) -> bool {
        self.methods.is_empty() || self.methods.iter().any(|x| x == m)
    }
    fn allows(&self, p: &Peer, m: &Metrics) -> bool {
        p.uid.is_some_and(|u| self.uids.contains(&u))
            || (!self.identities.is_empty()
                && p.identity(m)
                    .is_some_and(|i| self.identities.iter().any(|x| x == i || x == "*")))
    }
}

struct Overload {
    max: i64,
    low: i64,
    normal: i64,
    max_queue_us: f64,
    shed_cpu: f64,
}

struct AttrRoute {
    header: String,
    value: Vec<u8>,
    dest: Dest,
    /// Share in 0..=1.
    share: f64,
    dry_run: bool,
    n: AtomicU64,
    hits: Counter,
}

/// A service's policy, rebuilt on reload.
pub struct Policy {
    rules: Vec<Arc<Rule>>,
    overload: Option<Overload>,
    concurrency: Option<Arc<Semaphore>>,
    attr: Vec<AttrRoute>,
    /// `Dest::Cluster` of the service's `cluster`.
    cluster: Option<Dest>,
    timeout: Option<Duration>,
    try_timeout: Option<Duration>,
    retries: u32,
    budget_milli: i64,
    backoff: Duration,
    idempotent: Vec<String>,
}

impl Policy {
    fn empty() -> Policy {
        Policy {
            rules: Vec::new(),
            overload: None,
            concurrency: None,
            attr: Vec::new(),
            cluster: None,
            timeout: None,
            try_timeout: None,
            retries: 0,
            budget_milli: 0,
            backoff: Duration::ZERO,
            idempotent: Vec::new(),
        }
    }
}

#[derive(Clone)]
enum Dest {
    Echo,
    Local(String),
    Proxy(Arc<RemotePool>),
    Http(Arc<crate::http::HttpUpstream>),
    Cluster(Arc<Cluster>),
}

impl Dest {
    fn resolve(&self, router: &Router) -> Route {
        match self {
            Dest::Echo => Route::Echo,
            Dest::Local(s) => router.route(s),
            Dest::Proxy(p) => Route::Proxy(p.clone()),
            Dest::Http(h) => Route::Http(h.clone()),
            // Endpoints are never clusters (checked).
            Dest::Cluster(_) => Route::NotFound,
        }
    }
}

// ---------------------------------------------------------------- clusters

struct Endpoint {
    dest: Dest,
    weight: f64,
    /// EWMA latency, µs (f64 bits; 0 = no sample yet).
    ewma_us: AtomicU64,
    /// EWMA error rate (f64 bits).
    err: AtomicU64,
    in_flight: AtomicI64,
    consecutive: AtomicU32,
    /// ms since the cluster's epoch until which the endpoint is ejected.
    ejected_until: AtomicU64,
    requests: Counter,
    weight_g: Gauge<f64, AtomicU64>,
    ejections: Counter,
}

pub struct Cluster {
    eps: Vec<Endpoint>,
    least_request: bool,
    dynamic: bool,
    eject_after: u32,
    eject_ms: u64,
    epoch: Instant,
    n: AtomicU64,
}

/// Latency charged to a failed try, µs.
const FAILURE_PENALTY_US: f64 = 100_000.0;

/// A well-spread number in 0..1 for the n-th draw (golden-ratio sequence):
/// any window of draws splits in proportion to the shares, without an RNG.
fn spread(n: u64) -> f64 {
    (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64
}

impl Cluster {
    fn effective(&self, e: &Endpoint, floor_us: f64) -> f64 {
        if !self.dynamic {
            return e.weight;
        }
        let lat = f64::from_bits(e.ewma_us.load(Ordering::Relaxed));
        let lat = if lat <= 0.0 { floor_us } else { lat }.max(1.0);
        let err = f64::from_bits(e.err.load(Ordering::Relaxed));
        e.weight / lat * (1.0 - err).max(0.02)
    }

    /// Pick for a retry: another endpoint than `prev` if one is live.
    fn pick_other(&self, prev: usize) -> usize {
        for _ in 0..4 {
            let i = self.pick();
            if i != prev {
                return i;
            }
        }
        prev
    }

    fn pick(&self) -> usize {
        let now = self.epoch.elapsed().as_millis() as u64;
        let live = |e: &Endpoint| e.ejected_until.load(Ordering::Relaxed) <= now;
        let any_live = self.eps.iter().any(live);
        // An endpoint without samples is assumed as fast as the fastest.
        let floor = self
            .eps
            .iter()
            .map(|e| f64::from_bits(e.ewma_us.load(Ordering::Relaxed)))
            .filter(|&l| l > 0.0)
            .fold(f64::MAX, f64::min);
        let floor = if floor == f64::MAX { 100.0 } else { floor };
        let ok = |e: &Endpoint| !any_live || live(e);
        if self.least_request {
            // Ties (an idle cluster of equal weights) go round robin: the
            // scan starts one endpoint further each time. Always starting
            // at the first would send all traffic at low load to it, and
            // leave the others unmeasured.
            let k = self.eps.len();
            let start = self.n.fetch_add(1, Ordering::Relaxed) as usize % k;
            let mut best = (start, f64::MAX);
            for i in (start..k).chain(0..start) {
                let e = &self.eps[i];
                if !ok(e) {
                    continue;
                }
                let score =
                    (e.in_flight.load(Ordering::Relaxed) + 1) as f64 / self.effective(e, floor);
                if score < best.1 {
                    best = (i, score);
                }
            }
            return best.0;
        }
        let total: f64 = self
            .eps
            .iter()
            .filter(|e| ok(e))
            .map(|e| self.effective(e, floor))
            .sum();
        let mut x = spread(self.n.fetch_add(1, Ordering::Relaxed)) * total;
        let mut last = 0;
        for (i, e) in self.eps.iter().enumerate().filter(|(_, e)| ok(e)) {
            let w = self.effective(e, floor);
            if x < w {
                return i;
            }
            x -= w;
            last = i;
        }
        last
    }

    fn record(&self, i: usize, took: Duration, failed: bool) {
        let e = &self.eps[i];
        let a = 0.2;
        let old = f64::from_bits(e.ewma_us.load(Ordering::Relaxed));
        // A failure counts as a slow answer too: a fast-failing endpoint
        // must not win traffic by its low latency.
        let us = took.as_micros() as f64 + if failed { FAILURE_PENALTY_US } else { 0.0 };
        let new = if old <= 0.0 {
            us
        } else {
            old * (1.0 - a) + us * a
        };
        e.ewma_us.store(new.to_bits(), Ordering::Relaxed);
        let olde = f64::from_bits(e.err.load(Ordering::Relaxed));
        let newe = olde * (1.0 - a) + if failed { a } else { 0.0 };
        e.err.store(newe.to_bits(), Ordering::Relaxed);
        if failed {
            let n = e.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
            if self.eject_after > 0 && n >= self.eject_after {
                e.consecutive.store(0, Ordering::Relaxed);
                let until = self.epoch.elapsed().as_millis() as u64 + self.eject_ms;
                e.ejected_until.store(until, Ordering::Relaxed);
                // Re-admitted with a clean slate after the ejection.
                e.err.store(0f64.to_bits(), Ordering::Relaxed);
                e.ewma_us.store(0f64.to_bits(), Ordering::Relaxed);
                e.ejections.inc();
                tracing::warn!(endpoint = i, ms = self.eject_ms, "cluster endpoint ejected");
            }
        } else {
            e.consecutive.store(0, Ordering::Relaxed);
        }
        let floor = self
            .eps
            .iter()
            .map(|e| f64::from_bits(e.ewma_us.load(Ordering::Relaxed)))
            .filter(|&l| l > 0.0)
            .fold(f64::MAX, f64::min);
        let total: f64 = self.eps.iter().map(|x| self.effective(x, floor)).sum();
        if total > 0.0 {
            e.weight_g.set(self.effective(e, floor) / total);
        }
    }
}

// ---------------------------------------------------------------- the governor

/// What a reload replaces.
struct Gov {
    policies: HashMap<String, Arc<Policy>>,
    /// For services without a section of their own ("*" section and rules).
    rest: Option<Arc<Policy>>,
    /// Identity → (static token, Unix expiry).
    tokens: HashMap<String, (String, Option<u64>)>,
    /// Keys of signed tokens (crate::token).
    keys: Vec<ring::hmac::Key>,
    deny_bad_token: bool,
}

/// The governance state of the proxy.
pub struct Governor {
    pub metrics: Metrics,
    gov: ArcSwap<Gov>,
    states: ArcSwap<States>,
    states_lock: Mutex<()>,
    /// Host CPU use in 0..1 (f64 bits), sampled every second.
    host_cpu: AtomicU64,
    /// The admin port's address ("" = off), from the start configuration.
    pub admin: String,
    /// Bumped after each reload (routes, uid rules and policies swapped
    /// in): what a session remembers of a decision ([`Tally`]'s echo) holds
    /// only for the generation it was made in.
    generation: AtomicU64,
}

/// Service name → state. Hashed with FNV-1a: the names are short and this
/// lookup is on every request (SipHash's flood resistance is not needed:
/// the map is bounded by MAX_SERVICES).
type States = HashMap<String, Arc<SvcState>, std::hash::BuildHasherDefault<Fnv>>;

#[derive(Default)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        self.0 = h;
    }
}

/// Most distinct service names tracked; later names share "_other".
const MAX_SERVICES: usize = 1024;

impl Governor {
    pub fn new(cfg: &Config, tls: &Arc<crate::tls::Tls>) -> Governor {
        let metrics = Metrics::new();
        let gov = build(cfg, tls, &metrics);
        Governor {
            metrics,
            gov: ArcSwap::from_pointee(gov),
            states: ArcSwap::from_pointee(States::default()),
            states_lock: Mutex::new(()),
            host_cpu: AtomicU64::new(0f64.to_bits()),
            admin: cfg.admin.listen.clone(),
            generation: AtomicU64::new(0),
        }
    }

    /// Swap in the governance parts of a new (checked) configuration.
    pub fn reload(&self, cfg: &Config, tls: &Arc<crate::tls::Tls>) {
        let gov = Arc::new(build(cfg, tls, &self.metrics));
        let _g = self.states_lock.lock().unwrap_or_else(|p| p.into_inner());
        for (name, st) in self.states.load().iter() {
            st.policy.store(policy_for(&gov, name));
        }
        self.gov.store(gov);
        // (The caller swapped the routes and uid rules in before: reload.rs.)
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// A call to `service` that this session's earlier calls showed to be
    /// a plain echo (allowed by the uid rules, no policy, routed to echo)
    /// under the current configuration: counted in `tally`, and `true`
    /// (answer it by echo). `false`: go through the uid rules and
    /// [`Governor::decide`]. (Those cost ~0.1 µs a call, a sixth of the
    /// proxy's work on a 1 KiB echo.)
    pub fn echo_known(&self, tally: &mut Tally, service: &str, t0: Instant) -> bool {
        let e = &tally.echo;
        if !(e.holds
            && e.generation == self.generation.load(Ordering::Acquire)
            && e.service == service)
        {
            return false;
        }
        tally.requests += 1;
        tally.latency.observe(t0.elapsed());
        tally.ok += 1;
        true
    }

    pub fn set_host_cpu(&self, v: f64) {
        self.host_cpu.store(v.to_bits(), Ordering::Relaxed);
        self.metrics.host_cpu.set(v);
    }

    fn insert(&self, name: &str) -> Arc<SvcState> {
        let _g = self.states_lock.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.states.load();
        if let Some(s) = cur.get(name) {
            return s.clone();
        }
        let name = if cur.len() >= MAX_SERVICES {
            if let Some(s) = cur.get("_other") {
                return s.clone();
            }
            "_other"
        } else {
            name
        };
        let st = Arc::new(SvcState::new(
            name,
            &self.metrics,
            policy_for(&self.gov.load(), name),
        ));
        let mut next = States::clone(&cur);
        next.insert(name.to_owned(), st.clone());
        self.states.store(Arc::new(next));
        st
    }

    /// The peer of a new shm session: checks the Hello's token.
    ///
    /// # Errors
    /// A missing, expired or invalid token where the configuration denies it.
    pub fn peer_shm(&self, uid: u32, service: &str, token: &str) -> Result<Peer, String> {
        let gov = self.gov.load();
        let (identity, until) = match check_token(&gov, service, token) {
            Ok(None) => (None, None),
            Ok(Some(until)) => (Some(service.to_owned()), until),
            Err(reason) => {
                let action = if gov.deny_bad_token {
                    "deny"
                } else {
                    "degraded"
                };
                count_token_failure(&self.metrics, reason, action);
                if gov.deny_bad_token {
                    return Err(format!("{reason} token for identity {service:?}"));
                }
                tracing::warn!(
                    uid,
                    service,
                    reason,
                    "bad token: session allowed without an identity (degraded)"
                );
                (None, None)
            }
        };
        let mut p = self.peer(Some(uid), identity, Transport::Shm);
        p.identity_until = until;
        Ok(p)
    }

    /// The peer of a session.
    pub fn peer(&self, uid: Option<u32>, identity: Option<String>, t: Transport) -> Peer {
        let l: L = vec![("transport", TRANSPORTS[t as usize].to_owned())];
        self.metrics.sessions_total.get_or_create(&l).inc();
        let sessions = self.metrics.sessions.get_or_create(&l).clone();
        sessions.inc();
        Peer {
            uid,
            identity,
            transport: t,
            sessions,
            identity_until: None,
            expired_seen: AtomicBool::new(false),
        }
    }

    /// Count a reload.
    pub fn count_reload(&self, ok: bool) {
        let r = if ok { "ok" } else { "refused" };
        self.metrics
            .reloads
            .get_or_create(&vec![("result", r.to_owned())])
            .inc();
    }
}

/// What the Hello's token proves: `Ok(None)` no identity claimed (no token,
/// and none configured for the name), `Ok(Some(until))` the identity,
/// until a Unix time or for good; `Err(reason)` missing, expired or invalid.
fn check_token(gov: &Gov, service: &str, token: &str) -> Result<Option<Option<u64>>, &'static str> {
    if let Some((t, exp)) = gov.tokens.get(service) {
        if !t.is_empty() && ct_eq(t.as_bytes(), token.as_bytes()) {
            return match exp {
                Some(e) if *e <= crate::token::now_unix() => Err("expired"),
                e => Ok(Some(*e)),
            };
        }
    }
    if !gov.keys.is_empty() && token.starts_with(crate::token::PREFIX) {
        use crate::token::Verdict;
        match crate::token::verify(&gov.keys, service, token, crate::token::now_unix()) {
            Verdict::Valid(until) => return Ok(Some(Some(until))),
            Verdict::Expired => return Err("expired"),
            Verdict::Invalid => {}
        }
    }
    match (gov.tokens.contains_key(service), token.is_empty()) {
        (false, true) => Ok(None),
        (true, true) => Err("missing"),
        (_, false) => Err("invalid"),
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn policy_for(gov: &Gov, name: &str) -> Option<Arc<Policy>> {
    gov.policies.get(name).cloned().or_else(|| gov.rest.clone())
}

fn build(cfg: &Config, tls: &Arc<crate::tls::Tls>, m: &Metrics) -> Gov {
    let max_message = cfg.shm.max_message as usize;
    let mut pools: HashMap<SocketAddr, Arc<RemotePool>> = HashMap::new();
    let mut dest = |spec: DestSpec, clusters: &HashMap<String, Arc<Cluster>>| match spec {
        DestSpec::Echo => Dest::Echo,
        DestSpec::Local(s) => Dest::Local(s),
        DestSpec::Proxy(a) => Dest::Proxy(
            pools
                .entry(a)
                .or_insert_with(|| Arc::new(RemotePool::new(2, max_message, tls.upstream(a))))
                .clone(),
        ),
        DestSpec::Http(a) => Dest::Http(Arc::new(crate::http::HttpUpstream::new(a, max_message))),
        DestSpec::Cluster(n) => Dest::Cluster(clusters[&n].clone()),
    };
    let mut clusters: HashMap<String, Arc<Cluster>> = HashMap::new();
    for (name, c) in &cfg.clusters {
        let eps = c
            .endpoints
            .iter()
            .map(|e| {
                let l: L = vec![("cluster", name.clone()), ("endpoint", e.to.clone())];
                Endpoint {
                    dest: dest(parse_dest(&e.to, cfg).expect("checked"), &clusters),
                    weight: e.weight,
                    ewma_us: AtomicU64::new(0f64.to_bits()),
                    err: AtomicU64::new(0f64.to_bits()),
                    in_flight: AtomicI64::new(0),
                    consecutive: AtomicU32::new(0),
                    ejected_until: AtomicU64::new(0),
                    requests: m.endpoint_requests.get_or_create(&l).clone(),
                    weight_g: m.endpoint_weight.get_or_create(&l).clone(),
                    ejections: m.endpoint_ejections.get_or_create(&l).clone(),
                }
            })
            .collect();
        clusters.insert(
            name.clone(),
            Arc::new(Cluster {
                eps,
                least_request: c.lb == "least-request",
                dynamic: c.dynamic,
                eject_after: c.eject_after,
                eject_ms: c.eject_ms,
                epoch: Instant::now(),
                n: AtomicU64::new(0),
            }),
        );
    }
    // Access rules, per service name ("*" rules go everywhere).
    let mut by_svc: BTreeMap<String, Vec<Arc<Rule>>> = BTreeMap::new();
    let mut wild: Vec<Arc<Rule>> = Vec::new();
    for r in &cfg.access.rules {
        let rule = Arc::new(Rule {
            methods: r.methods.clone(),
            uids: r.uids.clone(),
            identities: r.identities.clone(),
            enforce: r.mode != "dry-run",
        });
        for s in &r.services {
            if s == "*" {
                wild.push(rule.clone());
            } else {
                by_svc.entry(s.clone()).or_default().push(rule.clone());
            }
        }
    }
    let mut mk = |name: &str, s: Option<&ServiceCfg>| -> Policy {
        let mut p = Policy::empty();
        p.rules = by_svc.get(name).cloned().unwrap_or_default();
        p.rules.extend(wild.iter().cloned());
        let Some(s) = s else { return p };
        if s.max_in_flight > 0 || s.max_queue_ms > 0 || s.shed_low_cpu > 0.0 {
            let max = if s.max_in_flight > 0 {
                s.max_in_flight as i64
            } else {
                i64::MAX
            };
            let frac = |f: f64| {
                if max == i64::MAX {
                    i64::MAX
                } else {
                    ((max as f64 * f).round() as i64).max(1)
                }
            };
            p.overload = Some(Overload {
                max,
                low: frac(s.shed_low_at),
                normal: frac(s.shed_normal_at),
                max_queue_us: s.max_queue_ms as f64 * 1000.0,
                shed_cpu: s.shed_low_cpu,
            });
        }
        p.concurrency =
            (s.max_concurrency > 0).then(|| Arc::new(Semaphore::new(s.max_concurrency)));
        p.cluster = (!s.cluster.is_empty()).then(|| Dest::Cluster(clusters[&s.cluster].clone()));
        p.timeout = (s.timeout_ms > 0).then(|| Duration::from_millis(s.timeout_ms));
        p.try_timeout = (s.try_timeout_ms > 0).then(|| Duration::from_millis(s.try_timeout_ms));
        p.retries = s.retries;
        p.budget_milli = (s.retry_budget_percent * 10.0) as i64;
        p.backoff = Duration::from_millis(s.retry_backoff_ms);
        p.idempotent = s.idempotent_methods.clone();
        for r in &s.attribute_routes {
            let spec = parse_dest(&r.to, cfg).expect("checked");
            p.attr.push(AttrRoute {
                header: r.header.clone(),
                value: r.value.as_bytes().to_vec(),
                dest: dest(spec, &clusters),
                share: r.percent / 100.0,
                dry_run: r.dry_run,
                n: AtomicU64::new(0),
                hits: m
                    .rollout
                    .get_or_create(&vec![
                        ("service", name.to_owned()),
                        ("header", r.header.clone()),
                        ("value", r.value.clone()),
                        ("to", r.to.clone()),
                        ("dry_run", r.dry_run.to_string()),
                    ])
                    .clone(),
            });
        }
        p
    };
    let mut policies = HashMap::new();
    for (name, s) in &cfg.services {
        if name != "*" {
            policies.insert(name.clone(), Arc::new(mk(name, Some(s))));
        }
    }
    for name in by_svc.keys() {
        if !policies.contains_key(name) {
            let p = mk(name, cfg.services.get("*"));
            policies.insert(name.clone(), Arc::new(p));
        }
    }
    let rest = (!wild.is_empty() || cfg.services.contains_key("*"))
        .then(|| Arc::new(mk("*", cfg.services.get("*"))));
    Gov {
        policies,
        rest,
        tokens: cfg
            .access
            .identity
            .tokens
            .iter()
            .map(|(k, v)| {
                let t = match v {
                    TokenCfg::Static(t) => (t.clone(), None),
                    TokenCfg::Expiring(e) => (e.token.clone(), unix_secs(&e.expires).ok()),
                };
                (k.clone(), t)
            })
            .collect(),
        keys: cfg
            .access
            .identity
            .signing_keys
            .iter()
            .map(|k| crate::token::key(k))
            .collect(),
        deny_bad_token: cfg.access.identity.invalid_token != "allow-degraded",
    }
}

// ---------------------------------------------------------------- the request path

/// What governance decided for one request.
pub enum Decision {
    /// Answer at once (denied, shed).
    Reply(Resp),
    /// Go on: answer inline (echo) or run `Job`.
    Echo,
    Forward(Job),
    NotFound,
}

/// A forwarded request, run by `Job::run` in its own task.
pub struct Job {
    st: Arc<SvcState>,
    tr: Transport,
    policy: Option<Arc<Policy>>,
    route: Route,
    /// Where retries go (`None`: the service's route).
    dest: Option<Dest>,
    ep: Option<(Arc<Cluster>, usize)>,
    idempotent: bool,
    /// When the request arrived (latency and the route timeout count from it).
    t0: Instant,
    _guard: InFlightGuard,
}

fn shed_reply(st: &SvcState, m: &Metrics, prio: u8, why: &str) -> Resp {
    let i = (prio as usize).min(2);
    st.shed[i]
        .get(&m.shed, || {
            vec![
                ("service", st.name.clone()),
                ("priority", ["low", "normal", "high"][i].to_owned()),
            ]
        })
        .inc();
    Resp::error(
        status::RESOURCE_EXHAUSTED,
        &format!(
            "service {:?} is overloaded ({why}); priority {prio} shed",
            st.name
        ),
    )
}

impl Governor {
    /// Decide what to do with one request (after the uid rules of
    /// `[access.call]`): access rules, attribute routing, overload.
    #[allow(clippy::too_many_arguments)]
    pub fn decide(
        &self,
        tally: &mut Tally,
        router: &Router,
        peer: &Peer,
        service: &str,
        method: &str,
        priority: u8,
        headers: HeaderIter<'_>,
        t0: Instant,
    ) -> Decision {
        // Before any configuration is read: a reload from now on makes
        // what is remembered below stale.
        let generation = self.generation.load(Ordering::Acquire);
        let states = self.states.load();
        let owned;
        let st: &Arc<SvcState> = match states.get(service) {
            Some(s) => s,
            None => {
                owned = self.insert(service);
                &owned
            }
        };
        tally.to(&self.metrics, st, peer.transport);
        tally.requests += 1;
        let pol_guard = st.policy.load();
        let pol: Option<&Policy> = pol_guard.as_deref();
        let m = &self.metrics;
        let mut dest: Option<&Dest> = None;
        if let Some(p) = pol {
            // Access rules.
            let covering = p.rules.iter().filter(|r| r.covers_method(method));
            let mut any = false;
            let mut enforce = false;
            let mut allowed = false;
            for r in covering {
                any = true;
                enforce |= r.enforce;
                if r.allows(peer, m) {
                    allowed = true;
                    break;
                }
            }
            if any && !allowed {
                let mode = if enforce { "enforce" } else { "dry-run" };
                let seen = st.denied[enforce as usize]
                    .get(&m.denied, || {
                        vec![("service", st.name.clone()), ("mode", mode.to_owned())]
                    })
                    .inc();
                let who = || match (&peer.identity, peer.uid) {
                    (Some(i), _) => format!("identity {i:?}"),
                    (None, Some(u)) => format!("uid {u}"),
                    (None, None) => "a TCP peer".to_owned(),
                };
                if enforce {
                    let who = who();
                    tracing::debug!(service, method, %who, "call denied by access rules");
                    let r = Resp::error(
                        status::PERMISSION_DENIED,
                        &format!("{who} may not call {service}/{method}"),
                    );
                    st.count_status(m, peer.transport, status::PERMISSION_DENIED);
                    return Decision::Reply(r);
                }
                // Logged the first time and every 1000th after (no log flood).
                if seen % 1000 == 0 {
                    let who = who();
                    tracing::info!(service, method, %who, would_deny = seen + 1, "dry-run: access rules would deny this call");
                }
            }
            // Attribute routes.
            if !p.attr.is_empty() {
                'found: for (name, value) in headers {
                    for a in &p.attr {
                        if a.header.eq_ignore_ascii_case(name) && a.value == value {
                            let n = a.n.fetch_add(1, Ordering::Relaxed);
                            if spread(n) < a.share {
                                a.hits.inc();
                                if !a.dry_run {
                                    dest = Some(&a.dest);
                                }
                            }
                            break 'found;
                        }
                    }
                }
            }
            if dest.is_none() {
                dest = p.cluster.as_ref();
            }
        }
        let dest = dest.cloned();
        let (route, ep) = match dest.as_ref() {
            Some(Dest::Cluster(c)) => {
                let i = c.pick();
                (c.eps[i].dest.resolve(router), Some((c.clone(), i)))
            }
            Some(d) => (d.resolve(router), None),
            None => (router.route(service), None),
        };
        match route {
            Route::Echo => {
                // Answered inline by the session: its latency is the time
                // to decide, like a forwarded request's is the time to the
                // upstream's answer.
                tally.latency.observe(t0.elapsed());
                tally.ok += 1;
                if pol.is_none() {
                    // Nothing here depended on the method, the headers or
                    // the priority: remember it for the next calls.
                    let e = &mut tally.echo;
                    e.service.clear();
                    e.service.push_str(service);
                    e.generation = generation;
                    e.holds = true;
                }
                return Decision::Echo;
            }
            Route::NotFound if ep.is_none() => {
                st.count_status(m, peer.transport, status::NOT_FOUND);
                return Decision::NotFound;
            }
            _ => {}
        }
        // Overload protection: the count includes this request.
        let n = st.in_flight.inc() + 1;
        let guard = InFlightGuard(st.in_flight.clone());
        if let Some(o) = pol.and_then(|p| p.overload.as_ref()) {
            let limit = match priority {
                0 => o.low,
                1 => o.normal,
                _ => o.max,
            };
            let why = if n > limit {
                Some("in-flight limit")
            } else if o.max_queue_us > 0.0
                && priority < 2
                && st.queue_ewma() > o.max_queue_us * (1 + priority) as f64
                // Only while there is a queue: the EWMA is sampled by
                // requests that waited, so without this check it would
                // stay high, and shed, forever once traffic stopped going
                // through.
                && pol.and_then(|p| p.concurrency.as_ref()).is_some_and(|c| c.available_permits() == 0)
            {
                Some("queueing time")
            } else if o.shed_cpu > 0.0
                && priority == 0
                && f64::from_bits(self.host_cpu.load(Ordering::Relaxed)) > o.shed_cpu
            {
                Some("host CPU")
            } else {
                None
            };
            if let Some(why) = why {
                drop(guard);
                let r = shed_reply(st, m, priority, why);
                st.count_status(m, peer.transport, status::RESOURCE_EXHAUSTED);
                return Decision::Reply(r);
            }
        }
        let idempotent =
            pol.is_some_and(|p| p.retries > 0 && p.idempotent.iter().any(|x| x == method));
        let job = Job {
            st: st.clone(),
            tr: peer.transport,
            policy: (*pol_guard).clone(),
            route,
            dest,
            ep,
            idempotent,
            t0,
            _guard: guard,
        };
        Decision::Forward(job)
    }

    /// Add what `tally` counted to the shared metrics.
    pub fn flush(&self, tally: &mut Tally) {
        tally.flush(&self.metrics);
    }

    /// Count a response decided outside governance (errors of the dispatcher).
    pub fn count(&self, st: &SvcState, tr: Transport, code: u32) {
        st.count_status(&self.metrics, tr, code);
    }
}

fn status_of(r: &Resp) -> u32 {
    ResponseMeta::decode(&r.meta).map_or(status::INTERNAL, |m| m.status)
}

impl Job {
    /// Run the request: queue (concurrency limit), tries with retries,
    /// endpoint bookkeeping, metrics.
    pub async fn run(
        self,
        router: Arc<crate::Shared>,
        meta: Vec<u8>,
        body: Vec<u8>,
        caller_deadline: Option<Instant>,
    ) -> Resp {
        let m = &router.gov.metrics;
        let Job {
            st,
            tr,
            policy,
            mut route,
            dest,
            mut ep,
            idempotent,
            t0,
            _guard,
        } = self;
        let p = policy.as_deref();
        // The caller's deadline always wins: a route timeout only shortens it.
        let deadline = match (caller_deadline, p.and_then(|p| p.timeout)) {
            (Some(d), Some(t)) => Some(d.min(t0 + t)),
            (None, Some(t)) => Some(t0 + t),
            (d, None) => d,
        };
        let _permit = match p.and_then(|p| p.concurrency.clone()) {
            Some(sem) => {
                // Counts the request as dropped if its task is aborted while
                // it waits (the caller cancelled or went away).
                struct Queued<'a>(&'a SvcState, &'a Metrics, bool);
                impl Drop for Queued<'_> {
                    fn drop(&mut self) {
                        if self.2 {
                            self.0.dropped(self.1, 1);
                        }
                    }
                }
                let mut q = Queued(&st, m, true);
                let acq = sem.acquire_owned();
                let r = match deadline {
                    Some(d) => tokio::time::timeout_at(d.into(), acq).await.ok(),
                    None => Some(acq.await),
                };
                q.2 = false;
                st.record_queue(t0.elapsed());
                match r {
                    Some(Ok(permit)) => Some(permit),
                    _ => {
                        st.dropped(m, 0);
                        st.count_status(m, tr, status::DEADLINE_EXCEEDED);
                        return Resp::error(
                            status::DEADLINE_EXCEEDED,
                            "deadline passed while queued in the proxy; dropped unserved",
                        );
                    }
                }
            }
            None => None,
        };
        if let Some(p) = p {
            if p.retries > 0 {
                let cap = 10_000;
                let v = st.retry_tokens.fetch_add(p.budget_milli, Ordering::Relaxed);
                if v > cap {
                    st.retry_tokens.fetch_sub(p.budget_milli, Ordering::Relaxed);
                }
            }
        }
        let retries = p.map_or(0, |p| p.retries);
        let mut tries = 0;
        let (mut meta, mut body) = (Some(meta), Some(body));
        let r = loop {
            let try_deadline = match (deadline, p.and_then(|p| p.try_timeout)) {
                (Some(d), Some(t)) => Some(d.min(Instant::now() + t)),
                (None, Some(t)) => Some(Instant::now() + t),
                (d, None) => d,
            };
            let last = tries >= retries;
            let (mt, bd) = if last {
                (
                    meta.take().unwrap_or_default(),
                    body.take().unwrap_or_default(),
                )
            } else {
                (
                    meta.clone().unwrap_or_default(),
                    body.clone().unwrap_or_default(),
                )
            };
            let ts = Instant::now();
            if let Some((c, i)) = &ep {
                c.eps[*i].in_flight.fetch_add(1, Ordering::Relaxed);
                c.eps[*i].requests.inc();
            }
            let r = match route {
                Route::NotFound => {
                    Resp::error(status::UNAVAILABLE, "no server app for the endpoint")
                }
                rt => crate::router::call_upstream(rt, mt, bd, try_deadline).await,
            };
            let code = status_of(&r);
            let failed = matches!(
                code,
                status::UNAVAILABLE | status::DEADLINE_EXCEEDED | status::INTERNAL
            );
            if let Some((c, i)) = &ep {
                c.eps[*i].in_flight.fetch_sub(1, Ordering::Relaxed);
                c.record(*i, ts.elapsed(), failed);
            }
            let retry_safe =
                code == status::UNAVAILABLE || (code == status::DEADLINE_EXCEEDED && idempotent);
            let time_left = !deadline.is_some_and(|d| Instant::now() >= d);
            if last || !retry_safe || !time_left {
                break r;
            }
            // The budget: each retry spends one token (1000 milli).
            if st.retry_tokens.fetch_sub(1000, Ordering::Relaxed) < 1000 {
                st.retry_tokens.fetch_add(1000, Ordering::Relaxed);
                break r;
            }
            tries += 1;
            st.retries
                .get(&m.retries, || vec![("service", st.name.clone())])
                .inc();
            let back = p.map_or(Duration::ZERO, |p| p.backoff) * (1u32 << (tries - 1).min(10));
            let wake = Instant::now() + back;
            if deadline.is_some_and(|d| wake >= d) {
                break r;
            }
            tokio::time::sleep_until(wake.into()).await;
            // Another endpoint (or server app) for the next try.
            match &dest {
                Some(Dest::Cluster(c)) => {
                    let i = c.pick_other(ep.as_ref().map_or(usize::MAX, |e| e.1));
                    route = c.eps[i].dest.resolve(&router.router);
                    ep = Some((c.clone(), i));
                }
                Some(d) => route = d.resolve(&router.router),
                None => route = router.router.route(&st.name),
            }
        };
        st.t[tr as usize].latency.observe(t0.elapsed());
        st.count_status(m, tr, status_of(&r));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Result<Config, String> {
        Config::parse(&format!("{}\n{extra}", crate::config::DEFAULT))
    }

    #[test]
    fn governance_config_parses_and_bad_values_are_refused() {
        let ok = cfg("[clusters.c]\nendpoints = [{ to = \"echo\" }, { to = \"local:x\", weight = 2 }]\n\
                      [services.s]\ncluster = \"c\"\nmax_in_flight = 10\n\
                      [[services.s.attribute_routes]]\nheader = \"tenant\"\nvalue = \"a\"\nto = \"cluster:c\"\npercent = 10\n\
                      [[access.rules]]\nservices = [\"s\"]\nuids = [0]\nmode = \"dry-run\"\n");
        assert!(ok.is_ok(), "{ok:?}");
        for (extra, want) in [
            ("[services.s]\ncluster = \"nope\"\n", "no such cluster"),
            ("[services.s]\nshed_low_at = 2.0\n", "shed_low_at"),
            ("[[access.rules]]\nservices = [\"s\"]\nmode = \"maybe\"\n", "mode"),
            ("[access.identity]\ninvalid_token = \"sometimes\"\n", "invalid_token"),
            ("[clusters.c]\nendpoints = []\n", "no endpoints"),
            ("[clusters.c]\nendpoints = [{ to = \"cluster:c\" }]\n", "cannot be a cluster"),
            ("[clusters.c]\nendpoints = [{ to = \"echo\", weight = 0 }]\n", "weight"),
            ("[services.s]\n[[services.s.attribute_routes]]\nheader = \"h\"\nvalue = \"v\"\nto = \"nowhere\"\n", "destination"),
            ("[admin]\nlisten = \"nope\"\n", "admin.listen"),
        ] {
            // [admin] is in the default: replace it rather than append.
            let text = if extra.starts_with("[admin]") {
                crate::config::DEFAULT.replace("listen = \"127.0.0.1:15090\"", "listen = \"nope\"")
            } else {
                format!("{}\n{extra}", crate::config::DEFAULT)
            };
            let e = Config::parse(&text).unwrap_err();
            assert!(e.contains(want), "{extra}: {e}");
        }
    }

    #[test]
    fn token_expiry_parses_and_bad_identity_settings_are_refused() {
        let dt = |s: &str| unix_secs(&s.parse::<toml::value::Datetime>().unwrap());
        assert_eq!(dt("2027-01-31T00:00:00Z"), Ok(1_801_353_600));
        assert_eq!(dt("2000-02-29T12:30:15+02:00"), Ok(951_820_215));
        assert_eq!(dt("1970-01-01T00:00:00Z"), Ok(0));
        assert!(dt("2027-01-31T00:00:00").is_err(), "no offset");
        assert!(dt("2027-01-31").is_err(), "no time");
        let ok = cfg("[access.identity]\nsigning_keys = [\"0123456789abcdef0123456789abcdef\"]\n\
                      [access.identity.tokens]\na = \"x\"\nb = { token = \"y\", expires = 2027-01-31T00:00:00Z }\n");
        assert!(ok.is_ok(), "{ok:?}");
        for (extra, want) in [
            (
                "[access.identity]\nsigning_keys = [\"short\"]\n",
                "signing_keys[0]",
            ),
            (
                "[access.identity.tokens]\nb = { token = \"y\", expires = 2027-01-31T00:00:00 }\n",
                "tokens.b",
            ),
        ] {
            let e = cfg(extra).unwrap_err();
            assert!(e.contains(want), "{extra}: {e}");
        }
    }

    #[test]
    fn spread_splits_any_window_in_proportion() {
        for start in [0u64, 12345, 1 << 40] {
            let hits = (start..start + 1000).filter(|&n| spread(n) < 0.1).count();
            assert!((95..=105).contains(&hits), "{hits}");
        }
    }
}
