//! `meshshm-bench compare`: start the servers, run every cell (transports
//! interleaved within each workload, so the ratios compare measurements
//! taken moments apart), print the table and the targets, write JSON and SVG.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;

use crate::backend::{Backend, Setup, Spin, Transport};
use crate::procs::{self, Pin, TempDir, Watchdog};
use crate::report::{self, Key, Results, Round};
use crate::units::{fmt_num, fmt_size, parse_size};
use crate::work::{self, ManyClient, Mode, Plan};

/// Measure meshshm (shared memory through the proxy, spinning and
/// blocking) against loopback TCP through the proxy, a plain Unix-socket
/// echo, and the bare two-process ring floors.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// A short run (well under a minute): 64 B, 1 KiB and 1 MiB; 1 and 128 in flight.
    #[arg(long)]
    quick: bool,
    /// The meshshm-proxy binary (default: $MESHSHM_PROXY, else next to this program).
    #[arg(long)]
    proxy: Option<PathBuf>,
    /// Transports to measure (default: all).
    #[arg(long, value_delimiter = ',', value_enum)]
    transports: Vec<Transport>,
    /// Body sizes [default: 64,1KiB,16KiB,256KiB,1MiB].
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    sizes: Vec<usize>,
    /// Requests in flight, closed loop [default: 1,16,128].
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Loop modes [default: closed,open].
    #[arg(long, value_delimiter = ',', value_enum)]
    modes: Vec<Mode>,
    /// Open loop: requests per second.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Open loop: body sizes [default: the sizes up to 16 KiB].
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    open_sizes: Vec<usize>,
    /// Open loop: most requests in flight [default: 1].
    #[arg(long, value_delimiter = ',')]
    open_concurrency: Vec<usize>,
    /// Seconds measured per closed-loop cell [default: 1; --quick 0.25].
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds measured per open-loop cell [default: 2; --quick 0.5].
    #[arg(long)]
    open_duration: Option<f64>,
    /// Measure this many requests per cell instead of a duration.
    #[arg(long)]
    count: Option<u64>,
    /// Unmeasured seconds before each cell [default: 0.2; --quick 0.05].
    #[arg(long)]
    warmup: Option<f64>,
    /// Rounds over the whole matrix; the table shows medians and ranges.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Write the records as a JSON array here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an SVG plot here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Proxy worker threads (fixed; the client needs the other core of two).
    #[arg(long, default_value_t = 1)]
    proxy_threads: usize,
    /// Ring bytes per direction for the shm transports and the floors
    /// (ClientOptions::ring_size; a power of two) [default: the proxy's, 2 MiB].
    #[arg(long, value_parser = parse_size)]
    ring_size: Option<usize>,
    /// Spinning transports: client polls before sleeping (ClientOptions::spin).
    #[arg(long, default_value_t = 1_000_000)]
    spin: u32,
    /// Spinning transports: server µs of polling before sleeping (proxy --spin-us).
    #[arg(long, default_value_t = 1000)]
    server_spin_us: u64,
    /// Blocking transports: client polls at most before sleeping, adaptive
    /// [default: ClientOptions::spin's default, 2000].
    #[arg(long)]
    block_spin: Option<u32>,
    /// Blocking transports: server µs of polling at most before sleeping,
    /// adaptive [default: the proxy's shm.spin_us, 20].
    #[arg(long)]
    block_server_spin_us: Option<u64>,
    /// Where client and server run: `split` (the client on one CPU, the
    /// server on another, as an app and its sidecar: every wake-up crosses
    /// CPUs), `same` (one CPU: every wake-up is a context switch), `none`
    /// (the scheduler decides: on an idle VM the blocking transports then
    /// vary from run to run by 10x), or `auto`: split with one in flight,
    /// none with many (the client's threads and the server share all CPUs).
    #[arg(long, value_enum, default_value_t = Pin::Auto)]
    pin: Pin,
    /// The proxies' shm waiter (`meshshm-proxy --waiter`: auto, io_uring,
    /// epoll) [default: the proxy's]. shm-block-epoll and shm-block-uring
    /// force theirs.
    #[arg(long)]
    waiter: Option<String>,
    /// Idle shm sessions (connected apps that send nothing) opened on each
    /// shm proxy before measuring.
    #[arg(long, default_value_t = 0)]
    idle_sessions: usize,
    /// Many in flight: spread the requests over this many connections
    /// (shm sessions; proxy transports only), instead of one.
    #[arg(long, default_value_t = 1)]
    sessions: usize,
    /// Many in flight through the proxy: the client API that makes the
    /// calls (`pipeline`: one thread, replies lent in place; `async`: a
    /// tokio task per call). Both over shm and TCP alike.
    #[arg(long, value_enum, default_value_t = ManyClient::Pipeline)]
    many_client: ManyClient,
    /// No progress line on stderr.
    #[arg(long)]
    no_progress: bool,
}

struct Cell {
    key: Key,
    plan: Plan,
}

fn proxy_path(a: &Args) -> Result<PathBuf, String> {
    let p = a
        .proxy
        .clone()
        .or_else(|| std::env::var_os("MESHSHM_PROXY").map(PathBuf::from))
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|e| Some(e.parent()?.join("meshshm-proxy")))
        })
        .ok_or("cannot tell where meshshm-proxy is; pass --proxy")?;
    if !p.is_file() {
        return Err(format!(
            "{} not found: build it (`cargo build --release -p meshshm-proxy`, next to \
             meshshm-bench) or pass --proxy PATH",
            p.display()
        ));
    }
    Ok(p)
}

fn or<T: Clone>(v: &[T], d: &[T]) -> Vec<T> {
    if v.is_empty() {
        d.to_vec()
    } else {
        v.to_vec()
    }
}

fn cells(a: &Args) -> Result<(Vec<Transport>, Vec<Cell>), String> {
    let q = a.quick;
    let transports = or(&a.transports, &Transport::ALL);
    let mut transports_sorted = transports.clone();
    transports_sorted.sort();
    transports_sorted.dedup();
    let sizes = or(
        &a.sizes,
        if q {
            &[64, 1 << 10, 1 << 20]
        } else {
            &[64, 1 << 10, 16 << 10, 256 << 10, 1 << 20]
        },
    );
    let concs = or(&a.concurrency, if q { &[1, 128] } else { &[1, 16, 128] });
    let modes = or(&a.modes, &[Mode::Closed, Mode::Open]);
    let default_open: Vec<usize> = if q {
        vec![1 << 10]
    } else {
        sizes.iter().copied().filter(|&z| z <= 16 << 10).collect()
    };
    let open_sizes = or(&a.open_sizes, &default_open);
    let open_concs = or(&a.open_concurrency, &[1]);
    let secs = |v: Option<f64>, d: f64| Duration::from_secs_f64(v.unwrap_or(d).max(0.0));
    let duration = secs(a.duration, if q { 0.25 } else { 1.0 });
    let open_duration = secs(a.open_duration.or(a.duration), if q { 0.5 } else { 2.0 });
    let warmup = secs(a.warmup, if q { 0.05 } else { 0.2 });
    if let Some(r) = a.ring_size {
        if !r.is_power_of_two() || !(4096..=1 << 30).contains(&r) {
            return Err("--ring-size must be a power of two in 4KiB..=1GiB".into());
        }
    }
    if a.rate <= 0.0 || !a.rate.is_finite() {
        return Err("--rate must be positive".into());
    }
    if concs
        .iter()
        .chain(&open_concs)
        .any(|&c| c == 0 || c > 100_000)
    {
        return Err("concurrency must be in 1..=100000".into());
    }
    if sizes.iter().chain(&open_sizes).any(|&z| z > 32 << 20) {
        return Err("sizes above 32 MiB are not supported".into());
    }
    let mut out = Vec::new();
    let mut add = |mode: Mode, size: usize, c: usize, d: Duration| {
        for &t in transports_sorted.iter().filter(|t| t.measures(c)) {
            out.push(Cell {
                key: Key {
                    mode,
                    size,
                    concurrency: c,
                    transport: t,
                },
                plan: Plan {
                    mode,
                    size,
                    concurrency: c,
                    duration: d,
                    count: a.count,
                    warmup,
                    rate: a.rate,
                    sessions: a.sessions,
                    many_client: a.many_client,
                },
            });
        }
    };
    if modes.contains(&Mode::Closed) {
        for &z in &sizes {
            for &c in &concs {
                add(Mode::Closed, z, c, duration);
            }
        }
    }
    if modes.contains(&Mode::Open) {
        for &z in &open_sizes {
            for &c in &open_concs {
                add(Mode::Open, z, c, open_duration);
            }
        }
    }
    Ok((transports_sorted, out))
}

struct Progress {
    on: bool,
    tty: bool,
    total: usize,
    done: usize,
    t0: Instant,
}

impl Progress {
    fn eta(&self) -> String {
        if self.done == 0 {
            return String::new();
        }
        let per = self.t0.elapsed().as_secs_f64() / self.done as f64;
        let left = per * (self.total - self.done) as f64;
        format!(" ~{left:.0}s left")
    }

    fn start(&self, what: &str) {
        if self.on && self.tty {
            eprint!(
                "\r\x1b[2K[{}/{}]{} {what} ...",
                self.done + 1,
                self.total,
                self.eta()
            );
        }
    }

    fn finish(&mut self, what: &str, result: &str) {
        self.done += 1;
        if !self.on {
            return;
        }
        if self.tty {
            eprint!("\r\x1b[2K[{}/{}] {what}: {result}", self.done, self.total);
        } else {
            eprintln!("[{}/{}] {what}: {result}", self.done, self.total);
        }
    }

    fn end(&self) {
        if self.on && self.tty {
            eprintln!();
        }
    }
}

/// Run the comparison; the process exit code.
pub fn run(a: Args) -> std::process::ExitCode {
    match compare(a) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("meshshm-bench: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

fn compare(a: Args) -> Result<bool, String> {
    let (transports, cells) = cells(&a)?;
    let needs_proxy = transports.iter().any(|t| t.via_proxy());
    let proxy = if needs_proxy {
        proxy_path(&a)?
    } else {
        PathBuf::new()
    };
    // Sleeps of the open loop and the ring-full backoff wake on time.
    let _ = nix::sys::prctl::set_timerslack(1);
    let dir = TempDir::new()?;
    let setup = Setup {
        proxy: &proxy,
        proxy_threads: a.proxy_threads.max(1),
        dir: dir.path(),
        spin: Spin {
            client_polls: a.spin,
            server_us: a.server_spin_us,
            adaptive: false,
        },
        block: Spin {
            client_polls: a.block_spin.unwrap_or(Spin::shipped().client_polls),
            server_us: a.block_server_spin_us.unwrap_or(Spin::shipped().server_us),
            adaptive: true,
        },
        ring_size: a.ring_size.unwrap_or(0),
        waiter: a.waiter.as_deref(),
        idle_sessions: a.idle_sessions,
    };
    let mut backends = Vec::new();
    for &t in &transports {
        backends.push(Backend::start(t, &setup)?);
    }
    let cpus = procs::allowed_cpus();
    let watchdog = Watchdog::start();
    let rounds = a.repeat.max(1);
    let mut progress = Progress {
        on: !a.no_progress,
        tty: std::io::stderr().is_terminal(),
        total: cells.len() * rounds,
        done: 0,
        t0: Instant::now(),
    };
    let mut results = Results {
        rate: a.rate,
        ..Results::default()
    };
    let mut failures = Vec::new();
    for round in 0..rounds {
        for cell in &cells {
            let k = cell.key;
            let what = format!(
                "{} {} {} c={}{}",
                k.transport.name(),
                k.mode.name(),
                fmt_size(k.size),
                k.concurrency,
                if rounds > 1 {
                    format!(" (round {})", round + 1)
                } else {
                    String::new()
                }
            );
            let be = backends
                .iter_mut()
                .find(|b| b.transport == k.transport)
                .expect("a backend per transport");
            if let Err(e) = be.check_alive() {
                failures.push(format!("{what}: {e}"));
                progress.finish(&what, "skipped (server gone)");
                continue;
            }
            progress.start(&what);
            let p = &cell.plan;
            let budget = p.warmup + p.duration * 3 + Duration::from_secs(60);
            watchdog.arm(what.clone(), budget);
            let r = procs::place(a.pin, k.concurrency, &cpus, be.pid())
                .and_then(|pin| work::run(be, p).map(|s| (pin, s)));
            watchdog.disarm();
            match r {
                Ok((pin, s)) => {
                    let r = Round::from_sample(&s, pin.name());
                    progress.finish(
                        &what,
                        &format!(
                            "p50 {} µs, {} req/s, {} µs CPU/req",
                            fmt_num(r.p50_us),
                            fmt_num(r.rps),
                            fmt_num(r.client_cpu_us_per_req + r.proxy_cpu_us_per_req)
                        ),
                    );
                    results.add(k, round, r);
                }
                Err(e) => {
                    progress.finish(&what, "FAILED");
                    failures.push(format!("{what}: {e}"));
                }
            }
        }
    }
    progress.end();
    let recs = results.records();
    print!("{}", report::table(&recs));
    println!();
    // The bound under the blocking targets, measured now, on the same
    // machine state: a bare sleeping hand-off between the two CPUs.
    let blocking_cells = recs
        .iter()
        .any(|r| r.transport == "shm-block" && r.concurrency == 1);
    let two_cpus = cpus.len() >= 2;
    let hand_off = (blocking_cells && two_cpus)
        .then(|| {
            crate::wake::eventfd_hand_off(3000)
                .map_err(|e| eprintln!("the bare hand-off: {e}"))
                .ok()
        })
        .flatten()
        .map(|w| report::HandOff {
            p50_us: w.p50,
            cpu_us_per_rt: w.cli + w.srv,
            // (On a thread of its own: the measurement pins it.)
            paced_cpu_us_per_rt: recs
                .iter()
                .any(|r| r.mode == "open")
                .then(|| {
                    let rate = a.rate;
                    std::thread::spawn(move || crate::wake::paced_hand_off(rate, 300))
                        .join()
                        .ok()?
                        .map_err(|e| eprintln!("the paced hand-off: {e}"))
                        .ok()
                })
                .flatten()
                .map(|w| w.cli + w.srv),
        });
    print!("{}", report::targets(&recs, hand_off.as_ref()));
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&recs).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &a.plot {
        std::fs::write(path, crate::plot::svg(&recs, a.rate))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    drop(backends);
    drop(dir);
    for f in &failures {
        eprintln!("FAILED {f}");
    }
    Ok(failures.is_empty())
}
