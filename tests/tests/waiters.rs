//! The proxy's two doorbell waiters (`shm.waiter`): the same checks with
//! each (echo, a server app, many idle sessions beside a busy one, a killed
//! client, shutdown), and the fallback from io_uring to epoll where
//! io_uring is refused. The whole suite runs with one waiter under
//! `MESHSHM_TEST_WAITER=epoll|io_uring`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshshm_tests::{
    bin, body, eventually, shm_leftovers_of, KillOnDrop, Proxy, ProxyOpts, TempDir,
};

const T: Duration = Duration::from_secs(10);

/// One test at a time: two of them measure the proxy's CPU or sleeps,
/// which the others' proxies would disturb (all of them take ~1 s).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn uring_usable() -> bool {
    match meshshm_ring::uring::Uring::probe() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("io_uring not usable here ({why}): its half of the test is skipped");
            false
        }
    }
}

fn start(waiter: &str) -> Proxy {
    Proxy::start_with(ProxyOpts {
        routes: vec![
            ("upper".into(), "local".into()),
            ("hang".into(), "local".into()),
        ],
        args: vec![
            "--admin".into(),
            "off".into(),
            "--waiter".into(),
            waiter.into(),
            "--backing".into(),
            "/dev/shm".into(),
        ],
        ..Default::default()
    })
}

/// Wait until the proxy logs `what` (bounded).
fn logged(p: &Proxy, what: &str) -> bool {
    eventually(T, || p.log_text().contains(what))
}

fn check_waiter(waiter: &str) {
    let mut p = start(waiter);
    let expect = if waiter == "epoll" {
        "shm waiter: epoll"
    } else {
        "shm waiter: io_uring"
    };
    assert!(
        logged(&p, expect),
        "{waiter}: no {expect:?} line:\n{}",
        p.log_text()
    );

    // Echo, from empty to fragmented (5 MiB in 2 MiB rings).
    let c = p.client();
    for (i, n) in [0usize, 1, 1000, 65_536, 5 << 20].into_iter().enumerate() {
        let b = body(i as u64, n);
        let r = c
            .call("echo", "Echo", &b, T)
            .unwrap_or_else(|e| panic!("{waiter} {n} B: {e}"));
        assert!(r == b, "{waiter}: {n}-byte echo differs");
    }

    // A server app attached over shm, reached through the proxy.
    let _srv = p.serve_cli("upper", &["--", "tr", "a-z", "A-Z"]);
    let r = c.call("upper", "Up", b"hello waiter", T).expect("forward");
    assert_eq!(r, b"HELLO WAITER", "{waiter}");

    // Many idle sessions (asleep on their doorbells) beside a busy one: the
    // idle ones still answer at once when they wake, the busy one is not held up.
    let idle: Vec<_> = (0..32).map(|_| p.client()).collect();
    for c in &idle {
        assert_eq!(c.call("echo", "E", b"hi", T).expect("idle call"), b"hi");
    }
    let t0 = Instant::now();
    for i in 0..2000u64 {
        let b = body(i, 100);
        assert!(c.call("echo", "E", &b, T).expect("busy call") == b);
    }
    let busy = t0.elapsed();
    for c in idle.iter().rev() {
        assert_eq!(
            c.call("echo", "E", b"again", T).expect("idle call"),
            b"again"
        );
    }
    println!("{waiter}: 2000 sequential calls beside 32 idle sessions in {busy:?}");

    // A client killed with calls in flight (to a server app that holds
    // them): the proxy notices, others go on.
    let mut hang = KillOnDrop(
        Command::new(bin("meshshm-rogue"))
            .args(["serve-hang", "--socket"])
            .arg(&p.socket)
            .args(["--service", "hang"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("meshshm-rogue"),
    );
    let mut line = String::new();
    BufReader::new(hang.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("server output");
    assert!(
        line.starts_with("ready"),
        "{waiter}: hang server said {line:?}"
    );
    let mut victim = KillOnDrop(
        Command::new(bin("meshshm-work"))
            .args(["inflight", "--socket"])
            .arg(&p.socket)
            .args([
                "--service",
                "hang",
                "--threads",
                "4",
                "--timeout-ms",
                "60000",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("meshshm-work"),
    );
    let mut line = String::new();
    BufReader::new(victim.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("victim output");
    assert!(
        line.starts_with("inflight"),
        "{waiter}: victim said {line:?}"
    );
    let vpid = victim.0.id();
    let _ = victim.0.kill();
    let _ = victim.0.wait();
    // (The log may be coloured: look for the pid, not "pid=N".)
    let closed = vpid.to_string();
    assert!(
        eventually(T, || p
            .log_text()
            .lines()
            .any(|l| l.contains("shm session closed") && l.contains(&closed))),
        "{waiter}: the death of {vpid} went unnoticed:\n{}",
        p.log_text()
    );
    assert_eq!(
        c.call("echo", "E", b"still", T).expect("after kill"),
        b"still"
    );
    assert_eq!(
        c.call("upper", "U", b"still", T).expect("after kill"),
        b"STILL"
    );
    drop(idle);

    // Clean shutdown with a session open: exit 0, socket and segments gone.
    let pid = p.pid();
    assert!(p.terminate(), "{waiter}: unclean exit:\n{}", p.log_text());
    assert!(p.log_text().contains("meshshm-proxy stopped"), "{waiter}");
    assert!(!p.socket.exists(), "{waiter}: socket left behind");
    assert!(
        shm_leftovers_of(pid).is_empty(),
        "{waiter}: segments left in /dev/shm"
    );
    assert!(c.call("echo", "E", b"x", Duration::from_secs(2)).is_err());
}

#[test]
fn epoll_waiter_serves_forwards_survives_kills_and_shuts_down() {
    let _s = serial();
    check_waiter("epoll");
}

#[test]
fn io_uring_waiter_serves_forwards_survives_kills_and_shuts_down() {
    let _s = serial();
    if uring_usable() {
        check_waiter("io_uring");
    }
}

/// Start the proxy under `meshshm-no-uring` (io_uring_setup refused by a
/// seccomp filter) with `waiter`; the ready line, or the exit status and log.
fn start_refused(dir: &TempDir, waiter: &str) -> Result<(KillOnDrop, String), (i32, String)> {
    let socket = dir.0.join(format!("{waiter}.sock"));
    let log = dir.0.join(format!("{waiter}.log"));
    let mut child = Command::new(bin("meshshm-no-uring"))
        .arg(bin("meshshm-proxy"))
        .arg("--socket")
        .arg(&socket)
        .args(["--tcp", "off", "--admin", "off", "--waiter", waiter])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("meshshm-no-uring");
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    if line.starts_with("meshshm-proxy ready") {
        return Ok((KillOnDrop(child), text()));
    }
    let st = child.wait().expect("wait");
    Err((st.code().unwrap_or(-1), text()))
}

#[test]
fn auto_falls_back_to_epoll_where_io_uring_is_refused() {
    let _s = serial();
    let dir = TempDir::new("no-uring");
    // auto: starts, says why it uses epoll, and serves.
    let (_proxy, log) = start_refused(&dir, "auto")
        .unwrap_or_else(|(code, log)| panic!("auto under the filter exited with {code}:\n{log}"));
    assert!(
        log.contains("falling back to epoll") && log.contains("io_uring_setup"),
        "no fallback line naming the reason:\n{log}"
    );
    let c = meshshm::Client::connect(Some(&dir.0.join("auto.sock"))).expect("connect");
    let b = body(7, 100_000);
    assert!(
        c.call("echo", "E", &b, T)
            .expect("echo under epoll fallback")
            == b
    );
    // A forced io_uring where it is refused: a clear error, not a silent fallback.
    match start_refused(&dir, "io_uring") {
        Ok(_) => panic!("waiter = io_uring started although io_uring_setup is refused"),
        Err((code, log)) => {
            assert_ne!(code, 0);
            assert!(log.contains("io_uring_setup"), "{log}");
        }
    }
}

/// CPU time the process's threads have run, from their
/// `/proc/PID/task/TID/schedstat` (ns; a thread that ended meanwhile is
/// not counted).
fn cpu_ns(pid: i32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The proxy's CPU for 40 echo calls 5 ms apart, each session polling up
/// to 2 ms before it sleeps, adaptive or not.
fn trickle_cpu(fixed: bool) -> u64 {
    let mut args = vec![
        "--admin".to_owned(),
        "off".into(),
        "--spin-us".into(),
        "2000".into(),
    ];
    if fixed {
        args.push("--spin-fixed".into());
    }
    let p = Proxy::start_with(ProxyOpts {
        args,
        ..Default::default()
    });
    let c = meshshm::Client::with_options(meshshm::ClientOptions {
        socket: Some(p.socket.clone()),
        spin: 0,
        ..Default::default()
    })
    .expect("connect");
    let call = meshshm::Call::new("echo", "Echo", b"trickle");
    c.invoke(&call).expect("first call");
    std::thread::sleep(Duration::from_millis(20));
    let before = cpu_ns(p.pid());
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(5));
        let r = c.invoke(&call).expect("echo");
        assert_eq!(r.body, b"trickle");
    }
    cpu_ns(p.pid()) - before
}

#[test]
fn adaptive_polling_stops_for_a_trickle_of_requests() {
    let _s = serial();
    // Fixed: every idle spell polls the whole 2 ms (about 80 ms in all).
    // Adaptive: 2 + 1 + 0.5 + 0.25 + 0.125 ms, then one 2 ms probe every
    // 16 waits (about 9 ms in all), whatever the machine.
    let fixed = trickle_cpu(true);
    let adaptive = trickle_cpu(false);
    eprintln!("proxy CPU for 40 calls 5 ms apart: fixed {fixed} ns, adaptive {adaptive} ns");
    assert!(fixed >= 40_000_000, "fixed polling ran only {fixed} ns");
    assert!(
        adaptive * 3 < fixed,
        "adaptive {adaptive} ns is not well below fixed {fixed} ns"
    );
}

/// Voluntary context switches of all the process's threads so far (each
/// sleep is one).
fn sleeps(pid: i32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("voluntary_ctxt_switches"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// The thread ids of process `pid`.
fn threads(pid: i32) -> Vec<nix::unistd::Pid> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok())
        .map(nix::unistd::Pid::from_raw)
        .collect()
}

fn pin_to(cpu: usize, tids: &[nix::unistd::Pid]) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).expect("cpu");
    for &t in tids {
        nix::sched::sched_setaffinity(t, &set).expect("pin");
    }
}

/// How many times the proxy's threads slept during 40 echo calls of 1 MiB
/// back to back, with `--spin-us spin_us`.
fn sleeps_for_large_calls(spin_us: u32) -> u64 {
    let p = Proxy::start_with(ProxyOpts {
        args: vec![
            "--admin".to_owned(),
            "off".into(),
            "--spin-us".into(),
            spin_us.to_string(),
        ],
        ..Default::default()
    });
    let c = meshshm::Client::with_options(meshshm::ClientOptions {
        socket: Some(p.socket.clone()),
        ..Default::default()
    })
    .expect("connect");
    // The app on CPU 0, the proxy on CPU 1 (as an app and its sidecar on
    // a busy node: polling for a peer that shares the CPU only delays it,
    // and the adaptive poll then stops).
    pin_to(0, &[nix::unistd::gettid()]);
    pin_to(1, &threads(p.pid()));
    let big = body(9, 1 << 20);
    let call = meshshm::Call::new("echo", "Echo", &big);
    // Warm-up: the first passes over the rings fault their pages in (a
    // few ms here), longer than any poll: the polls adapt down, and come
    // back with a probe that ends in time (one in 16 waits).
    for _ in 0..100 {
        c.invoke(&call).expect("warm-up call");
    }
    let before = sleeps(p.pid());
    for _ in 0..40 {
        let r = c.invoke(&call).expect("echo");
        assert!(r.body == big, "echo changed the body");
    }
    sleeps(p.pid()) - before
}

#[test]
fn a_session_polls_through_the_copy_of_a_large_answer() {
    let _s = serial();
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    // After a 1 MiB answer the next request comes once the app has read
    // it and written the next (165-230 µs here): the session polls ~820 µs
    // for it (FollowPoll) instead of sleeping after its 20 µs. With
    // polling off (--spin-us 0), every request finds it asleep.
    let follow = sleeps_for_large_calls(20);
    let none = sleeps_for_large_calls(0);
    eprintln!("proxy sleeps in 40 calls of 1 MiB: polling {follow}, none {none}");
    assert!(
        none >= 40,
        "with no polling the proxy slept only {none} times"
    );
    assert!(
        follow <= 20,
        "the proxy slept {follow} times in 40 calls of 1 MiB (no polling: {none})"
    );
}
