//! Records (one per transport × mode × size × concurrency), the table, the
//! targets of the design, and the JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::backend::Transport;
use crate::units::{fmt_num, fmt_ratio, fmt_size};
use crate::work::{Mode, Sample};

/// One measured cell of one round.
#[derive(Debug, Clone)]
pub struct Round {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    pub rps: f64,
    pub requests: u64,
    pub seconds: f64,
    pub client_cpu_us_per_req: f64,
    pub proxy_cpu_us_per_req: f64,
    /// cores busy with other processes meanwhile (average)
    pub background_cores: f64,
    /// placement of client and server
    pub pin: &'static str,
    /// the client API that made the calls (see [`Sample::client`])
    pub client: &'static str,
}

impl Round {
    pub fn from_sample(s: &Sample, pin: &'static str) -> Round {
        let us = |ns: u64| ns as f64 / 1000.0;
        let secs = s.elapsed.as_secs_f64().max(1e-9);
        let n = s.requests.max(1) as f64;
        Round {
            p50_us: us(s.hist.value_at_quantile(0.5)),
            p99_us: us(s.hist.value_at_quantile(0.99)),
            p999_us: us(s.hist.value_at_quantile(0.999)),
            max_us: us(s.hist.max()),
            mean_us: s.hist.mean() / 1000.0,
            rps: s.requests as f64 / secs,
            requests: s.requests,
            seconds: secs,
            client_cpu_us_per_req: s.client_cpu.as_secs_f64() * 1e6 / n,
            proxy_cpu_us_per_req: s.server_cpu.as_secs_f64() * 1e6 / n,
            background_cores: s.other_cpu.as_secs_f64() / secs,
            pin,
            client: s.client,
        }
    }

    fn cpu(&self) -> f64 {
        self.client_cpu_us_per_req + self.proxy_cpu_us_per_req
    }
}

/// Which cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub mode: Mode,
    pub size: usize,
    pub concurrency: usize,
    pub transport: Transport,
}

/// What the JSON holds per cell: medians over the rounds, their spread,
/// and the ratios to TCP (each computed within one round, then the median).
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub transport: &'static str,
    pub mode: &'static str,
    /// placement of client and server: none, same or split (see --pin)
    pub pin: &'static str,
    /// the client API that made the calls: `blocking` (one in flight),
    /// `pipeline` or `async` (many in flight through the proxy, see
    /// --many-client), `mux` (many in flight, the references)
    pub client: &'static str,
    /// request (and response) body bytes
    pub size: usize,
    /// requests in flight (closed loop), or at most in flight (open loop)
    pub concurrency: usize,
    /// open loop: the offered rate, requests/s
    pub rate: Option<f64>,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    pub rps: f64,
    /// body bytes echoed per second (one direction): rps × size
    pub bytes_per_s: f64,
    /// CPU of the benchmark process (the client) per request
    pub client_cpu_us_per_req: f64,
    /// CPU of the server process (the proxy, or the echo server / ring child) per request
    pub proxy_cpu_us_per_req: f64,
    /// the sum of both
    pub cpu_us_per_req: f64,
    /// p50 / TCP's p50 (lower is better)
    pub p50_vs_tcp: Option<f64>,
    /// rps / TCP's rps (higher is better)
    pub rps_vs_tcp: Option<f64>,
    /// CPU per request / TCP's (lower is better)
    pub cpu_vs_tcp: Option<f64>,
    /// requests measured (all rounds)
    pub requests: u64,
    /// seconds measured (all rounds)
    pub seconds: f64,
    pub rounds: usize,
    /// [min, max] over the rounds
    pub p50_us_range: [f64; 2],
    pub rps_range: [f64; 2],
    pub cpu_us_per_req_range: [f64; 2],
    /// per-round p50 / TCP's p50, [min, max]
    pub p50_vs_tcp_range: Option<[f64; 2]>,
    /// cores busy with other processes during the measurement (median over
    /// rounds; /proc/stat, 10 ms ticks): above ~0.2 the cell was disturbed
    pub background_cores: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn range(v: &[f64]) -> [f64; 2] {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    [lo, hi]
}

/// Results so far: per cell, per round.
#[derive(Default)]
pub struct Results {
    pub cells: BTreeMap<Key, Vec<(usize, Round)>>,
    pub rate: f64,
}

impl Results {
    pub fn add(&mut self, key: Key, round: usize, r: Round) {
        self.cells.entry(key).or_default().push((round, r));
    }

    fn tcp_round(&self, k: &Key, round: usize) -> Option<&Round> {
        let tk = Key {
            transport: Transport::Tcp,
            ..*k
        };
        self.cells
            .get(&tk)?
            .iter()
            .find(|(r, _)| *r == round)
            .map(|(_, x)| x)
    }

    /// One record per cell, in table order.
    pub fn records(&self) -> Vec<Record> {
        let mut out = Vec::new();
        for (k, rounds) in &self.cells {
            let col =
                |f: &dyn Fn(&Round) -> f64| rounds.iter().map(|(_, r)| f(r)).collect::<Vec<_>>();
            let ratios = |f: &dyn Fn(&Round, &Round) -> f64| {
                let v: Vec<f64> = rounds
                    .iter()
                    .filter_map(|(i, r)| self.tcp_round(k, *i).map(|t| f(r, t)))
                    .collect();
                (!v.is_empty()).then_some(v)
            };
            let p50s = col(&|r| r.p50_us);
            let rpss = col(&|r| r.rps);
            let cpus = col(&|r| r.cpu());
            let p50_ratio = ratios(&|r, t| r.p50_us / t.p50_us);
            let rps = median(rpss.clone());
            out.push(Record {
                transport: k.transport.name(),
                mode: k.mode.name(),
                pin: rounds.first().map_or("none", |(_, r)| r.pin),
                client: rounds.first().map_or("", |(_, r)| r.client),
                size: k.size,
                concurrency: k.concurrency,
                rate: (k.mode == Mode::Open).then_some(self.rate),
                p50_us: median(p50s.clone()),
                p99_us: median(col(&|r| r.p99_us)),
                p999_us: median(col(&|r| r.p999_us)),
                max_us: median(col(&|r| r.max_us)),
                mean_us: median(col(&|r| r.mean_us)),
                rps,
                bytes_per_s: rps * k.size as f64,
                client_cpu_us_per_req: median(col(&|r| r.client_cpu_us_per_req)),
                proxy_cpu_us_per_req: median(col(&|r| r.proxy_cpu_us_per_req)),
                cpu_us_per_req: median(cpus.clone()),
                p50_vs_tcp: p50_ratio.clone().map(median),
                rps_vs_tcp: ratios(&|r, t| r.rps / t.rps).map(median),
                cpu_vs_tcp: ratios(&|r, t| r.cpu() / t.cpu()).map(median),
                requests: rounds.iter().map(|(_, r)| r.requests).sum(),
                seconds: rounds.iter().map(|(_, r)| r.seconds).sum(),
                rounds: rounds.len(),
                p50_us_range: range(&p50s),
                rps_range: range(&rpss),
                cpu_us_per_req_range: range(&cpus),
                p50_vs_tcp_range: p50_ratio.map(|v| range(&v)),
                background_cores: median(col(&|r| r.background_cores)),
            });
        }
        out
    }
}

/// The table for stdout.
pub fn table(recs: &[Record]) -> String {
    let multi = recs.iter().any(|r| r.rounds > 1);
    let mut s = String::new();
    let _ = write!(
        s,
        "{:<17}{:>7}{:>8}{:>5}{:>6}{:>9}{:>10}{:>10}{:>10}{:>10}{:>10}{:>9}{:>9}{:>9}{:>9}{:>9}{:>6}",
        "transport",
        "mode",
        "size",
        "c",
        "pin",
        "client",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "req/s",
        "MB/s",
        "cli µs",
        "srv µs",
        "p50/tcp",
        "rps/tcp",
        "cpu/tcp",
        "bg"
    );
    if multi {
        let _ = write!(s, "  {:<17}{:<17}", "p50 range µs", "req/s range");
    }
    s.push('\n');
    let mut last = None;
    for r in recs {
        let group = (r.mode, r.size, r.concurrency);
        if last.is_some() && last != Some(group) {
            s.push('\n');
        }
        last = Some(group);
        let _ = write!(
            s,
            "{:<17}{:>7}{:>8}{:>5}{:>6}{:>9}{:>10}{:>10}{:>10}{:>10}{:>10}{:>9}{:>9}{:>9}{:>9}{:>9}{:>6}",
            r.transport,
            r.mode,
            fmt_size(r.size),
            r.concurrency,
            r.pin,
            r.client,
            fmt_num(r.p50_us),
            fmt_num(r.p99_us),
            fmt_num(r.p999_us),
            fmt_num(r.rps),
            fmt_num(r.bytes_per_s / 1e6),
            fmt_num(r.client_cpu_us_per_req),
            fmt_num(r.proxy_cpu_us_per_req),
            fmt_ratio(r.p50_vs_tcp),
            fmt_ratio(r.rps_vs_tcp),
            fmt_ratio(r.cpu_vs_tcp),
            format!(
                "{:.1}{}",
                r.background_cores,
                if r.background_cores > 0.2 { "!" } else { "" }
            ),
        );
        if multi {
            let _ = write!(
                s,
                "  {:<17}{:<17}",
                format!(
                    "{}–{}",
                    fmt_num(r.p50_us_range[0]),
                    fmt_num(r.p50_us_range[1])
                ),
                format!("{}–{}", fmt_num(r.rps_range[0]), fmt_num(r.rps_range[1])),
            );
        }
        s.push('\n');
    }
    s.push_str(
        "\ncli/srv µs: CPU per request of the client (this process) and of the server process \
         (the proxy; the echo server or ring child for uds/ring-floor*).\n\
         p50/tcp, cpu/tcp: lower is better; rps/tcp: higher is better; same cell, same round.\n\
         pin: split = client and server on two CPUs, same = on one, none = the scheduler's choice.\n\
         client: the API that made the calls (blocking: one in flight; pipeline or async: many, through the proxy, see --many-client; mux: many, the references).\n\
         bg: cores busy with other processes meanwhile (! above 0.2: the cell was disturbed).\n",
    );
    s
}

/// A bare sleeping hand-off between the two CPUs (`meshshm-bench wake`,
/// eventfd), measured in the same run: the floor of every blocking row.
pub struct HandOff {
    pub p50_us: f64,
    /// CPU of both sides per round trip.
    pub cpu_us_per_rt: f64,
    /// CPU of both sides per round trip when the client sleeps to the
    /// open-loop schedule (`--rate`) before each, when open-loop cells ran.
    pub paced_cpu_us_per_rt: Option<f64>,
}

/// The targets of issue #9 (listed in benches/README.md, "Targets"),
/// checked on the records that exist; `hand_off` adds what bounds the
/// blocking ones.
pub fn targets(recs: &[Record], hand_off: Option<&HandOff>) -> String {
    let find = |t: &str, m: &str, size: usize, c: usize| {
        recs.iter()
            .find(|r| r.transport == t && r.mode == m && r.size == size && r.concurrency == c)
    };
    let mut s =
        String::from("Targets (benches/README.md \"Targets\"; ratios within the same run):\n");
    let mut line = |ok: bool, what: String| {
        let _ = writeln!(s, "  [{}] {what}", if ok { "met " } else { "MISS" });
    };
    const KIB: usize = 1024;
    // Ratios to tcp: the median of the per-round ratios (same cell, same
    // round), as in the table.
    let vs = |r: &Record, own: Option<f64>, f: &dyn Fn(&Record) -> f64, t: &Record| {
        own.unwrap_or_else(|| f(r) / f(t))
    };
    if let (Some(sp), Some(tcp)) = (
        find("shm-spin", "closed", KIB, 1),
        find("tcp", "closed", KIB, 1),
    ) {
        let x = 1.0 / vs(sp, sp.p50_vs_tcp, &|r| r.p50_us, tcp);
        line(
            x >= 30.0,
            format!("1 KiB, 1 in flight, spinning: p50 {x:.1}x lower than tcp (target >= 30x)"),
        );
    }
    for mode in ["closed", "open"] {
        let Some(b) = find("shm-block", mode, KIB, 1) else {
            continue;
        };
        if let Some(u) = find("uds", mode, KIB, 1) {
            let bound = match hand_off {
                Some(h) if mode == "closed" => {
                    format!("; a bare hand-off round trip: p50 {} µs", fmt_num(h.p50_us))
                }
                _ => String::new(),
            };
            line(
                b.p50_us < u.p50_us,
                format!(
                    "1 KiB, 1 in flight, blocking, {mode}: p50 {} µs vs uds {} µs (target: lower{bound})",
                    fmt_num(b.p50_us),
                    fmt_num(u.p50_us)
                ),
            );
        }
        if let Some(f) = find("ring-floor-block", mode, KIB, 1) {
            let x = b.p50_us / f.p50_us;
            line(
                x <= 1.25,
                format!("1 KiB, 1 in flight, blocking, {mode}: p50 {x:.2}x ring-floor-block (target <= 1.25x)"),
            );
        }
        if let Some(t) = find("tcp", mode, KIB, 1) {
            let x = vs(b, b.cpu_vs_tcp, &|r| r.cpu_us_per_req, t);
            let mut bound = match hand_off {
                Some(h) => format!(
                    "; a bare hand-off round trip alone costs {} µs = {:.2}x",
                    fmt_num(h.cpu_us_per_rt),
                    h.cpu_us_per_rt / t.cpu_us_per_req
                ),
                None => String::new(),
            };
            // Open loop, the client also sleeps to its schedule and both
            // sides idle between requests: the same hand-off paced so is
            // the least any blocking transport can cost per request here.
            if let Some(least) = hand_off
                .and_then(|h| h.paced_cpu_us_per_rt)
                .filter(|_| mode == "open")
            {
                let _ = write!(
                    bound,
                    "; paced as the open loop, the hand-off costs {} µs = {:.2}x",
                    fmt_num(least),
                    least / t.cpu_us_per_req
                );
            }
            if let Some(f) = find("ring-floor-block", mode, KIB, 1) {
                let _ = write!(
                    bound,
                    "; ring-floor-block {:.2}x",
                    vs(f, f.cpu_vs_tcp, &|r| r.cpu_us_per_req, t)
                );
            }
            line(
                x <= 0.5,
                format!(
                    "1 KiB, 1 in flight, blocking, {mode}: CPU/req {x:.2}x tcp ({} vs {} µs; target <= 0.5x{bound})",
                    fmt_num(b.cpu_us_per_req),
                    fmt_num(t.cpu_us_per_req)
                ),
            );
        }
    }
    // The blocking pair without its polling (every wait a doorbell): what
    // the adaptive poll saves, and what a wake-up costs on this machine.
    let mut refs = String::new();
    for mode in ["closed", "open"] {
        let (Some(p), Some(t)) = (find("shm-park", mode, KIB, 1), find("tcp", mode, KIB, 1)) else {
            continue;
        };
        let floor = find("ring-floor-park", mode, KIB, 1)
            .map(|f| format!(" ({:.2}x ring-floor-park)", p.p50_us / f.p50_us))
            .unwrap_or_default();
        let uds = find("uds", mode, KIB, 1)
            .map(|u| format!(", uds {} µs", fmt_num(u.p50_us)))
            .unwrap_or_default();
        let _ = writeln!(
            refs,
            "  [ref ] 1 KiB, 1 in flight, doorbells only (shm-park), {mode}: p50 {} µs{floor}{uds}; CPU/req {:.2}x tcp",
            fmt_num(p.p50_us),
            vs(p, p.cpu_vs_tcp, &|r| r.cpu_us_per_req, t)
        );
    }
    let cmax = recs
        .iter()
        .filter(|r| r.mode == "closed" && r.size == KIB)
        .map(|r| r.concurrency)
        .max()
        .unwrap_or(1);
    if cmax > 1 {
        if let Some(t) = find("tcp", "closed", KIB, cmax) {
            for shm in ["shm-block", "shm-spin"] {
                if let Some(b) = find(shm, "closed", KIB, cmax) {
                    let r = vs(b, b.rps_vs_tcp, &|r| r.rps, t);
                    let c = vs(b, b.cpu_vs_tcp, &|r| r.cpu_us_per_req, t);
                    // Against a TCP client that gathers its writes (not
                    // the target's baseline, shown beside it).
                    let batched =
                        find("tcp-batch", "closed", KIB, cmax).map_or(String::new(), |tb| {
                            format!(
                                "; vs tcp-batch: {:.1}x its req/s at {:.2}x its CPU/req",
                                b.rps / tb.rps,
                                b.cpu_us_per_req / tb.cpu_us_per_req
                            )
                        });
                    line(
                        r >= 8.0 && c <= 0.125,
                        format!(
                            "1 KiB, {cmax} in flight, {shm}: {r:.1}x tcp's req/s (target >= 8x) at {c:.2}x its CPU/req (target <= 0.125x){batched}"
                        ),
                    );
                }
            }
        }
    }
    let big = recs
        .iter()
        .filter(|r| r.mode == "closed")
        .map(|r| r.size)
        .max();
    if let Some(big) = big.filter(|&b| b >= 1 << 20) {
        if let Some(t) = find("tcp", "closed", big, 1) {
            for shm in ["shm-block", "shm-spin"] {
                if let Some(b) = find(shm, "closed", big, 1) {
                    let x = vs(b, b.rps_vs_tcp, &|r| r.bytes_per_s, t);
                    line(
                        x >= 3.0,
                        format!(
                            "{}, 1 in flight, {shm}: {x:.2}x tcp's throughput (target >= 3x)",
                            fmt_size(big)
                        ),
                    );
                }
            }
        }
    }
    s.push_str(&refs);
    s
}
