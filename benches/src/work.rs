//! The load generators. One in flight: the calling thread makes blocking
//! calls (the shim's blocking `Client` reads its own response: no thread
//! hop), the reference transports likewise. Many in flight: tokio tasks on
//! one current-thread runtime, each with one call outstanding, over one
//! connection per transport (the shim's `AsyncClient`, or the same
//! reader-thread design for the references, `crate::mux`): on a 2-core
//! machine a thread per call would measure the scheduler, not the
//! transport. Open loop issues requests on a fixed schedule and counts
//! latency from the scheduled time whenever the transport made a request
//! late (no coordinated omission), from the actual send time otherwise
//! (so the load generator's own timer slop is not charged).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::backend::Backend;
use crate::cpu;
use crate::wire::{check_echo, Body, METHOD, SERVICE};

/// Closed loop (next request when the previous answer is in) or open
/// loop (requests on a schedule at a fixed rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Mode {
    Closed,
    Open,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Closed => "closed",
            Mode::Open => "open",
        }
    }
}

/// One cell's workload.
#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: Mode,
    pub size: usize,
    pub concurrency: usize,
    /// Connections (shm sessions) the requests in flight are spread over.
    pub sessions: usize,
    /// measure this long (unless `count` is set)
    pub duration: Duration,
    /// measure this many requests instead
    pub count: Option<u64>,
    /// run unmeasured first
    pub warmup: Duration,
    /// open loop: requests per second (all tasks together)
    pub rate: f64,
    /// many in flight through the proxy: which client API makes the calls
    pub many_client: ManyClient,
}

/// The client API that keeps many calls in flight through the proxy (the
/// references always use their own `crate::mux`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ManyClient {
    /// `meshshm::Pipeline`: one thread sends and takes replies in place
    Pipeline,
    /// `meshshm::AsyncClient`: a tokio task per call in flight
    Async,
}

/// What one cell measured.
pub struct Sample {
    /// latency, ns
    pub hist: Histogram<u64>,
    pub requests: u64,
    pub elapsed: Duration,
    pub client_cpu: Duration,
    pub server_cpu: Duration,
    /// CPU the rest of the machine used meanwhile (other processes: noise)
    pub other_cpu: Duration,
    /// the client API that made the calls: blocking, pipeline, async, mux
    pub client: &'static str,
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

struct Mark {
    machine: Duration,
    client: Duration,
    server: cpu::ProcCpu,
    at: Instant,
}

fn mark_start(pid: i32) -> Mark {
    let machine = cpu::machine_busy();
    let server = cpu::proc_cpu(pid);
    let client = cpu::self_cpu();
    Mark {
        machine,
        client,
        server,
        at: Instant::now(),
    }
}

fn mark_end(pid: i32) -> Mark {
    let at = Instant::now();
    let client = cpu::self_cpu();
    let server = cpu::proc_cpu(pid);
    let machine = cpu::machine_busy();
    Mark {
        machine,
        client,
        server,
        at,
    }
}

fn sample(client: &'static str, hist: Histogram<u64>, requests: u64, a: &Mark, b: &Mark) -> Sample {
    let client_cpu = b.client.saturating_sub(a.client);
    let server_cpu = cpu::used(&a.server, &b.server);
    Sample {
        client,
        hist,
        requests,
        elapsed: b.at - a.at,
        client_cpu,
        server_cpu,
        other_cpu: b
            .machine
            .saturating_sub(a.machine)
            .saturating_sub(client_cpu + server_cpu),
    }
}

/// Run one cell against `backend`.
pub fn run(backend: &Backend, plan: &Plan) -> Result<Sample, String> {
    if plan.concurrency <= 1 {
        match plan.mode {
            Mode::Closed => closed_one(backend, plan),
            Mode::Open => open_one(backend, plan),
        }
    } else if plan.many_client == ManyClient::Pipeline
        && plan.mode == Mode::Closed
        && plan.sessions <= 1
    {
        match backend.pipeline()? {
            Some(p) => pipelined(backend, plan, p),
            None => many(backend, plan),
        }
    } else {
        many(backend, plan)
    }
}

fn closed_one(backend: &Backend, plan: &Plan) -> Result<Sample, String> {
    let mut conn = backend.sync_conn()?;
    let mut body = Body::new(plan.size, 1);
    let mut resp = Vec::new();
    let t0 = Instant::now();
    let mut warm = 0;
    while warm < 2 || t0.elapsed() < plan.warmup {
        conn.call(body.next(), &mut resp)?;
        warm += 1;
    }
    let mut hist = new_hist();
    let mut n = 0u64;
    let a = mark_start(backend.pid());
    let end = a.at + plan.duration;
    loop {
        let b = body.next();
        let s = Instant::now();
        conn.call(b, &mut resp)?;
        let e = Instant::now();
        hist.saturating_record((e - s).as_nanos() as u64);
        n += 1;
        match plan.count {
            Some(c) if n >= c => break,
            None if e >= end => break,
            _ => {}
        }
    }
    let b = mark_end(backend.pid());
    Ok(sample("blocking", hist, n, &a, &b))
}

fn open_one(backend: &Backend, plan: &Plan) -> Result<Sample, String> {
    let mut conn = backend.sync_conn()?;
    let mut body = Body::new(plan.size, 1);
    let mut resp = Vec::new();
    conn.call(body.next(), &mut resp)?;
    let interval = Duration::from_secs_f64(1.0 / plan.rate.max(1e-3));
    let mut hist = new_hist();
    let mut n = 0u64;
    let t0 = Instant::now();
    let measure_from = t0 + plan.warmup;
    let mut a: Option<Mark> = None;
    let mut prev_done = t0;
    let mut k = 0u32;
    loop {
        let sched = t0 + interval * k;
        k += 1;
        if a.is_none() && sched >= measure_from {
            a = Some(mark_start(backend.pid()));
        }
        let now = Instant::now();
        if now < sched {
            std::thread::sleep(sched - now);
        }
        let sent = Instant::now();
        // Late because the previous call ran past this slot: the transport's
        // fault, so count from the slot. Late only by our own timer: not.
        let from = if prev_done > sched { sched } else { sent };
        conn.call(body.next(), &mut resp)?;
        let done = Instant::now();
        prev_done = done;
        if let Some(m) = &a {
            hist.saturating_record((done - from).as_nanos() as u64);
            n += 1;
            match plan.count {
                Some(c) if n >= c => break,
                None if done >= m.at + plan.duration => break,
                _ => {}
            }
        }
    }
    let b = mark_end(backend.pid());
    Ok(sample(
        "blocking",
        hist,
        n,
        a.as_ref().expect("measured"),
        &b,
    ))
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

struct Shared {
    phase: Cell<u8>,
    hist: RefCell<Histogram<u64>>,
    count: Cell<u64>,
    target: Option<u64>,
    reached: tokio::sync::Notify,
    error: RefCell<Option<String>>,
}

fn many(backend: &Backend, plan: &Plan) -> Result<Sample, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let conns = backend.async_conns(plan.sessions.max(1)).await?;
        let st = Rc::new(Shared {
            phase: Cell::new(WARMUP),
            hist: RefCell::new(new_hist()),
            count: Cell::new(0),
            target: plan.count,
            reached: tokio::sync::Notify::new(),
            error: RefCell::new(None),
        });
        let t0 = Instant::now();
        let c = plan.concurrency;
        let mut tasks = Vec::with_capacity(c);
        for i in 0..c {
            let (conn, st, size) = (conns[i % conns.len()].clone(), st.clone(), plan.size);
            let open = (plan.mode == Mode::Open).then(|| {
                (
                    t0,
                    Duration::from_secs_f64(c as f64 / plan.rate.max(1e-3)),
                    i,
                    c,
                )
            });
            tasks.push(tokio::task::spawn_local(async move {
                let mut body = Body::new(size, i as u64 + 1);
                let mut prev_done = t0;
                let mut k = 0u32;
                while st.phase.get() != STOP {
                    let from = match open {
                        Some((t0, every, i, c)) => {
                            let offset = every.mul_f64(i as f64 / c as f64);
                            let sched = t0 + offset + every * k;
                            k += 1;
                            let sched_t = tokio::time::Instant::from_std(sched);
                            tokio::time::sleep_until(sched_t).await;
                            if st.phase.get() == STOP {
                                break;
                            }
                            let sent = Instant::now();
                            if prev_done > sched {
                                sched
                            } else {
                                sent
                            }
                        }
                        None => Instant::now(),
                    };
                    if let Err(e) = conn.call(body.next()).await {
                        st.error.borrow_mut().get_or_insert(e);
                        st.phase.set(STOP);
                        st.reached.notify_one();
                        break;
                    }
                    let done = Instant::now();
                    prev_done = done;
                    if st.phase.get() == MEASURE {
                        st.hist
                            .borrow_mut()
                            .saturating_record((done - from).as_nanos() as u64);
                        let n = st.count.get() + 1;
                        st.count.set(n);
                        if st.target.is_some_and(|t| n >= t) {
                            st.phase.set(STOP);
                            st.reached.notify_one();
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(plan.warmup).await;
        let a = mark_start(backend.pid());
        if st.phase.get() == WARMUP {
            st.phase.set(MEASURE);
            match plan.count {
                Some(_) => st.reached.notified().await,
                None => {
                    tokio::select! {
                        _ = tokio::time::sleep(plan.duration) => {}
                        _ = st.reached.notified() => {}
                    }
                }
            }
        }
        st.phase.set(STOP);
        let b = mark_end(backend.pid());
        for t in tasks {
            let _ = t.await;
        }
        if let Some(e) = st.error.borrow_mut().take() {
            return Err(e);
        }
        let hist = st.hist.replace(new_hist());
        let client = match conns.first() {
            Some(crate::backend::AsyncConn::Shim(_)) => "async",
            _ => "mux",
        };
        drop(conns);
        Ok(sample(client, hist, st.count.get(), &a, &b))
    })
}

/// Many in flight through one [`meshshm::Pipeline`], closed loop, from this
/// thread: each of the `concurrency` slots has one call outstanding, sent
/// again as soon as its answer is in. (Open loop with many in flight keeps
/// the tokio design of [`many`]: its timers wake each task on schedule.)
fn pipelined(backend: &Backend, plan: &Plan, mut p: meshshm::Pipeline) -> Result<Sample, String> {
    struct Slot {
        body: Body,
        /// when the call in flight was sent
        sent: Instant,
    }
    let t0 = Instant::now();
    let mut slots: Vec<Slot> = (0..plan.concurrency)
        .map(|i| Slot {
            body: Body::new(plan.size, i as u64 + 1),
            sent: t0,
        })
        .collect();
    let mut idle: Vec<usize> = (0..slots.len()).rev().collect();
    let mut by_id: HashMap<u64, usize> = HashMap::with_capacity(2 * slots.len());
    let mut hist = new_hist();
    let mut n = 0u64;
    let mut a: Option<Mark> = None;
    let mut error: Option<String> = None;
    const PATIENCE: Duration = Duration::from_secs(30);
    loop {
        let now = Instant::now();
        if a.is_none() && now >= t0 + plan.warmup {
            a = Some(mark_start(backend.pid()));
        }
        let stop = match (&a, plan.count) {
            (Some(_), Some(cnt)) => n >= cnt,
            (Some(m), None) => now >= m.at + plan.duration,
            (None, _) => false,
        };
        if stop || error.is_some() {
            break;
        }
        // Send from every free slot, as far as the ring takes them.
        while let Some(&s) = idle.last() {
            let slot = &mut slots[s];
            let call = meshshm::Call::new(SERVICE, METHOD, slot.body.next());
            match p.send(&call).map_err(|e| e.to_string())? {
                Some(id) => {
                    // From before the batch of sends: a call's latency
                    // includes its send (as a blocking call's does) and the
                    // sends before it in the batch, with one clock read.
                    slot.sent = now;
                    by_id.insert(id, s);
                    idle.pop();
                }
                None => break,
            }
        }
        // Take the answers (all that came; waiting for the first).
        let mut done: Option<Instant> = None;
        let measuring = a.is_some();
        let got = p
            .poll(Some(PATIENCE), |r| {
                let Some(s) = by_id.remove(&r.id) else {
                    error.get_or_insert_with(|| format!("a reply for an unknown call {}", r.id));
                    return;
                };
                idle.push(s);
                let slot = &slots[s];
                // One clock read for the answers taken together.
                let at = *done.get_or_insert_with(Instant::now);
                if r.status != meshshm::status::OK {
                    error.get_or_insert_with(|| format!("status {}: {}", r.status, r.message));
                } else if let Err(e) = check_echo(r.body, slot.body.current()) {
                    error.get_or_insert(e);
                } else if measuring {
                    hist.saturating_record((at - slot.sent).as_nanos() as u64);
                    n += 1;
                }
            })
            .map_err(|e| e.to_string())?;
        if got == 0 {
            return Err(format!("pipeline: no answer in {PATIENCE:?}"));
        }
    }
    let b = mark_end(backend.pid());
    if let Some(e) = error {
        return Err(e);
    }
    // Let the calls still in flight finish before the connection closes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.in_flight() > 0 && Instant::now() < deadline {
        p.poll(Some(Duration::from_millis(100)), |_| {})
            .map_err(|e| e.to_string())?;
    }
    Ok(sample(
        "pipeline",
        hist,
        n,
        a.as_ref().expect("measured"),
        &b,
    ))
}
