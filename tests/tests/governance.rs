//! Mesh governance (issue 7, docs/GOVERNANCE.md) through the real proxy:
//! metrics on the admin port, config reload, overload shedding by
//! priority, deadline drops, access rules (enforce, dry-run, tokens),
//! clusters with dynamic weights, attribute routing with rollout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshshm::{Call, Client, ClientOptions, Server};
use meshshm_proto::status;
use meshshm_tests::*;

const T: Duration = Duration::from_secs(20);

/// One test at a time: the overload and latency tests time things on two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn start(routes: &[(&str, &str)], extra: &str) -> Proxy {
    Proxy::start_with(ProxyOpts {
        routes: routes
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        args: vec!["--admin".into(), "127.0.0.1:0".into()],
        extra: extra.to_owned(),
        ..Default::default()
    })
}

/// The admin address, from the proxy's log (ANSI colours stripped).
fn admin(p: &Proxy) -> SocketAddr {
    logged_addr(p, "admin=")
}

/// An address the proxy logged as `key=ADDR`.
fn logged_addr(p: &Proxy, key: &str) -> SocketAddr {
    let mut plain = String::new();
    let log = p.log_text();
    let mut it = log.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no {key} address in the log:\n{log}"))
}

fn http_get(addr: SocketAddr, path: &str) -> (u32, String) {
    let mut s = TcpStream::connect(addr).expect("admin connect");
    s.set_read_timeout(Some(T)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned();
    (code, body)
}

/// The value of the sample `name{labels}` (labels as they print), or 0.
fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|r| r.strip_prefix(' '))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0.0)
}

fn metrics(p: &Proxy) -> String {
    let (code, body) = http_get(admin(p), "/metrics");
    assert_eq!(code, 200);
    body
}

/// A server app in a thread: answers `reply` after `delay`, counting requests.
struct App {
    stop: Arc<AtomicBool>,
    seen: Arc<AtomicU64>,
    th: Option<std::thread::JoinHandle<()>>,
}

impl App {
    fn start(p: &Proxy, service: &str, delay: Duration, reply: &'static [u8]) -> App {
        App::start_fn(p, service, move |_| delay, reply)
    }

    /// A server app whose n-th request (from 0) waits `delay(n)`.
    fn start_fn(
        p: &Proxy,
        service: &str,
        delay: impl Fn(u64) -> Duration + Send + 'static,
        reply: &'static [u8],
    ) -> App {
        let server = Server::bind(Some(&p.socket), service).expect("bind server");
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicU64::new(0));
        let (st, sn) = (stop.clone(), seen.clone());
        let th = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                if let Ok(Some(req)) = server.next(Some(Duration::from_millis(50))) {
                    let d = delay(sn.fetch_add(1, Ordering::Relaxed));
                    if !d.is_zero() {
                        std::thread::sleep(d);
                    }
                    let _ = server.reply(req.id, 0, reply);
                }
            }
            server.shutdown();
        });
        App {
            stop,
            seen,
            th: Some(th),
        }
    }
    fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.th.take() {
            let _ = t.join();
        }
    }
}

fn invoke(c: &Client, service: &str, prio: u8, headers: &[(&str, &[u8])]) -> u32 {
    let call = Call {
        headers,
        priority: prio,
        ..Call::with_timeout(service, "M", b"x", T)
    };
    c.invoke(&call).map_or(u32::MAX, |r| r.status)
}

#[test]
fn metrics_live_ready_on_the_admin_port() {
    let _s = serial();
    let p = start(&[], "");
    let a = admin(&p);
    assert_eq!(http_get(a, "/live").0, 200);
    assert_eq!(http_get(a, "/ready").0, 200);
    assert_eq!(http_get(a, "/nope").0, 404);
    let c = p.client();
    for _ in 0..10 {
        assert_eq!(c.call("echo", "E", b"hi", T).unwrap(), b"hi");
    }
    let tc = p.tcp_client();
    for _ in 0..5 {
        assert_eq!(tc.call("echo", "E", b"hi", T).unwrap(), b"hi");
    }
    let app = App::start(&p, "greeter", Duration::ZERO, b"hello");
    for _ in 0..3 {
        assert_eq!(c.call("greeter", "Hi", b"", T).unwrap(), b"hello");
    }
    let _ = c.call("nowhere", "M", b"", T);
    let m = metrics(&p);
    assert_eq!(
        metric(
            &m,
            r#"meshshm_requests_total{service="echo",transport="shm"}"#
        ),
        10.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"meshshm_requests_total{service="echo",transport="tcp"}"#
        ),
        5.0
    );
    assert_eq!(
        metric(
            &m,
            r#"meshshm_responses_total{service="greeter",transport="shm",status="ok"}"#
        ),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"meshshm_request_duration_seconds_count{service="greeter",transport="shm"}"#
        ),
        3.0
    );
    assert!(m.contains(r#"status="not_found""#), "{m}");
    assert!(
        metric(&m, r#"meshshm_sessions{transport="shm"}"#) >= 2.0,
        "{m}"
    );
    assert!(metric(&m, "process_resident_memory_bytes") > 0.0, "{m}");
    assert!(m.contains("process_cpu_seconds"), "{m}");
    assert!(metric(&m, "meshshm_doorbell_wakeups_total") >= 1.0, "{m}");
    assert_eq!(app.seen(), 3);
}

#[test]
fn reload_on_sighup_and_file_change_and_bad_config_refused() {
    let _s = serial();
    let p = start(&[], "");
    let cfg = p.dir.0.join("proxy.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();
    let c = p.client();
    assert_eq!(invoke(&c, "late", 1, &[]), status::NOT_FOUND);
    // A new route, by SIGHUP.
    std::fs::write(&cfg, format!("{good}late = \"echo\"\n")).unwrap();
    signal(p.pid(), libc::SIGHUP);
    assert!(
        eventually(T, || invoke(&c, "late", 1, &[]) == status::OK),
        "route not reloaded:\n{}",
        p.log_text()
    );
    // A bad file: refused, the running config stays.
    std::fs::write(&cfg, format!("{good}late = \"nowhere\"\n")).unwrap();
    signal(p.pid(), libc::SIGHUP);
    assert!(eventually(T, || p
        .log_text()
        .contains("configuration reload refused")));
    assert_eq!(invoke(&c, "late", 1, &[]), status::OK);
    assert!(p.log_text().contains("routes.late"), "{}", p.log_text());
    // Access rules for a service this session has called (the proxy
    // remembers a plain echo per session: a reload must end that).
    std::fs::write(
        &cfg,
        format!(
            "{good}late = \"echo\"\n[[access.rules]]\nservices = [\"late\"]\n\
             identities = [\"checkout\"]\nmode = \"enforce\"\n"
        ),
    )
    .unwrap();
    signal(p.pid(), libc::SIGHUP);
    assert!(
        eventually(T, || invoke(&c, "late", 1, &[])
            == status::PERMISSION_DENIED),
        "access rules not applied to a remembered echo:\n{}",
        p.log_text()
    );
    // File change alone (mtime poll): the route goes away.
    std::thread::sleep(Duration::from_millis(50));
    std::fs::write(&cfg, &good).unwrap();
    assert!(
        eventually(T, || invoke(&c, "late", 1, &[]) == status::NOT_FOUND),
        "file change not picked up:\n{}",
        p.log_text()
    );
    let m = metrics(&p);
    assert!(metric(&m, r#"meshshm_config_reloads_total{result="ok"}"#) >= 2.0);
    assert!(metric(&m, r#"meshshm_config_reloads_total{result="refused"}"#) >= 1.0);
}

#[test]
fn overload_sheds_low_priority_first_and_high_keeps_flowing() {
    let _s = serial();
    let p = start(
        &[],
        "[services.slow]\nmax_in_flight = 8\nshed_low_at = 0.5\nshed_normal_at = 0.75\n",
    );
    let app = App::start(&p, "slow", Duration::from_millis(10), b"ok");
    let c = p.client();
    let k = mixed_priority_load(
        &c,
        &[(0, 12), (2, 4)],
        Duration::from_millis(2),
        |c, prio| (invoke(c, "slow", prio, &[]), String::new()),
    );
    assert_low_shed_first(&k);
    let m = metrics(&p);
    assert_eq!(
        metric(&m, r#"meshshm_shed_total{service="slow",priority="low"}"#),
        k[0][1] as f64
    );
    assert_eq!(
        metric(&m, r#"meshshm_shed_total{service="slow",priority="high"}"#),
        0.0
    );
    assert!(app.seen() > 0);
}

#[test]
fn requests_whose_deadline_passes_in_the_queue_are_dropped_unserved() {
    let _s = serial();
    let p = start(&[], "[services.q]\nmax_concurrency = 1\n");
    let app = App::start(&p, "q", Duration::from_millis(400), b"ok");
    let c = p.client();
    let c2 = c.clone();
    let first = std::thread::spawn(move || invoke(&c2, "q", 1, &[]));
    assert!(eventually(T, || app.seen() == 1));
    // Queued behind the first (concurrency 1); its deadline passes there.
    let r = c.invoke(&Call::with_timeout(
        "q",
        "M",
        b"x",
        Duration::from_millis(100),
    ));
    assert!(
        r.as_ref()
            .map_or(true, |r| r.status == status::DEADLINE_EXCEEDED),
        "{r:?}"
    );
    assert_eq!(first.join().unwrap(), status::OK);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(app.seen(), 1, "the expired request reached the server");
    let m = metrics(&p);
    let dropped = metric(
        &m,
        r#"meshshm_expired_total{service="q",reason="deadline"}"#,
    ) + metric(
        &m,
        r#"meshshm_expired_total{service="q",reason="cancelled"}"#,
    );
    assert_eq!(dropped, 1.0, "{m}");
}

#[test]
fn access_rules_enforce_dry_run_and_tokens() {
    let _s = serial();
    let p = start(
        &[("guarded", "echo"), ("trial", "echo")],
        "[[access.rules]]\nservices = [\"guarded\"]\nidentities = [\"checkout\"]\nmode = \"enforce\"\n\
         [[access.rules]]\nservices = [\"trial\"]\nuids = [4242]\nmode = \"dry-run\"\n\
         [access.identity]\ninvalid_token = \"deny\"\n[access.identity.tokens]\ncheckout = \"s3cret\"\n",
    );
    let anon = p.client();
    assert_eq!(invoke(&anon, "guarded", 1, &[]), status::PERMISSION_DENIED);
    assert_eq!(invoke(&anon, "echo", 1, &[]), status::OK);
    let opts = |token: &str| ClientOptions {
        socket: Some(p.socket.clone()),
        service: "checkout".into(),
        token: token.into(),
        ..Default::default()
    };
    let checkout = Client::with_options(opts("s3cret")).expect("valid token");
    assert_eq!(invoke(&checkout, "guarded", 1, &[]), status::OK);
    // A wrong token is refused at the handshake.
    let bad = Client::with_options(opts("guess")).and_then(|c| c.call("echo", "E", b"", T));
    assert!(bad.is_err(), "{bad:?}");
    // Dry-run: allowed, and counted.
    assert_eq!(invoke(&anon, "trial", 1, &[]), status::OK);
    assert_eq!(invoke(&anon, "trial", 1, &[]), status::OK);
    let m = metrics(&p);
    assert_eq!(
        metric(
            &m,
            r#"meshshm_access_denied_total{service="trial",mode="dry-run"}"#
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"meshshm_access_denied_total{service="guarded",mode="enforce"}"#
        ),
        1.0
    );
    assert!(
        metric(
            &m,
            r#"meshshm_token_failures_total{reason="invalid",action="deny"}"#
        ) >= 1.0,
        "{m}"
    );
    assert!(p.log_text().contains("dry-run: access rules would deny"));
}

#[test]
fn invalid_token_allowed_degraded_is_counted() {
    let _s = serial();
    let p = start(
        &[("guarded", "echo")],
        "[[access.rules]]\nservices = [\"guarded\"]\nidentities = [\"checkout\"]\n\
         [access.identity]\ninvalid_token = \"allow-degraded\"\n[access.identity.tokens]\ncheckout = \"s3cret\"\n",
    );
    let c = Client::with_options(ClientOptions {
        socket: Some(p.socket.clone()),
        service: "checkout".into(),
        token: "expired".into(),
        ..Default::default()
    })
    .unwrap();
    // Degraded: connected, but without the identity the rule asks for.
    assert_eq!(invoke(&c, "echo", 1, &[]), status::OK);
    assert_eq!(invoke(&c, "guarded", 1, &[]), status::PERMISSION_DENIED);
    let m = metrics(&p);
    assert_eq!(
        metric(
            &m,
            r#"meshshm_token_failures_total{reason="invalid",action="degraded"}"#
        ),
        1.0,
        "{m}"
    );
}

#[test]
fn a_slow_endpoint_loses_traffic() {
    let _s = serial();
    let p = start(
        &[],
        "[clusters.pool]\nendpoints = [{ to = \"local:pool-fast\" }, { to = \"local:pool-slow\" }]\n\
         [services.pool]\ncluster = \"pool\"\n",
    );
    let fast = App::start(&p, "pool-fast", Duration::ZERO, b"fast");
    let slow = App::start(&p, "pool-slow", Duration::from_millis(20), b"slow");
    let c = p.client();
    let n = 300;
    for _ in 0..n {
        assert_eq!(invoke(&c, "pool", 1, &[]), status::OK);
    }
    println!("fast {} slow {}", fast.seen(), slow.seen());
    assert_eq!(fast.seen() + slow.seen(), n);
    assert!(slow.seen() >= 1, "the slow endpoint was never tried");
    assert!(
        slow.seen() * 10 < n,
        "the slow endpoint kept {} of {n}",
        slow.seen()
    );
    let m = metrics(&p);
    assert_eq!(
        metric(
            &m,
            r#"meshshm_endpoint_requests_total{cluster="pool",endpoint="local:pool-slow"}"#
        ),
        slow.seen() as f64
    );
}

#[test]
fn failing_endpoint_is_ejected_and_calls_are_retried() {
    let _s = serial();
    // "pool-gone" has no server app: its tries fail with UNAVAILABLE, which
    // is retry-safe; the endpoint is ejected after 3 failures.
    let p = start(
        &[],
        "[clusters.pool]\nendpoints = [{ to = \"local:pool-ok\" }, { to = \"local:pool-gone\" }]\ndynamic = false\neject_after = 3\neject_ms = 60000\n\
         [services.pool]\ncluster = \"pool\"\nretries = 2\nretry_budget_percent = 50\nretry_backoff_ms = 1\n",
    );
    let ok = App::start(&p, "pool-ok", Duration::ZERO, b"ok");
    let c = p.client();
    for _ in 0..100 {
        assert_eq!(invoke(&c, "pool", 1, &[]), status::OK);
    }
    assert_eq!(ok.seen(), 100);
    let m = metrics(&p);
    assert!(
        metric(&m, r#"meshshm_retries_total{service="pool"}"#) >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"meshshm_endpoint_ejections_total{cluster="pool",endpoint="local:pool-gone"}"#
        ),
        1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            r#"meshshm_endpoint_requests_total{cluster="pool",endpoint="local:pool-gone"}"#
        ) <= 5.0
    );
}

#[test]
fn ten_percent_rollout_lands_near_ten_percent_and_dry_run_only_counts() {
    let _s = serial();
    let p = start(
        &[("shop", "local")],
        "[services.shop]\n\
         [[services.shop.attribute_routes]]\nheader = \"tenant\"\nvalue = \"blue\"\nto = \"local:shop-v2\"\npercent = 10\n\
         [[services.shop.attribute_routes]]\nheader = \"tenant\"\nvalue = \"green\"\nto = \"local:shop-v2\"\npercent = 50\ndry_run = true\n",
    );
    let v1 = App::start(&p, "shop", Duration::ZERO, b"v1");
    let v2 = App::start(&p, "shop-v2", Duration::ZERO, b"v2");
    let c = p.client();
    let n = 1000;
    for _ in 0..n {
        assert_eq!(invoke(&c, "shop", 1, &[("tenant", b"blue")]), status::OK);
    }
    let to_v2 = v2.seen();
    println!("blue: v2 {to_v2} of {n}");
    assert!((70..=130).contains(&to_v2), "{to_v2} of {n} went to v2");
    // No header, another tenant: never rolled out.
    for _ in 0..50 {
        assert_eq!(invoke(&c, "shop", 1, &[]), status::OK);
        assert_eq!(invoke(&c, "shop", 1, &[("tenant", b"red")]), status::OK);
    }
    // Dry run: everything stays on v1, half is counted.
    for _ in 0..100 {
        assert_eq!(invoke(&c, "shop", 1, &[("tenant", b"green")]), status::OK);
    }
    assert_eq!(v2.seen(), to_v2);
    assert_eq!(v1.seen() + v2.seen(), n + 200);
    let m = metrics(&p);
    let dry = metric(
        &m,
        r#"meshshm_attribute_routes_total{service="shop",header="tenant",value="green",to="local:shop-v2",dry_run="true"}"#,
    );
    assert!((40.0..=60.0).contains(&dry), "dry-run counted {dry}\n{m}");
    let _ = Instant::now();
}

/// One HTTP/1.1 request; (status, headers+body text).
fn http_post(addr: SocketAddr, path: &str, headers: &str, body: &[u8]) -> (u32, String) {
    let mut s = TcpStream::connect(addr).expect("http connect");
    s.set_read_timeout(Some(T)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

#[test]
fn http_ingress_reaches_echo_and_a_server_app_over_shm() {
    let _s = serial();
    let p = Proxy::start_with(ProxyOpts {
        routes: vec![("guarded".into(), "echo".into())],
        args: vec![
            "--admin".into(),
            "127.0.0.1:0".into(),
            "--http".into(),
            "127.0.0.1:0".into(),
        ],
        extra: "[[access.rules]]\nservices = [\"guarded\"]\nuids = [4242]\n".into(),
        ..Default::default()
    });
    let h = logged_addr(&p, "http=");
    let (code, out) = http_post(h, "/echo/E", "", b"hello http");
    assert_eq!(code, 200, "{out}");
    assert!(out.ends_with("hello http"), "{out}");
    assert!(out.contains("x-meshshm-status: 0"), "{out}");
    let app = App::start(&p, "greeter", Duration::ZERO, b"hi from shm");
    let (code, out) = http_post(h, "/greeter/Hi", "x-meshshm-priority: 2\r\n", b"");
    assert_eq!(code, 200, "{out}");
    assert!(out.ends_with("hi from shm"), "{out}");
    assert_eq!(app.seen(), 1);
    assert_eq!(http_post(h, "/nowhere/M", "", b"").0, 404);
    assert_eq!(http_post(h, "/guarded/M", "", b"").0, 403);
    assert_eq!(http_post(h, "/no-method", "", b"").0, 400);
    let m = metrics(&p);
    assert_eq!(
        metric(
            &m,
            r#"meshshm_requests_total{service="echo",transport="http"}"#
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"meshshm_responses_total{service="greeter",transport="http",status="ok"}"#
        ),
        1.0
    );
}

/// A tiny HTTP/1.1 service: answers `legacy:PATH:BODY` (404 for /missing),
/// echoing the `tenant` request header in `x-tenant`.
fn http_service() -> (SocketAddr, Arc<AtomicBool>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    std::thread::spawn(move || {
        while !st.load(Ordering::Relaxed) {
            let Ok((mut s, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head, body) = loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break (String::new(), Vec::new());
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < i + 4 + len {
                        let n = s.read(&mut chunk).unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    break (head, buf[i + 4..].to_vec());
                }
            };
            let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
            let tenant = head
                .lines()
                .find_map(|l| l.strip_prefix("tenant: "))
                .unwrap_or("")
                .to_owned();
            let text = format!("legacy:{path}:{}", String::from_utf8_lossy(&body));
            let code = if path == "/missing" {
                "404 Not Found"
            } else {
                "200 OK"
            };
            let _ = write!(
                s,
                "HTTP/1.1 {code}\r\nContent-Length: {}\r\nx-tenant: {tenant}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    (addr, stop)
}

#[test]
fn an_app_over_shm_calls_a_plain_http_service() {
    let _s = serial();
    let (addr, stop) = http_service();
    let p = start(
        &[
            ("legacy", &format!("http:{addr}")),
            ("closed", "http:127.0.0.1:1"),
        ],
        "",
    );
    let c = p.client();
    for i in 0..3 {
        let body = format!("b{i}");
        let call = Call {
            headers: &[("tenant", b"blue")],
            ..Call::with_timeout("legacy", "hello", body.as_bytes(), T)
        };
        let r = c.invoke(&call).unwrap();
        assert_eq!(r.status, status::OK, "{r:?}");
        assert_eq!(r.body, format!("legacy:/hello:b{i}").as_bytes());
        assert!(
            r.headers
                .iter()
                .any(|(k, v)| k == "x-tenant" && v == b"blue"),
            "{r:?}"
        );
    }
    assert_eq!(
        invoke(&c, "legacy_missing_route", 1, &[]),
        status::NOT_FOUND
    );
    let r = c
        .invoke(&Call::with_timeout("legacy", "missing", b"", T))
        .unwrap();
    assert_eq!(r.status, status::NOT_FOUND, "{r:?}");
    assert_eq!(invoke(&c, "closed", 1, &[]), status::UNAVAILABLE);
    stop.store(true, Ordering::Relaxed);
}

/// Callers of each priority of `mix` ((priority, threads)) call `call`
/// in a loop for 1.5 s, pausing `backoff` after a shed; returns the OK and
/// shed (RESOURCE_EXHAUSTED) counts per priority. Any other status fails.
fn mixed_priority_load(
    c: &Client,
    mix: &[(u8, usize)],
    backoff: Duration,
    call: fn(&Client, u8) -> (u32, String),
) -> [[u64; 2]; 3] {
    let stop = AtomicBool::new(false);
    let counts = Mutex::new([[0u64; 2]; 3]); // [prio][ok, shed]
    std::thread::scope(|sc| {
        for &(prio, n) in mix {
            for _ in 0..n {
                let (stop, counts) = (&stop, &counts);
                sc.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let (s, msg) = call(c, prio);
                        let shed = match s {
                            status::OK => false,
                            status::RESOURCE_EXHAUSTED => true,
                            other => panic!("priority {prio}: status {other} {msg}"),
                        };
                        counts.lock().unwrap()[prio as usize][usize::from(shed)] += 1;
                        if shed {
                            std::thread::sleep(backoff);
                        }
                    }
                });
            }
        }
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
    });
    let k = *counts.lock().unwrap();
    println!("low ok/shed {:?}, high ok/shed {:?}", k[0], k[2]);
    k
}

/// Low priority was shed, high priority never was and kept flowing.
fn assert_low_shed_first(k: &[[u64; 2]; 3]) {
    assert!(k[0][1] > 0, "no low-priority request shed: {k:?}");
    assert_eq!(k[2][1], 0, "a high-priority request was shed: {k:?}");
    assert!(k[2][0] > 0, "high priority did not flow: {k:?}");
}

/// One call of `service`/`method` with `timeout` and `priority`: (status, message, elapsed).
/// A call the client gave up on itself counts as DEADLINE_EXCEEDED.
fn call_m(
    c: &Client,
    service: &str,
    method: &str,
    prio: u8,
    timeout: Duration,
) -> (u32, String, Duration) {
    let t0 = Instant::now();
    let call = Call {
        priority: prio,
        ..Call::with_timeout(service, method, b"x", timeout)
    };
    match c.invoke(&call) {
        Ok(r) => (r.status, r.message, t0.elapsed()),
        Err(e) => (status::DEADLINE_EXCEEDED, e.to_string(), t0.elapsed()),
    }
}

#[test]
fn least_request_spreads_idle_traffic_and_avoids_the_busy_endpoint() {
    let _s = serial();
    let p = start(
        &[],
        "[clusters.lr]\nlb = \"least-request\"\ndynamic = false\n\
         endpoints = [{ to = \"local:lr-slow\" }, { to = \"local:lr-fast\" }]\n\
         [services.lr]\ncluster = \"lr\"\n",
    );
    let slow_ms = Arc::new(AtomicU64::new(0));
    let sm = slow_ms.clone();
    let slow = App::start_fn(
        &p,
        "lr-slow",
        move |_| Duration::from_millis(sm.load(Ordering::Relaxed)),
        b"slow",
    );
    let fast = App::start(&p, "lr-fast", Duration::ZERO, b"fast");
    let c = p.client();
    // Idle, equal weights: ties go round robin, not all to the first.
    for _ in 0..100 {
        assert_eq!(invoke(&c, "lr", 1, &[]), status::OK);
    }
    println!("idle: slow {} fast {}", slow.seen(), fast.seen());
    assert!(
        (40..=60).contains(&slow.seen()) && (40..=60).contains(&fast.seen()),
        "idle traffic not spread: slow {} fast {}",
        slow.seen(),
        fast.seen()
    );
    // One endpoint holds its requests 100 ms: it has requests in flight,
    // so nearly everything goes to the other (weighted round robin with
    // equal static weights would send it half).
    slow_ms.store(100, Ordering::Relaxed);
    let (s0, f0) = (slow.seen(), fast.seen());
    let stop = Arc::new(AtomicBool::new(false));
    let ths: Vec<_> = (0..4)
        .map(|_| {
            let (c, stop) = (c.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(invoke(&c, "lr", 1, &[]), status::OK);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    for t in ths {
        t.join().unwrap();
    }
    let (ds, df) = (slow.seen() - s0, fast.seen() - f0);
    println!("busy: slow {ds} fast {df}");
    assert!(df > 0 && ds * 10 < ds + df, "slow kept {ds} of {}", ds + df);
    let m = metrics(&p);
    assert_eq!(
        metric(
            &m,
            r#"meshshm_endpoint_requests_total{cluster="lr",endpoint="local:lr-slow"}"#
        ),
        slow.seen() as f64,
        "{m}"
    );
}

#[test]
fn per_try_and_per_route_timeouts_cut_slow_calls_and_the_caller_deadline_wins() {
    let _s = serial();
    let p = start(
        &[],
        "[services.pertry]\ntry_timeout_ms = 100\n\
         [services.route]\ntimeout_ms = 150\n",
    );
    let _a = App::start(&p, "pertry", Duration::from_millis(600), b"late");
    let _b = App::start(&p, "route", Duration::from_millis(600), b"late");
    let c = p.client();
    // The caller allows 20 s; the per-try timeout answers after ~100 ms.
    let (st, msg, took) = call_m(&c, "pertry", "M", 1, T);
    println!("per-try: {st} {msg:?} after {took:?}");
    assert_eq!(st, status::DEADLINE_EXCEEDED, "{msg}");
    assert!(
        took >= Duration::from_millis(95) && took < Duration::from_millis(500),
        "{took:?}"
    );
    // The route timeout: ~150 ms.
    let (st, msg, took) = call_m(&c, "route", "M", 1, T);
    println!("route: {st} {msg:?} after {took:?}");
    assert_eq!(st, status::DEADLINE_EXCEEDED, "{msg}");
    assert!(
        took >= Duration::from_millis(145) && took < Duration::from_millis(500),
        "{took:?}"
    );
    // A shorter caller deadline wins over the route's.
    let (st, _, took) = call_m(&c, "route", "M", 1, Duration::from_millis(40));
    assert_eq!(st, status::DEADLINE_EXCEEDED);
    assert!(took < Duration::from_millis(140), "{took:?}");
    let m = metrics(&p);
    assert_eq!(
        metric(
            &m,
            r#"meshshm_responses_total{service="pertry",transport="shm",status="deadline_exceeded"}"#
        ),
        1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            r#"meshshm_responses_total{service="route",transport="shm",status="deadline_exceeded"}"#
        ) >= 1.0,
        "{m}"
    );
}

#[test]
fn timed_out_idempotent_calls_are_retried_and_others_are_not() {
    let _s = serial();
    let policy = "try_timeout_ms = 250\nretries = 2\nretry_backoff_ms = 1\n\
                  retry_budget_percent = 100\nidempotent_methods = [\"Get\"]\n";
    let p = start(
        &[],
        &format!("[services.idem]\n{policy}[services.other]\n{policy}"),
    );
    // The first request of each app takes 300 ms (its try times out at
    // 250 ms); later ones are answered at once.
    let first_slow = |n: u64| Duration::from_millis(if n == 0 { 300 } else { 0 });
    let idem = App::start_fn(&p, "idem", first_slow, b"ok");
    let other = App::start_fn(&p, "other", first_slow, b"ok");
    let c = p.client();
    let (st, msg, took) = call_m(&c, "idem", "Get", 1, T);
    println!("Get: {st} {msg:?} after {took:?}");
    assert_eq!(st, status::OK, "{msg}");
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert_eq!(idem.seen(), 2, "one try and one retry");
    // Not idempotent: the timed-out try is final.
    let (st, msg, _) = call_m(&c, "other", "Post", 1, T);
    assert_eq!(st, status::DEADLINE_EXCEEDED, "{msg}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(other.seen(), 1, "a non-idempotent call was retried");
    let m = metrics(&p);
    assert_eq!(
        metric(&m, r#"meshshm_retries_total{service="idem"}"#),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"meshshm_retries_total{service="other"}"#),
        0.0,
        "{m}"
    );
}

#[test]
fn queueing_time_sheds_low_priority_first_and_recovers_when_the_queue_empties() {
    let _s = serial();
    let p = start(
        &[],
        "[services.qt]\nmax_concurrency = 1\nmax_queue_ms = 5\n",
    );
    let app = App::start(&p, "qt", Duration::from_millis(20), b"ok");
    let c = p.client();
    let k = mixed_priority_load(
        &c,
        &[(0, 6), (2, 2)],
        Duration::from_millis(5),
        |c, prio| {
            let (s, msg, _) = call_m(c, "qt", "M", prio, T);
            if s == status::RESOURCE_EXHAUSTED {
                assert!(msg.contains("queueing time"), "{msg}");
            }
            (s, msg)
        },
    );
    assert_low_shed_first(&k);
    // No queue any more: low priority goes through again (the queueing
    // time measured under load does not shed forever).
    let (st, msg, _) = call_m(&c, "qt", "M", 0, T);
    assert_eq!(st, status::OK, "{msg}");
    let m = metrics(&p);
    assert_eq!(
        metric(&m, r#"meshshm_shed_total{service="qt",priority="low"}"#),
        k[0][1] as f64,
        "{m}"
    );
    assert!(app.seen() > 0);
}

/// Burns CPU on every core until dropped.
struct Burn(Arc<AtomicBool>, Vec<std::thread::JoinHandle<()>>);

impl Burn {
    fn start() -> Burn {
        let stop = Arc::new(AtomicBool::new(false));
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        let ths = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                    }
                })
            })
            .collect();
        Burn(stop, ths)
    }
}

impl Drop for Burn {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        for t in self.1.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn host_cpu_over_threshold_sheds_low_priority_only_and_the_threshold_reloads() {
    let _s = serial();
    let p = start(&[], "[services.cpu]\nshed_low_cpu = 0.05\n");
    let _app = App::start(&p, "cpu", Duration::ZERO, b"ok");
    let c = p.client();
    let burn = Burn::start();
    // The proxy samples host CPU every second.
    assert!(
        eventually(T, || metric(&metrics(&p), "meshshm_host_cpu_ratio") > 0.05),
        "host CPU never seen above 5%"
    );
    let (st, msg, _) = call_m(&c, "cpu", "M", 0, T);
    assert_eq!(st, status::RESOURCE_EXHAUSTED, "{msg}");
    assert!(msg.contains("host CPU"), "{msg}");
    assert_eq!(call_m(&c, "cpu", "M", 1, T).0, status::OK);
    assert_eq!(call_m(&c, "cpu", "M", 2, T).0, status::OK);
    // Raised by a reload: low priority flows again, CPU still busy.
    let cfg = p.dir.0.join("proxy.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("shed_low_cpu = 0.05", "shed_low_cpu = 1.0"),
    )
    .unwrap();
    signal(p.pid(), libc::SIGHUP);
    let mut shed = 1;
    assert!(
        eventually(T, || match call_m(&c, "cpu", "M", 0, T).0 {
            status::OK => true,
            s => {
                assert_eq!(s, status::RESOURCE_EXHAUSTED);
                shed += 1;
                false
            }
        }),
        "threshold not reloaded:\n{}",
        p.log_text()
    );
    drop(burn);
    let m = metrics(&p);
    assert_eq!(
        metric(&m, r#"meshshm_shed_total{service="cpu",priority="low"}"#),
        shed as f64,
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"meshshm_shed_total{service="cpu",priority="normal"}"#),
        0.0
    );
}

/// `meshshm-proxy token mint` with the proxy's configuration.
fn mint(p: &Proxy, identity: &str, ttl: &str) -> String {
    let out = std::process::Command::new(bin("meshshm-proxy"))
        .arg("--config")
        .arg(p.dir.0.join("proxy.toml"))
        .args(["token", "mint", "--identity", identity, "--ttl", ttl])
        .output()
        .expect("meshshm-proxy token mint");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

const KEY: &str = "7f0c5e8a1b2d3c4e5f60718293a4b5c6d7e8f90112233445566778899aabbccd";

#[test]
fn expired_tokens_are_refused_or_degraded_and_counted() {
    let _s = serial();
    let p = start(
        &[("guarded", "echo")],
        &format!(
            "[[access.rules]]\nservices = [\"guarded\"]\nidentities = [\"checkout\", \"billing\", \"ledger\"]\n\
             [access.identity]\ninvalid_token = \"deny\"\nsigning_keys = [\"{KEY}\"]\n\
             [access.identity.tokens]\ncheckout = \"s3cret\"\n\
             billing = {{ token = \"old\", expires = 2020-01-01T00:00:00Z }}\n\
             ledger = {{ token = \"fresh\", expires = 2999-01-01T00:00:00+02:00 }}\n"
        ),
    );
    let opts = |service: &str, token: &str| ClientOptions {
        socket: Some(p.socket.clone()),
        service: service.into(),
        token: token.into(),
        ..Default::default()
    };
    let connect = |service: &str, token: &str| {
        Client::with_options(opts(service, token)).and_then(|c| {
            c.call("echo", "E", b"", T)?;
            Ok(c)
        })
    };
    // A plain static token still works; one with a future expiry too.
    let c = connect("checkout", "s3cret").expect("static token");
    assert_eq!(invoke(&c, "guarded", 1, &[]), status::OK);
    let c = connect("ledger", "fresh").expect("token before its expiry");
    assert_eq!(invoke(&c, "guarded", 1, &[]), status::OK);
    // A static token past its expiry: refused at the handshake.
    assert!(connect("billing", "old").is_err());
    // A signed token: valid for its identity only.
    let t = mint(&p, "billing", "1h");
    assert!(t.starts_with("mst1.billing."), "{t}");
    let c = connect("billing", &t).expect("signed token");
    assert_eq!(invoke(&c, "guarded", 1, &[]), status::OK);
    assert!(
        connect("checkout", &t).is_err(),
        "a token for another identity"
    );
    // A short-lived signed token: good at the handshake, then it expires:
    // the session loses its identity, and a new handshake is refused.
    let short = mint(&p, "ledger", "2");
    let c = connect("ledger", &short).expect("short-lived token");
    assert_eq!(invoke(&c, "guarded", 1, &[]), status::OK);
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(invoke(&c, "guarded", 1, &[]), status::PERMISSION_DENIED);
    assert_eq!(invoke(&c, "guarded", 1, &[]), status::PERMISSION_DENIED);
    assert_eq!(invoke(&c, "echo", 1, &[]), status::OK);
    assert!(connect("ledger", &short).is_err());
    let m = metrics(&p);
    let f = |reason: &str, action: &str| {
        metric(
            &m,
            &format!(r#"meshshm_token_failures_total{{reason="{reason}",action="{action}"}}"#),
        )
    };
    assert_eq!(f("expired", "deny"), 2.0, "{m}");
    assert_eq!(f("expired", "dropped"), 1.0, "{m}");
    assert_eq!(f("invalid", "deny"), 1.0, "{m}");
    // Degraded mode, by a reload: the expired token connects without its
    // identity, and is counted as such.
    let cfg = p.dir.0.join("proxy.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            "invalid_token = \"deny\"",
            "invalid_token = \"allow-degraded\"",
        ),
    )
    .unwrap();
    signal(p.pid(), libc::SIGHUP);
    assert!(eventually(T, || connect("billing", "old").is_ok()));
    let c = connect("billing", "old").unwrap();
    assert_eq!(invoke(&c, "guarded", 1, &[]), status::PERMISSION_DENIED);
    let m = metrics(&p);
    assert!(
        metric(
            &m,
            r#"meshshm_token_failures_total{reason="expired",action="degraded"}"#
        ) >= 2.0,
        "{m}"
    );
}

#[test]
fn echo_latency_ring_fill_and_wakeups_per_request_are_in_the_metrics() {
    let _s = serial();
    let p = start(&[], "");
    let c = p.client();
    let body = vec![7u8; 32 * 1024];
    let ths: Vec<_> = (0..4)
        .map(|_| {
            let (c, body) = (c.clone(), body.clone());
            std::thread::spawn(move || {
                for _ in 0..600 {
                    assert_eq!(c.call("echo", "E", &body, T).unwrap().len(), body.len());
                }
            })
        })
        .collect();
    for t in ths {
        t.join().unwrap();
    }
    let tc = p.tcp_client();
    for _ in 0..5 {
        assert_eq!(tc.call("echo", "E", b"hi", T).unwrap(), b"hi");
    }
    let m = metrics(&p);
    // Echo is answered inline, and still in the latency histogram.
    assert_eq!(
        metric(
            &m,
            r#"meshshm_request_duration_seconds_count{service="echo",transport="shm"}"#
        ),
        2400.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"meshshm_request_duration_seconds_count{service="echo",transport="tcp"}"#
        ),
        5.0
    );
    // Buckets are cumulative once: the +Inf bucket is the count.
    assert_eq!(
        metric(
            &m,
            r#"meshshm_request_duration_seconds_bucket{le="+Inf",service="echo",transport="shm"}"#
        ),
        2400.0,
        "{m}"
    );
    for l in m.lines().filter(|l| l.starts_with("meshshm_ring_fill")) {
        println!("{l}");
    }
    // Ring fill, both directions, sampled while the session was serviced:
    // some samples saw a 32 KiB request waiting in the 2 MiB ring.
    for dir in ["up", "down"] {
        let n = metric(
            &m,
            &format!(r#"meshshm_ring_fill_ratio_count{{direction="{dir}"}}"#),
        );
        assert!(n > 0.0, "no {dir} sample\n{m}");
        let full = metric(
            &m,
            &format!(r#"meshshm_ring_fill_ratio_bucket{{le="1.0",direction="{dir}"}}"#),
        );
        assert_eq!(full, n, "a fill above 100%\n{m}");
    }
    assert!(
        metric(&m, r#"meshshm_ring_fill_ratio_sum{direction="up"}"#) > 0.0,
        "{m}"
    );
    // Wake-ups per request: both sides of the ratio are there.
    let wakeups = metric(&m, "meshshm_doorbell_wakeups_total");
    let requests = metric(
        &m,
        r#"meshshm_requests_total{service="echo",transport="shm"}"#,
    );
    assert_eq!(requests, 2400.0);
    assert!(wakeups >= 1.0 && wakeups <= 4.0 * requests, "{wakeups}");
}

#[test]
fn reload_applies_uid_tables_and_names_sections_that_need_a_restart() {
    let _s = serial();
    let p = start(&[("guarded", "echo")], "");
    let c = p.client();
    assert_eq!(invoke(&c, "guarded", 1, &[]), status::OK);
    let cfg = p.dir.0.join("proxy.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    // [access.call] is reloaded; a changed [shm] is not (warned about).
    let next = format!("{text}[access.call]\n\"*\" = [\"echo\"]\n")
        .replace("spin_us = 20", "spin_us = 21");
    assert_ne!(next, format!("{text}[access.call]\n\"*\" = [\"echo\"]\n"));
    std::fs::write(&cfg, next).unwrap();
    signal(p.pid(), libc::SIGHUP);
    assert!(
        eventually(T, || invoke(&c, "guarded", 1, &[])
            == status::PERMISSION_DENIED),
        "[access.call] not reloaded:\n{}",
        p.log_text()
    );
    assert_eq!(invoke(&c, "echo", 1, &[]), status::OK);
    assert!(
        eventually(T, || p.log_text().contains("read only at start")),
        "{}",
        p.log_text()
    );
    let log = p.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("read only at start"))
        .unwrap();
    assert!(line.contains("shm"), "{line}");
    assert!(!line.contains("listen"), "{line}");
}
