//! Prometheus metrics (`prometheus-client`, one explicit registry).
//!
//! The request path never looks a label set up: each service gets its
//! handles (plain `Arc` atomics) once, when it is first seen, and status,
//! shed and denial counters are resolved on their first use and cached in a
//! `OnceLock`. Latency histograms are lock-free (atomic buckets), unlike the
//! crate's own `Histogram`, which takes a lock per observation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// A label set: (name, value) pairs.
pub type L = Vec<(&'static str, String)>;

/// Lock-free bucket counts and their sum, encoded as a Prometheus
/// histogram (the crate's own `Histogram` takes a lock per observation).
/// `N` buckets: `bounds` are the upper bounds of the first `N - 1`, the
/// last is +Inf.
#[derive(Debug)]
struct Buckets<const N: usize> {
    bounds: &'static [f64],
    counts: [AtomicU64; N],
    /// Sum of the samples, in billionths of their unit.
    sum_nano: AtomicU64,
}

impl<const N: usize> Buckets<N> {
    fn new(bounds: &'static [f64]) -> Self {
        debug_assert_eq!(bounds.len() + 1, N);
        Buckets {
            bounds,
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nano: AtomicU64::new(0),
        }
    }

    fn observe(&self, v: f64) {
        let i = bucket(self.bounds, v);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nano.fetch_add((v * 1e9) as u64, Ordering::Relaxed);
    }

    /// Add observations counted elsewhere ([`LocalHist`]).
    fn add(&self, counts: &[u64; N], sum_nano: u64) {
        for (c, &n) in self.counts.iter().zip(counts) {
            if n > 0 {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.sum_nano.fetch_add(sum_nano, Ordering::Relaxed);
    }

    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // Per-bucket counts: the encoder makes them cumulative.
        let mut total = 0;
        let mut b = Vec::with_capacity(N);
        for (i, c) in self.counts.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            total += n;
            b.push((self.bounds.get(i).copied().unwrap_or(f64::MAX), n));
        }
        let sum = self.sum_nano.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, total, &b, None)
    }
}

/// The bucket of `v`: the first whose upper bound it does not pass, else
/// the last (+Inf), `bounds.len()`.
fn bucket(bounds: &[f64], v: f64) -> usize {
    bounds.iter().position(|&b| v <= b).unwrap_or(bounds.len())
}

/// Latency bucket upper bounds, in seconds (the last bucket is +Inf).
const LATENCY_BOUNDS: [f64; 14] = [
    5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 0.1, 1.0,
];

/// A lock-free latency histogram (seconds).
#[derive(Clone, Debug)]
pub struct Hist(Arc<Buckets<{ LATENCY_BOUNDS.len() + 1 }>>);

impl Default for Hist {
    fn default() -> Self {
        Hist(Arc::new(Buckets::new(&LATENCY_BOUNDS)))
    }
}

impl Hist {
    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

/// Latency observations made by one thread, added to a [`Hist`] in one go
/// ([`LocalHist::flush_into`]): plain counts instead of two locked
/// instructions per observation.
#[derive(Debug, Default)]
pub struct LocalHist {
    counts: [u64; LATENCY_BOUNDS.len() + 1],
    sum_nano: u64,
    any: bool,
}

impl LocalHist {
    pub fn observe(&mut self, d: Duration) {
        let v = d.as_secs_f64();
        let i = bucket(&LATENCY_BOUNDS, v);
        self.counts[i] += 1;
        self.sum_nano += (v * 1e9) as u64;
        self.any = true;
    }

    /// Add what was observed to `h`, and start again from nothing.
    pub fn flush_into(&mut self, h: &Hist) {
        if std::mem::take(&mut self.any) {
            h.0.add(&self.counts, self.sum_nano);
            *self = LocalHist::default();
        }
    }
}

impl TypedMetric for Hist {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Hist {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Ring fill bucket upper bounds: the share of the ring's capacity in use
/// (the last bucket is +Inf; 1.0 is a full ring).
const FILL_BOUNDS: [f64; 9] = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0];

/// How often a worker thread samples the rings of the session it services:
/// one pass in FILL_EVERY on average (no clock read, no shared counter).
const FILL_EVERY: u32 = 64;

thread_local! {
    /// xorshift32 state (never 0).
    static FILL_TICK: std::cell::Cell<u32> = const { std::cell::Cell::new(0x9e37_79b9) };
}

/// Whether this pass of a session should sample its ring fill. Chosen at
/// random rather than every FILL_EVERY-th pass: with one request in flight
/// a session's passes alternate (one finds the request, the next finds
/// nothing), and a fixed even stride then samples only one kind.
pub fn fill_due() -> bool {
    FILL_TICK.with(|c| {
        let mut x = c.get();
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        c.set(x);
        x % FILL_EVERY == 0
    })
}

/// A lock-free histogram of ring fill (share of capacity).
#[derive(Clone, Debug)]
pub struct FillHist(Arc<Buckets<{ FILL_BOUNDS.len() + 1 }>>);

impl Default for FillHist {
    fn default() -> Self {
        FillHist(Arc::new(Buckets::new(&FILL_BOUNDS)))
    }
}

impl FillHist {
    pub fn observe(&self, used: usize, capacity: usize) {
        let r = if capacity == 0 {
            0.0
        } else {
            used as f64 / capacity as f64
        };
        self.0.observe(r);
    }
}

impl TypedMetric for FillHist {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for FillHist {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Every metric family of the proxy.
pub struct Metrics {
    pub registry: Mutex<Registry>,
    pub requests: Family<L, Counter>,
    pub responses: Family<L, Counter>,
    pub latency: Family<L, Hist>,
    pub in_flight: Family<L, Gauge>,
    pub shed: Family<L, Counter>,
    pub expired: Family<L, Counter>,
    pub denied: Family<L, Counter>,
    pub token_failures: Family<L, Counter>,
    pub retries: Family<L, Counter>,
    pub rollout: Family<L, Counter>,
    pub endpoint_requests: Family<L, Counter>,
    pub endpoint_weight: Family<L, Gauge<f64, AtomicU64>>,
    pub endpoint_ejections: Family<L, Counter>,
    pub sessions: Family<L, Gauge>,
    pub sessions_total: Family<L, Counter>,
    pub reloads: Family<L, Counter>,
    pub cpu_seconds: Gauge<f64, AtomicU64>,
    pub rss_bytes: Gauge,
    /// The proxy's shm sessions woken by their doorbell (after sleeping).
    pub doorbell_wakeups: Counter,
    pub host_cpu: Gauge<f64, AtomicU64>,
    /// Fill of the shm rings, app to proxy ("up") and proxy to app ("down").
    pub ring_fill_up: FillHist,
    pub ring_fill_down: FillHist,
    ring_fill: Family<L, FillHist>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let ring_fill: Family<L, FillHist> = Family::default();
        let dir = |d: &str| {
            ring_fill
                .get_or_create(&vec![("direction", d.to_owned())])
                .clone()
        };
        let (ring_fill_up, ring_fill_down) = (dir("up"), dir("down"));
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::default(),
            in_flight: Family::default(),
            shed: Family::default(),
            expired: Family::default(),
            denied: Family::default(),
            token_failures: Family::default(),
            retries: Family::default(),
            rollout: Family::default(),
            endpoint_requests: Family::default(),
            endpoint_weight: Family::default(),
            endpoint_ejections: Family::default(),
            sessions: Family::default(),
            sessions_total: Family::default(),
            reloads: Family::default(),
            cpu_seconds: Gauge::default(),
            rss_bytes: Gauge::default(),
            doorbell_wakeups: Counter::default(),
            host_cpu: Gauge::default(),
            ring_fill_up,
            ring_fill_down,
            ring_fill,
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|p| p.into_inner());
            let p = r.sub_registry_with_prefix("meshshm");
            p.register(
                "requests",
                "Requests received, by service and transport",
                m.requests.clone(),
            );
            p.register(
                "responses",
                "Responses sent, by service, transport and status",
                m.responses.clone(),
            );
            p.register(
                "request_duration_seconds",
                "Time from a request's arrival to its answer (forwarded: the upstream's; \
                 echo: answered inline)",
                m.latency.clone(),
            );
            p.register(
                "in_flight",
                "Forwarded requests in flight (queued or at the upstream)",
                m.in_flight.clone(),
            );
            p.register(
                "shed",
                "Requests refused by overload protection, by priority",
                m.shed.clone(),
            );
            p.register(
                "expired",
                "Requests dropped unserved from the queue (reason=deadline|cancelled)",
                m.expired.clone(),
            );
            p.register(
                "access_denied",
                "Calls the access rules deny (mode=enforce: refused; mode=dry-run: allowed)",
                m.denied.clone(),
            );
            p.register(
                "token_failures",
                "Tokens that did not prove their identity (reason=missing|invalid|expired; \
                 action=deny: handshake refused, degraded: session without the identity, \
                 dropped: a session's token expired)",
                m.token_failures.clone(),
            );
            p.register("retries", "Retried upstream tries", m.retries.clone());
            p.register(
                "attribute_routes",
                "Requests matched by attribute routes (dry_run=true: not applied)",
                m.rollout.clone(),
            );
            p.register(
                "endpoint_requests",
                "Tries sent to each cluster endpoint",
                m.endpoint_requests.clone(),
            );
            p.register(
                "endpoint_weight",
                "Effective weight of each cluster endpoint",
                m.endpoint_weight.clone(),
            );
            p.register(
                "endpoint_ejections",
                "Outlier ejections of cluster endpoints",
                m.endpoint_ejections.clone(),
            );
            p.register(
                "sessions",
                "Sessions open, by transport",
                m.sessions.clone(),
            );
            p.register(
                "sessions_opened",
                "Sessions opened, by transport",
                m.sessions_total.clone(),
            );
            p.register(
                "config_reloads",
                "Configuration reloads, by result",
                m.reloads.clone(),
            );
            p.register(
                "doorbell_wakeups",
                "Shm sessions of the proxy woken from sleep by their doorbell \
                 (divide by requests for wake-ups per request)",
                m.doorbell_wakeups.clone(),
            );
            p.register(
                "ring_fill_ratio",
                "Share of each shm ring in use, sampled when the proxy services a session \
                 (direction=up: app to proxy, down: proxy to app)",
                m.ring_fill.clone(),
            );
            p.register(
                "host_cpu_ratio",
                "Host CPU use (0..1) over the last second",
                m.host_cpu.clone(),
            );
            let proc = r.sub_registry_with_prefix("process");
            proc.register(
                "cpu_seconds",
                "User and system CPU time of the proxy",
                m.cpu_seconds.clone(),
            );
            proc.register(
                "resident_memory_bytes",
                "Resident set size of the proxy",
                m.rss_bytes.clone(),
            );
        }
        m
    }

    /// Render the registry in the text exposition format, after reading the
    /// process figures from /proc/self.
    pub fn render(&self) -> String {
        if let Ok(s) = std::fs::read_to_string("/proc/self/stat") {
            if let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                // fields 14, 15 (utime, stime) and 24 (rss pages), 1-based in
                // proc(5); `rest` starts at field 3.
                let tick = 100.0; // USER_HZ on Linux
                let ut = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                let st = f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                self.cpu_seconds.set((ut + st) / tick);
                let rss = f.get(21).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
                self.rss_bytes.set(rss * 4096);
            }
        }
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

impl Metrics {
    /// Sample the fill of a session's rings, by the app's counters read
    /// now (one relaxed load per ring). The cached values would not do: a
    /// busy session has read everything it last saw, and a producer
    /// re-reads the consumer's counter only when short of space, so they
    /// read as empty and as filling up to full. The `_now` reads change
    /// nothing in the rings: a forged counter is not acted on here (it
    /// reads as the cached one) and is reported by the session's next
    /// real re-read.
    pub fn sample_ring_fill(&self, ep: &meshshm_ring::Endpoint) {
        self.ring_fill_up
            .observe(ep.rx.pending_now(), ep.rx.capacity());
        self.ring_fill_down
            .observe(ep.tx.in_use_now(), ep.tx.capacity());
    }
}

/// A counter resolved on first use.
pub struct Lazy(OnceLock<Counter>);

impl Lazy {
    pub const fn new() -> Lazy {
        Lazy(OnceLock::new())
    }
    pub fn get(&self, f: &Family<L, Counter>, labels: impl FnOnce() -> L) -> &Counter {
        self.0.get_or_init(|| f.get_or_create(&labels()).clone())
    }
}
