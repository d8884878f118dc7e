//! Hostile or broken peers against the real proxy (issue 6): apps that
//! write garbage into their rings, forge counters, never end a message;
//! clients that speak garbage on the control socket or open 10,000
//! connections. Each is cut off alone, with a logged reason; the proxy
//! neither panics nor grows without bound, and other apps go on.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use meshshm_proto::{frame_control, read_control, Answer, Hello, Role};
use support::*;

const T: Duration = Duration::from_secs(20);

/// Each misbehaviour of `meshshm-rogue`, and what the proxy must log as the
/// reason it closed that session ("" = any protocol violation).
const ROGUES: &[(&str, &str)] = &[
    ("garbage", ""),
    ("len-past-end", "longer than the maximum payload"),
    ("len-past-tail", "past the published tail"),
    ("len-changes", ""),
    ("tail-backwards", "counter out of range"),
    ("tail-ahead", "counter out of range"),
    ("head-forged", "counter out of range"),
    ("unknown-kind", "unknown frame kind"),
    ("unknown-flags", "unknown flag bits"),
    ("endless-fragments", "exceed the declared length"),
    ("oversized", "larger than max_message"),
    ("ctl-bytes", "unexpected bytes on the control socket"),
    ("reuse-id", "reused while its request is in flight"),
    ("wrong-kind", "unexpected Response frame"),
];

#[test]
fn hostile_apps_are_cut_off_alone_with_a_reason() {
    let mut t = begin("hostile_apps", Duration::from_secs(240));
    // A 4 MiB message limit keeps the endless message quick.
    let p = proxy(&mut t, ProxyCfg::default().set("max_message", 4 << 20));
    let sock = p.socket.display().to_string();
    let hang = spawn(
        "meshshm-rogue",
        &["serve-hang", "--socket", &sock, "--service", "hang"],
    );
    hang.wait_line("ready", T);
    let others: Vec<Proc> = (0..2)
        .map(|_| load(&p.socket, &["--threads", "2", "--sizes", "64,4096,100000"]))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (fds, maps) = settled_baseline(&p);
    let rss0 = rss_kb(p.pid());
    let mut peak = rss0;
    for &(mode, reason) in ROGUES {
        let rogue = spawn(
            "meshshm-rogue",
            &[mode, "--socket", &sock, "--service", "hang"],
        );
        let pid = rogue.pid();
        let out = rogue.wait_exit(T);
        assert!(
            out.contains("closed_ms="),
            "{mode}: the proxy kept the session open:\n{out}"
        );
        assert!(
            eventually(T, || session_closed(&p, pid).is_some()),
            "{mode}: no close logged"
        );
        let (_, closed) = session_closed(&p, pid).expect("checked");
        let violation = log_lines(&p, &["closing session", &format!(" pid={pid} ")]);
        let why = violation.first().unwrap_or(&closed);
        assert!(
            why.contains(reason),
            "{mode}: expected reason {reason:?}, got: {why}"
        );
        println!("{mode:>18}: {}", why.split("error=").nth(1).unwrap_or(why));
        peak = peak.max(rss_kb(p.pid()));
        assert!(p.child_alive(), "{mode}: the proxy died");
    }
    assert!(!log(&p).contains("panicked"), "{}", log(&p));
    assert!(
        back_to(&p, fds, maps),
        "sessions not freed: {} fds (was {fds}), {} maps (was {maps})",
        fd_count(p.pid()),
        segment_maps(p.pid())
    );
    let rss1 = rss_kb(p.pid());
    println!("proxy RSS {rss0} KiB before, peak {peak}, after {rss1}");
    assert!(
        peak < rss0 + 64 * 1024,
        "RSS grew from {rss0} to {peak} KiB"
    );
    for o in others {
        let r = load_report(&o.finish(T));
        assert!(
            r.ok > 0 && r.failed == 0 && r.mismatched == 0,
            "a bystander noticed: {}",
            r.line
        );
    }
}

trait Alive {
    fn child_alive(&self) -> bool;
}

impl Alive for Proxy {
    fn child_alive(&self) -> bool {
        // A zombie is dead too: /proc/<pid>/stat state 'Z'.
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .map(|s| !s[s.rfind(')').map_or(0, |i| i + 2)..].starts_with('Z'))
            .unwrap_or(false)
    }
}

/// Send raw bytes on a new control connection; the proxy's answer (a
/// Reject's reason), or None if it closed without one.
fn raw_control(p: &Proxy, bytes: &[u8]) -> Option<String> {
    let mut s = UnixStream::connect(&p.socket).expect("connect");
    s.set_read_timeout(Some(T)).unwrap();
    let _ = s.write_all(bytes);
    match read_control(&mut s) {
        Ok(b) => match Answer::decode(&b) {
            Ok(Answer::Reject(r)) => Some(r.reason),
            other => panic!("expected a Reject, got {other:?}"),
        },
        Err(_) => None,
    }
}

fn hello() -> Hello {
    Hello {
        role: Role::Client,
        service: "x".into(),
        token: String::new(),
        ring_up: 0,
        ring_down: 0,
    }
}

#[test]
fn garbage_and_wrong_versions_on_the_control_socket_get_a_clear_rejection() {
    let mut t = begin("control_garbage", Duration::from_secs(90));
    let p = proxy(&mut t, ProxyCfg::default().set("handshake_timeout_ms", 500));
    let fds = fd_count(p.pid());
    // Garbage with a plausible length.
    let mut g = 60u32.to_le_bytes().to_vec();
    g.extend(body(1, 60));
    let r = raw_control(&p, &g).expect("a reason");
    assert!(r.contains("bad magic"), "{r}");
    // A Hello of protocol version 2.
    let mut h = hello().encode();
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    let r = raw_control(&p, &frame_control(&h)).expect("a reason");
    assert!(r.contains("version 2"), "{r}");
    // A Hello with a field out of range, and one with bytes left over.
    let mut h = hello().encode();
    h[6] = 9; // role
    let r = raw_control(&p, &frame_control(&h)).expect("a reason");
    assert!(r.contains("role"), "{r}");
    let mut h = hello().encode();
    h.extend_from_slice(b"extra");
    let r = raw_control(&p, &frame_control(&h)).expect("a reason");
    assert!(r.contains("trailing"), "{r}");
    // A length prefix of 1 GiB: refused before anything is allocated.
    let r = raw_control(&p, &(1u32 << 30).to_le_bytes()).expect("a reason");
    assert!(r.contains("too large"), "{r}");
    // Nothing at all, or half a Hello: closed after the handshake timeout.
    for bytes in [&[][..], &[100, 0, 0, 0, 1, 2, 3][..]] {
        let t0 = Instant::now();
        let mut s = UnixStream::connect(&p.socket).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(bytes).unwrap();
        let mut b = [0u8; 16];
        assert_eq!(
            s.read(&mut b).unwrap_or(0),
            0,
            "expected the proxy to close"
        );
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }
    assert_eq!(
        log_lines(&p, &["handshake refused"]).len(),
        5,
        "{}",
        log(&p)
    );
    assert_eq!(
        log_lines(&p, &["handshake timed out"]).len(),
        2,
        "{}",
        log(&p)
    );
    // Nothing held, and real clients still welcome.
    assert!(back_to(&p, fds, 0));
    assert_eq!(p.client().call("echo", "E", b"ok", T).unwrap(), b"ok");
}

#[test]
fn ten_thousand_connections_are_refused_with_bounded_resources() {
    let mut t = begin("ten_thousand_connections", Duration::from_secs(180));
    let limit = 64;
    let p = proxy(&mut t, ProxyCfg::default().set("max_connections", limit));
    let (fds, rss0) = (fd_count(p.pid()), rss_kb(p.pid()));
    let flood = spawn(
        "meshshm-rogue",
        &[
            "flood",
            "--socket",
            &p.socket.display().to_string(),
            "--n",
            "10000",
            "--pause-ms",
            "1500",
        ],
    );
    let l = flood.wait_line("welcome=", Duration::from_secs(120));
    let n = |k: &str| field::<u64>(&l, k);
    println!("{l}");
    assert_eq!(
        n("welcome") + n("reject") + n("closed") + n("pending") + n("connect_failed"),
        10_000,
        "{l}"
    );
    assert!(n("welcome") <= limit, "more sessions than the limit: {l}");
    assert!(n("reject") > 0 && l.contains("connection limit"), "{l}");
    // While the flood holds its connections: bounded fds (4 per session, a
    // bounded number being refused), and a clear answer to a real client.
    let held = fd_count(p.pid());
    let rss_held = rss_kb(p.pid());
    assert!(
        held <= fds + limit as usize * 4 + 256 + 16,
        "{held} fds held (baseline {fds})"
    );
    match meshshm::Client::connect(Some(&p.socket)) {
        Err(meshshm::Error::Rejected(r)) => assert!(r.contains("connection limit"), "{r}"),
        Err(e) => panic!("expected a clear rejection, got {e}"),
        Ok(_) => panic!("connected past the limit"),
    }
    // The refusals are logged, not one line each.
    let lines = log_lines(&p, &["connection limit reached"]).len();
    assert!(lines <= 12, "{lines} log lines for the refusals");
    // The flood ends: everything is freed, and real clients get in again.
    let out = flood.finish(T);
    assert!(out.contains("welcome="), "{out}");
    assert!(
        back_to(&p, fds, 0),
        "{} fds, baseline {fds}",
        fd_count(p.pid())
    );
    let c = p.client();
    assert_eq!(c.call("echo", "E", b"after", T).unwrap(), b"after");
    println!("proxy fds {fds} -> {held} during the flood; RSS {rss0} -> {rss_held} KiB");
    assert!(rss_held < rss0 + 64 * 1024, "RSS {rss0} -> {rss_held} KiB");
}
