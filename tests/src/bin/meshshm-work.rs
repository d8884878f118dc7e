//! Apps built on the client shim, in processes of their own, for the fault
//! and soak tests.
//!
//! ```text
//! meshshm-work load --socket PATH [--conns 1] [--threads 4] [--sizes 64,1024]
//!                   [--services echo] [--timeout-ms 5000] [--secs S | until stdin closes]
//! meshshm-work inflight --socket PATH --service S [--threads 8] [--timeout-ms 30000]
//! meshshm-work serve-echo --socket PATH --service S [--delay-ms 0] [--print-ids]
//! ```
//!
//! `load` makes calls from `threads` threads on each of `conns` connections
//! (one `Client` each), checks every response against its request (each
//! request carries its own id, so a response to another request, of this
//! process or any other, does not match), and prints
//! `calls=.. ok=.. failed=.. mismatched=..`, the errors by kind, and per
//! thread the time of its first failure and the successes after it.
//!
//! `inflight` starts one call per thread, prints `inflight` once all are in
//! flight, then `done us=<unix µs> kind=<ok|gone|...>` as each ends.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshshm::{Client, ClientOptions, Error, Server};
use meshshm_tests::body;

struct Args {
    mode: String,
    socket: PathBuf,
    conns: usize,
    threads: usize,
    sizes: Vec<usize>,
    services: Vec<String>,
    timeout_ms: u64,
    secs: f64,
    delay_ms: u64,
    print_ids: bool,
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        mode: it.next().expect("a mode"),
        socket: PathBuf::new(),
        conns: 1,
        threads: 4,
        sizes: vec![64, 1024],
        services: vec!["echo".into()],
        timeout_ms: 5000,
        secs: 0.0,
        delay_ms: 0,
        print_ids: false,
    };
    while let Some(f) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{f} needs a value"));
        match f.as_str() {
            "--socket" => a.socket = PathBuf::from(v()),
            "--conns" => a.conns = v().parse().expect("--conns"),
            "--threads" => a.threads = v().parse().expect("--threads"),
            "--sizes" => a.sizes = v().split(',').map(|s| s.parse().expect("size")).collect(),
            "--services" | "--service" => a.services = v().split(',').map(String::from).collect(),
            "--timeout-ms" => a.timeout_ms = v().parse().expect("--timeout-ms"),
            "--secs" => a.secs = v().parse().expect("--secs"),
            "--delay-ms" => a.delay_ms = v().parse().expect("--delay-ms"),
            "--print-ids" => a.print_ids = true,
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn main() -> ExitCode {
    // Die with the test that started us (see meshshm-rogue).
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if nix::unistd::getppid().as_raw() == 1 {
        return ExitCode::from(3);
    }
    let a = parse_args();
    let r = match a.mode.as_str() {
        "load" => load(&a),
        "inflight" => inflight(&a),
        "serve-echo" => serve_echo(&a),
        m => Err(format!("unknown mode {m}")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("error={e}");
            ExitCode::from(1)
        }
    }
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

fn kind(r: &Result<Vec<u8>, Error>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(Error::ProxyGone(_)) => "gone".into(),
        Err(Error::Timeout(_)) => "timeout".into(),
        Err(Error::Connect { .. }) => "connect".into(),
        Err(Error::Status { code, .. }) => format!("status{code}"),
        Err(Error::Rejected(_)) => "rejected".into(),
        Err(Error::Protocol(_)) => "protocol".into(),
        Err(_) => "other".into(),
    }
}

fn connect(a: &Args) -> Result<Client, String> {
    Client::with_options(ClientOptions {
        socket: Some(a.socket.clone()),
        spin: 200,
        ..ClientOptions::default()
    })
    .map_err(|e| format!("connect: {e}"))
}

#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    mismatched: AtomicU64,
    bytes: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    threads: Mutex<Vec<String>>,
}

/// A thread's requests: a random body per size, made unique per call by a
/// 16-byte prefix (process, connection, thread, call number).
struct Bodies {
    tails: Vec<Vec<u8>>,
}

impl Bodies {
    fn new(seed: u64, sizes: &[usize]) -> Bodies {
        Bodies {
            tails: sizes.iter().map(|&n| body(seed ^ n as u64, n)).collect(),
        }
    }

    fn make(&mut self, which: usize, tag: u64, i: u64) -> &[u8] {
        let b = &mut self.tails[which];
        let mut prefix = [0u8; 16];
        prefix[..8].copy_from_slice(&tag.to_le_bytes());
        prefix[8..].copy_from_slice(&i.to_le_bytes());
        let n = b.len().min(16);
        b[..n].copy_from_slice(&prefix[..n]);
        b
    }
}

fn load(a: &Args) -> Result<(), String> {
    let stop = Arc::new(AtomicBool::new(false));
    if a.secs > 0.0 {
        let (stop, secs) = (stop.clone(), a.secs);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(secs));
            stop.store(true, Ordering::Relaxed);
        });
    } else {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            stop.store(true, Ordering::Relaxed);
        });
    }
    let clients: Vec<Client> = (0..a.conns).map(|_| connect(a)).collect::<Result<_, _>>()?;
    println!("ready conns={}", clients.len());
    let tally = Arc::new(Tally::default());
    let timeout = Duration::from_millis(a.timeout_ms);
    let pid = std::process::id() as u64;
    std::thread::scope(|s| {
        for (ci, c) in clients.iter().enumerate() {
            for t in 0..a.threads {
                let (tally, stop) = (tally.clone(), stop.clone());
                let (sizes, services) = (&a.sizes, &a.services);
                s.spawn(move || {
                    let tag = pid << 32 | (ci as u64) << 16 | t as u64;
                    let mut bodies = Bodies::new(tag, sizes);
                    let (mut first_fail, mut fail_kind, mut ok_after) = (None, String::new(), 0u64);
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let which = (i as usize + t) % sizes.len();
                        let svc = &services[(i as usize + ci) % services.len()];
                        let b = bodies.make(which, tag, i);
                        let r = c.call(svc, "Load", b, timeout);
                        tally.calls.fetch_add(1, Ordering::Relaxed);
                        match &r {
                            Ok(got) if got[..] == b[..] => {
                                tally.ok.fetch_add(1, Ordering::Relaxed);
                                tally.bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                                if first_fail.is_some() {
                                    ok_after += 1;
                                }
                            }
                            Ok(_) => {
                                tally.mismatched.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {
                                let k = kind(&r);
                                if first_fail.is_none() {
                                    first_fail = Some(now_us());
                                    fail_kind = k.clone();
                                }
                                tally.failed.fetch_add(1, Ordering::Relaxed);
                                *tally.errors.lock().unwrap().entry(k).or_default() += 1;
                                std::thread::sleep(Duration::from_millis(2));
                            }
                        }
                        i += 1;
                    }
                    if let Some(f) = first_fail {
                        tally.threads.lock().unwrap().push(format!(
                            "thread={ci}.{t} first_fail_us={f} kind={fail_kind} ok_after={ok_after}"
                        ));
                    }
                });
            }
        }
    });
    for l in tally.threads.lock().unwrap().iter() {
        println!("{l}");
    }
    let errors: Vec<String> = tally
        .errors
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect();
    println!(
        "calls={} ok={} failed={} mismatched={} bytes={} errors={}",
        tally.calls.load(Ordering::Relaxed),
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
        tally.mismatched.load(Ordering::Relaxed),
        tally.bytes.load(Ordering::Relaxed),
        errors.join(",")
    );
    Ok(())
}

fn inflight(a: &Args) -> Result<(), String> {
    let c = connect(a)?;
    let timeout = Duration::from_millis(a.timeout_ms);
    let service = a.services[0].clone();
    let hs: Vec<_> = (0..a.threads)
        .map(|t| {
            let (c, service) = (c.clone(), service.clone());
            std::thread::spawn(move || {
                let b = body(t as u64, 100);
                let r = c.call(&service, "Wait", &b, timeout);
                let r = match r {
                    Ok(got) if got != b => Err(Error::Protocol("mismatched".into())),
                    other => other,
                };
                println!("done us={} kind={}", now_us(), kind(&r));
            })
        })
        .collect();
    let t0 = Instant::now();
    while c.in_flight() < a.threads {
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!("only {} calls in flight", c.in_flight()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("inflight");
    for h in hs {
        let _ = h.join();
    }
    Ok(())
}

fn serve_echo(a: &Args) -> Result<(), String> {
    let server =
        Arc::new(Server::bind(Some(&a.socket), &a.services[0]).map_err(|e| format!("bind: {e}"))?);
    println!("ready");
    let delay = Duration::from_millis(a.delay_ms);
    loop {
        let next = server.next(Some(Duration::from_secs(1)));
        if let (true, Ok(Some(req))) = (a.print_ids, &next) {
            println!("id {}", req.id);
        }
        match next {
            Ok(Some(req)) if delay.is_zero() => {
                let _ = server.reply(req.id, 0, &req.body);
            }
            Ok(Some(req)) => {
                let server = server.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    let _ = server.reply(req.id, 0, &req.body);
                });
            }
            Ok(None) => {}
            Err(e) => {
                println!("gone ({e})");
                return Ok(());
            }
        }
    }
}
