//! Faults, with the real binaries in separate processes (issue 6): apps and
//! the proxy killed with SIGKILL, upstreams that die or hang, a consumer
//! that stops reading. Each test ends with no process left behind and
//! nothing of meshshm in /dev/shm (see `support::Test`).

mod support;

use std::time::{Duration, Instant, SystemTime};

use meshshm::Error;
use support::*;

const T: Duration = Duration::from_secs(20);
/// How soon a death must be noticed (the bound).
const NOTICE: Duration = Duration::from_millis(100);

fn named_segments() -> ProxyCfg {
    // Named files in /dev/shm, so that "nothing left in /dev/shm" is tested
    // on the backing that could leave something.
    ProxyCfg::default().set("backing", "\"/dev/shm\"")
}

/// The latest `req=N cancel=M` report of a `meshshm-rogue serve-hang`.
fn hang_counts(h: &Proc) -> (u64, u64) {
    h.output()
        .lines()
        .rev()
        .find(|l| l.starts_with("req=") || l.starts_with("gone"))
        .map_or((0, 0), |l| (field(l, "req"), field(l, "cancel")))
}

fn serve_hang(p: &Proxy, service: &str) -> Proc {
    let h = spawn(
        "meshshm-rogue",
        &[
            "serve-hang",
            "--socket",
            &p.socket.display().to_string(),
            "--service",
            service,
        ],
    );
    h.wait_line("ready", T);
    h
}

/// Background apps that must not notice anything: two processes of echo
/// calls with checked bodies.
fn bystanders(p: &Proxy) -> Vec<Proc> {
    (0..2)
        .map(|_| load(&p.socket, &["--threads", "2", "--sizes", "64,4096,100000"]))
        .collect()
}

fn assert_unaffected(bystanders: Vec<Proc>) {
    for b in bystanders {
        let r = load_report(&b.finish(T));
        assert!(
            r.ok > 0 && r.failed == 0 && r.mismatched == 0,
            "a bystander noticed: {}",
            r.line
        );
    }
}

/// Kill the app `victim` (already in session), and check that the proxy
/// notices within NOTICE and frees its session and segment.
fn kill_and_check_noticed(p: &Proxy, victim: &mut Proc, fds: usize, maps: usize) -> Duration {
    assert!(fd_count(p.pid()) > fds, "victim has no session?");
    let pid = victim.pid();
    let killed = SystemTime::now();
    victim.kill9();
    assert!(
        eventually(T, || session_closed(p, pid).is_some()),
        "the proxy did not notice the death of {pid}:\n{}",
        log(p)
    );
    let (closed, line) = session_closed(p, pid).expect("checked");
    let took = closed.duration_since(killed).unwrap_or_default();
    assert!(
        took < NOTICE,
        "the proxy took {took:?} to notice the death of {pid}: {line}"
    );
    assert!(
        back_to(p, fds, maps),
        "session of {pid} not freed: {} fds (was {fds}), {} segment mappings (was {maps})",
        fd_count(p.pid()),
        segment_maps(p.pid())
    );
    took
}

#[test]
fn app_killed_mid_request_is_noticed_and_its_upstream_requests_cancelled() {
    let mut t = begin("app_killed_mid_request", Duration::from_secs(90));
    let p = proxy(&mut t, named_segments());
    let hang = serve_hang(&p, "hang");
    let others = bystanders(&p);
    let (fds, maps) = settled_baseline(&p);
    // Eight calls in flight to a server app that holds them.
    let mut victim = spawn(
        "meshshm-work",
        &[
            "inflight",
            "--socket",
            &p.socket.display().to_string(),
            "--service",
            "hang",
            "--threads",
            "8",
            "--timeout-ms",
            "60000",
        ],
    );
    victim.wait_line("inflight", T);
    assert!(
        eventually(T, || hang_counts(&hang).0 >= 8),
        "requests did not reach the server: {}",
        hang.output()
    );
    let took = kill_and_check_noticed(&p, &mut victim, fds, maps);
    println!("noticed the death mid-request after {took:?}");
    // Its upstream requests are cancelled: the server app is told.
    assert!(
        eventually(T, || hang_counts(&hang) == (8, 8)),
        "server app not told to cancel: {}",
        hang.output()
    );
    assert!(
        !log_lines(&p, &["cancelled the upstream requests", "aborted=8"]).is_empty(),
        "{}",
        log(&p)
    );
    assert_unaffected(others);
}

#[test]
fn app_killed_mid_fragmented_message_is_noticed() {
    let mut t = begin("app_killed_mid_fragment", Duration::from_secs(90));
    let p = proxy(&mut t, named_segments());
    let others = bystanders(&p);
    let (fds, maps) = settled_baseline(&p);
    let mut victim = spawn(
        "meshshm-rogue",
        &[
            "victim-fragment",
            "--socket",
            &p.socket.display().to_string(),
        ],
    );
    victim.wait_line("ready", T);
    std::thread::sleep(Duration::from_millis(100));
    let took = kill_and_check_noticed(&p, &mut victim, fds, maps);
    println!("noticed the death mid-message after {took:?}");
    assert_unaffected(others);
}

#[test]
fn app_killed_with_a_partly_written_frame_is_noticed() {
    let mut t = begin("app_killed_mid_frame", Duration::from_secs(90));
    let p = proxy(&mut t, named_segments());
    let others = bystanders(&p);
    let (fds, maps) = settled_baseline(&p);
    let mut victim = spawn(
        "meshshm-rogue",
        &[
            "victim-partial",
            "--socket",
            &p.socket.display().to_string(),
        ],
    );
    victim.wait_line("ready", T);
    std::thread::sleep(Duration::from_millis(100));
    let took = kill_and_check_noticed(&p, &mut victim, fds, maps);
    println!("noticed the death mid-frame after {took:?}");
    assert_unaffected(others);
}

#[test]
fn proxy_killed_under_load_fails_every_call_at_once_and_clients_reconnect() {
    let mut t = begin("proxy_killed_under_load", Duration::from_secs(120));
    let mut p1 = proxy(&mut t, named_segments());
    let socket = p1.socket.clone();
    let sock = socket.display().to_string();
    let hang = serve_hang(&p1, "hang");
    // Calls that can only end by failing: held by the server app.
    let holders: Vec<Proc> = (0..3)
        .map(|_| {
            let h = spawn(
                "meshshm-work",
                &[
                    "inflight",
                    "--socket",
                    &sock,
                    "--service",
                    "hang",
                    "--threads",
                    "4",
                    "--timeout-ms",
                    "60000",
                ],
            );
            h.wait_line("inflight", T);
            h
        })
        .collect();
    assert!(eventually(T, || hang_counts(&hang).0 >= 12));
    // And load: echo calls from three more processes (long timeouts: a call
    // that hangs instead of failing would show).
    let loads: Vec<Proc> = (0..3)
        .map(|_| {
            load(
                &socket,
                &[
                    "--threads",
                    "3",
                    "--sizes",
                    "64,4096,65536",
                    "--timeout-ms",
                    "60000",
                ],
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let killed = SystemTime::now();
    p1.kill9();
    let kill_us = unix_us(killed);
    // Every held call failed with "proxy gone", within NOTICE.
    let mut worst = 0u128;
    for h in holders {
        let out = h.wait_exit(T);
        let done: Vec<&str> = out.lines().filter(|l| l.starts_with("done ")).collect();
        assert_eq!(done.len(), 4, "{out}");
        for l in done {
            assert_eq!(field::<String>(l, "kind"), "gone", "{l}");
            let after = field::<u128>(l, "us").saturating_sub(kill_us);
            worst = worst.max(after);
            assert!(
                after < NOTICE.as_micros(),
                "a call failed {after} µs after the kill"
            );
        }
    }
    // The server app learns it too, and exits.
    let out = hang.wait_exit(T);
    assert!(out.contains("gone"), "{out}");
    // A new proxy on the same socket: the clients reconnect by themselves.
    let _p2 = proxy(
        &mut t,
        ProxyCfg {
            socket: Some(socket.clone()),
            ..named_segments()
        },
    );
    std::thread::sleep(Duration::from_millis(2500));
    let mut calls = 0;
    for l in loads {
        let r = load_report(&l.finish(T));
        calls += r.calls;
        assert_eq!(
            r.mismatched, 0,
            "a call reported success with another's answer: {}",
            r.line
        );
        assert_eq!(
            r.threads.len(),
            3,
            "every thread saw the kill: {:?}",
            r.threads
        );
        for th in &r.threads {
            let after = field::<u128>(th, "first_fail_us").saturating_sub(kill_us);
            worst = worst.max(after);
            assert!(
                after < NOTICE.as_micros(),
                "first failure {after} µs after the kill: {th}"
            );
            let k: String = field(th, "kind");
            assert!(k == "gone" || k == "connect", "{th}");
            assert!(field::<u64>(th, "ok_after") > 0, "did not reconnect: {th}");
        }
    }
    println!("{calls} calls; slowest failure {worst} µs after the kill");
}

#[test]
fn upstream_dies_callers_fail_at_once_and_a_new_one_takes_over() {
    let mut t = begin("upstream_dies", Duration::from_secs(90));
    let p = proxy(&mut t, ProxyCfg::default());
    let sock = p.socket.display().to_string();
    let mut srv = spawn(
        "meshshm-work",
        &[
            "serve-echo",
            "--socket",
            &sock,
            "--service",
            "srv",
            "--delay-ms",
            "5000",
        ],
    );
    srv.wait_line("ready", T);
    let c = p.client();
    let hs: Vec<_> = (0..8)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || {
                let r = c.call("srv", "Slow", &body(i, 100), Duration::from_secs(30));
                (r, Instant::now())
            })
        })
        .collect();
    assert!(eventually(T, || c.in_flight() == 8));
    std::thread::sleep(Duration::from_millis(200));
    let killed = Instant::now();
    srv.kill9();
    for h in hs {
        let (r, at) = h.join().unwrap();
        match r {
            Err(Error::Status { code, .. }) => assert_eq!(code, meshshm::status::UNAVAILABLE),
            other => panic!("expected UNAVAILABLE, got {other:?}"),
        }
        let after = at.duration_since(killed);
        assert!(
            after < Duration::from_secs(2),
            "failed {after:?} after the upstream died (deadline 30 s)"
        );
    }
    // No server now: an error at once, not a wait.
    match c.call("srv", "X", b"x", Duration::from_secs(30)) {
        Err(Error::Status { code, .. }) => assert_eq!(code, meshshm::status::NOT_FOUND),
        other => panic!("expected NOT_FOUND, got {other:?}"),
    }
    // A new server takes over.
    let srv2 = spawn(
        "meshshm-work",
        &["serve-echo", "--socket", &sock, "--service", "srv"],
    );
    srv2.wait_line("ready", T);
    let b = body(77, 5000);
    assert_eq!(c.call("srv", "X", &b, T).unwrap(), b);
}

#[test]
fn upstream_hangs_callers_time_out_per_deadline_and_memory_stays_bounded() {
    let mut t = begin("upstream_hangs", Duration::from_secs(90));
    let p = proxy(&mut t, ProxyCfg::default());
    let hang = serve_hang(&p, "hang");
    let c = p.client();
    for ms in [100u64, 300, 1000] {
        let t0 = Instant::now();
        let r = c.call("hang", "X", b"x", Duration::from_millis(ms));
        let took = t0.elapsed();
        match r {
            Err(Error::Timeout(_)) => {}
            Err(Error::Status { code, .. }) if code == meshshm::status::DEADLINE_EXCEEDED => {}
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(
            took >= Duration::from_millis(ms) && took < Duration::from_millis(ms + 2000),
            "deadline {ms} ms, failed after {took:?}"
        );
    }
    let rss0 = rss_kb(p.pid());
    // Pressure: many callers with short deadlines and 64 KiB bodies, for 3 s.
    let loads: Vec<Proc> = (0..3)
        .map(|_| {
            load(
                &p.socket,
                &[
                    "--threads",
                    "4",
                    "--services",
                    "hang",
                    "--sizes",
                    "65536",
                    "--timeout-ms",
                    "50",
                    "--secs",
                    "3",
                ],
            )
        })
        .collect();
    let mut peak = rss0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        peak = peak.max(rss_kb(p.pid()));
        std::thread::sleep(Duration::from_millis(100));
    }
    for l in loads {
        let r = load_report(&l.wait_exit(T));
        assert!(r.calls > 0 && r.ok == 0 && r.mismatched == 0, "{}", r.line);
    }
    // Every request the server app received was cancelled when its caller
    // gave up: nothing waits for it in the proxy.
    assert!(
        eventually(T, || {
            let (req, cancel) = hang_counts(&hang);
            req > 0 && req == cancel
        }),
        "{:?}",
        hang_counts(&hang)
    );
    let rss1 = rss_kb(p.pid());
    println!(
        "hung upstream: {:?} requests/cancels; proxy RSS {rss0} KiB before, peak {peak}, after {rss1}",
        hang_counts(&hang)
    );
    assert!(
        peak < rss0 + 128 * 1024,
        "RSS grew from {rss0} to {peak} KiB"
    );
    // And the proxy still answers.
    assert_eq!(c.call("echo", "E", b"alive", T).unwrap(), b"alive");
}

#[test]
fn stuck_consumer_gets_backpressure_alone_and_loses_nothing() {
    let mut t = begin("stuck_consumer", Duration::from_secs(120));
    let p = proxy(&mut t, ProxyCfg::default());
    let sock = p.socket.display().to_string();
    let others = bystanders(&p);
    std::thread::sleep(Duration::from_millis(300));
    let rss0 = rss_kb(p.pid());
    // An app that sends requests but reads no response: its 64 KiB rings
    // fill, and the proxy stops taking its requests.
    let stuck = spawn(
        "meshshm-rogue",
        &[
            "stuck",
            "--socket",
            &sock,
            "--ring",
            "65536",
            "--size",
            "8192",
            "--n",
            "3000",
            "--pause-ms",
            "2000",
        ],
    );
    let l = stuck.wait_line("stalled", T);
    let stalled_at: u64 = field(&l, "sent");
    assert!(stalled_at < 3000, "{l}");
    std::thread::sleep(Duration::from_millis(500));
    let rss_stalled = rss_kb(p.pid());
    // Meanwhile the others go on (checked at the end), and so does a new one.
    let c = p.client();
    for i in 0..100 {
        let b = body(i, 4096);
        assert_eq!(c.call("echo", "E", &b, T).unwrap(), b);
    }
    // Then it resumes: every request gets its response, once.
    let out = stuck.wait_exit(T);
    let r = out
        .lines()
        .find(|l| l.starts_with("sent="))
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(field::<u64>(r, "ok"), 3000, "{r}");
    assert_eq!(field::<u64>(r, "lost"), 0, "{r}");
    assert_eq!(field::<u64>(r, "dup"), 0, "{r}");
    assert_eq!(field::<u64>(r, "bad"), 0, "{r}");
    println!(
        "stuck consumer stalled after {stalled_at} requests; proxy RSS {rss0} KiB -> {rss_stalled} KiB while stalled"
    );
    assert!(
        rss_stalled < rss0 + 32 * 1024,
        "the proxy buffered for the stuck app: RSS {rss0} -> {rss_stalled} KiB"
    );
    // The same for an app stopped whole (SIGSTOP) with calls in flight.
    let mut frozen = load(
        &p.socket,
        &[
            "--threads",
            "8",
            "--sizes",
            "262144",
            "--timeout-ms",
            "60000",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    signal(frozen.pid(), libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1500));
    for i in 0..50 {
        let b = body(i, 70_000);
        assert_eq!(c.call("echo", "E", &b, T).unwrap(), b);
    }
    signal(frozen.pid(), libc::SIGCONT);
    std::thread::sleep(Duration::from_millis(500));
    frozen.write_stdin("");
    let r = load_report(&frozen.finish(T));
    assert!(r.ok > 0 && r.failed == 0 && r.mismatched == 0, "{}", r.line);
    assert_unaffected(others);
}

#[test]
fn an_idle_client_does_not_lose_its_next_call_to_a_proxy_restart() {
    let mut t = begin("idle_client_restart", Duration::from_secs(90));
    let mut p1 = proxy(&mut t, ProxyCfg::default());
    let socket = p1.socket.clone();
    let c = p1.client();
    let ac = tokio_rt().block_on(meshshm::AsyncClient::connect(meshshm::ClientOptions {
        socket: Some(socket.clone()),
        ..Default::default()
    }));
    let ac = ac.expect("async client");
    assert_eq!(c.call("echo", "E", b"one", T).unwrap(), b"one");
    p1.kill9();
    let _p2 = proxy(
        &mut t,
        ProxyCfg {
            socket: Some(socket),
            ..ProxyCfg::default()
        },
    );
    std::thread::sleep(Duration::from_millis(100));
    // Nobody was waiting when the proxy died; the next call still goes
    // through (to the new proxy), it does not fail into the dead ring.
    assert_eq!(c.call("echo", "E", b"two", T).unwrap(), b"two");
    let r = tokio_rt().block_on(ac.call("echo", "E", b"three", T));
    assert_eq!(r.unwrap(), b"three");
}

fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
