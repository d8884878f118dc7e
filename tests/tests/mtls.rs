//! Mutual TLS between proxies (issue 8), with real proxies and real TLS:
//! app → proxy A (shm) → proxy B (TCP, mTLS or plaintext) → server app (shm).
//! Certificates come from the `meshshm-proxy certs` helper, into temporary
//! directories.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshshm::{status, Client, Error};
use meshshm_tests::{bin, eventually, KillOnDrop, Proxy, ProxyOpts, TempDir};

const T: Duration = Duration::from_secs(10);

/// Run `meshshm-proxy certs` with `args`.
fn certs(args: &[&str]) {
    let out = Command::new(bin("meshshm-proxy"))
        .arg("certs")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "certs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA with certificates for `names`, in a fresh directory.
fn pki(names: &[&str]) -> TempDir {
    let d = TempDir::new("pki");
    let mut args = vec![
        "--out",
        d.0.to_str().unwrap(),
        "--trust-domain",
        "example.org",
    ];
    for n in names {
        args.extend(["--name", n]);
    }
    certs(&args);
    d
}

/// A `[tls]` section using `dir/name.pem`, `dir/name.key` and trust bundle `ca`.
fn tls(dir: &Path, name: &str, ca: &Path, body: &str) -> String {
    format!(
        "\n[tls]\ncert = \"{d}/{name}.pem\"\nkey = \"{d}/{name}.key\"\nca = \"{ca}\"\nreload_ms = 100\n{body}\n",
        d = dir.display(),
        ca = ca.display()
    )
}

fn proxy(routes: &[(&str, String)], extra: String) -> Proxy {
    Proxy::start_with(ProxyOpts {
        routes: routes
            .iter()
            .map(|(s, u)| (s.to_string(), u.clone()))
            .collect(),
        extra,
        ..Default::default()
    })
}

/// The last value of counter `name` in the proxy's `tls stats` log lines.
fn counter(p: &Proxy, name: &str) -> u64 {
    let log = p.log_text();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("tls stats "))
        .unwrap_or("");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|v| {
            let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .unwrap_or(0)
}

/// Wait until counter `name` of `p` reaches `at_least`.
fn wait_counter(p: &Proxy, name: &str, at_least: u64) {
    assert!(
        eventually(T, || counter(p, name) >= at_least),
        "{name} never reached {at_least}; log:\n{}",
        p.log_text()
    );
}

/// `meshshm serve SERVICE -- tr a-z A-Z` attached to `p`, answering.
fn upper_server(p: &Proxy, service: &str) -> KillOnDrop {
    p.serve_cli(service, &["--", "tr", "a-z", "A-Z"])
}

fn expect_status(r: Result<Vec<u8>, Error>, code: u32, needle: &str) -> String {
    match r {
        Err(Error::Status { code: c, message }) => {
            assert_eq!(c, code, "status of {message:?}");
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
            message
        }
        other => panic!("expected status {code} ({needle}), got {other:?}"),
    }
}

fn shout(c: &Client, svc: &str, msg: &str) {
    assert_eq!(
        c.call(svc, "Shout", msg.as_bytes(), T).unwrap(),
        msg.to_uppercase().as_bytes()
    );
}

#[test]
fn permissive_listener_serves_tls_and_plaintext_peers() {
    let pki = pki(&["a", "b"]);
    let d = &pki.0;
    let ca = d.join("ca.pem");
    let b = proxy(&[], tls(d, "b", &ca, "mode = \"permissive\""));
    let _srv = upper_server(&b, "inventory");
    let route = [("inventory", format!("proxy:{}", b.tcp))];
    // A TLS peer and a plaintext peer (a proxy not migrated yet).
    let a_tls = proxy(&route, tls(d, "a", &ca, "upstream_mode = \"strict\""));
    let a_plain = proxy(&route, String::new());
    shout(&a_tls.client(), "inventory", "over mtls");
    shout(&a_plain.client(), "inventory", "over plaintext");
    wait_counter(&b, "tls_accepted", 1);
    wait_counter(&b, "plaintext_accepted", 1);
    let log = b.log_text();
    assert!(log.contains("mutual TLS session up"), "{log}");
    assert!(log.contains("spiffe://example.org/svc/a"), "{log}");
    assert!(log.contains("plaintext connection accepted"), "{log}");
    wait_counter(&a_tls, "upstream_tls", 1);

    // A permissive upstream migrates either way: TLS to B, plaintext
    // (counted) to a proxy that does not speak TLS.
    let old = proxy(&[], String::new());
    let _srv2 = upper_server(&old, "legacy");
    let a_perm = proxy(
        &[
            ("inventory", format!("proxy:{}", b.tcp)),
            ("legacy", format!("proxy:{}", old.tcp)),
        ],
        tls(d, "a", &ca, "upstream_mode = \"permissive\""),
    );
    let c = a_perm.client();
    shout(&c, "inventory", "tls when it can");
    shout(&c, "legacy", "plaintext when it must");
    wait_counter(&a_perm, "upstream_tls", 1);
    wait_counter(&a_perm, "upstream_plaintext_fallback", 1);
    wait_counter(&b, "tls_accepted", 2);
}

#[test]
fn strict_listener_refuses_plaintext_and_the_caller_hears_why() {
    let pki = pki(&["a", "b"]);
    let d = &pki.0;
    let ca = d.join("ca.pem");
    let b = proxy(&[], tls(d, "b", &ca, "mode = \"strict\""));
    let _srv = upper_server(&b, "inventory");
    let route = [("inventory", format!("proxy:{}", b.tcp))];
    let a_plain = proxy(&route, String::new());
    let c = a_plain.client();
    expect_status(
        c.call("inventory", "X", b"hello", T),
        status::PERMISSION_DENIED,
        "requires mutual TLS",
    );
    // Again: a new connection, refused again.
    assert!(eventually(T, || c.call("inventory", "X", b"x", T).is_err()));
    wait_counter(&b, "plaintext_refused", 1);
    assert!(b.log_text().contains("plaintext connection refused"));
    // The TLS peer is served.
    let a_tls = proxy(&route, tls(d, "a", &ca, "upstream_mode = \"strict\""));
    shout(&a_tls.client(), "inventory", "strict and fine");
    // A plain TCP app client is refused in the same way (same frames).
    let direct = b.tcp_client();
    expect_status(
        direct.call("inventory", "X", b"x", T),
        status::PERMISSION_DENIED,
        "strict",
    );
}

#[test]
fn certificate_from_another_ca_is_refused_both_ways() {
    let good = pki(&["a", "b"]);
    let other = pki(&["a", "b"]);
    let (g, o) = (&good.0, &other.0);
    // A bundle with both CAs, so that each proxy trusts its own certificate.
    let both = g.join("both.pem");
    let text = std::fs::read_to_string(g.join("ca.pem")).unwrap()
        + &std::fs::read_to_string(o.join("ca.pem")).unwrap();
    std::fs::write(&both, text).unwrap();

    let b = proxy(&[], tls(g, "b", &g.join("ca.pem"), "mode = \"strict\""));
    let _srv = upper_server(&b, "inventory");
    let route = [("inventory", format!("proxy:{}", b.tcp))];
    // A presents a certificate from the other CA: B refuses it.
    let a = proxy(&route, tls(o, "a", &both, "upstream_mode = \"strict\""));
    let r = a.client().call("inventory", "X", b"x", T);
    expect_status(r, status::UNAVAILABLE, "received fatal alert: UnknownCA");
    wait_counter(&b, "tls_refused", 1);
    assert!(b.log_text().contains("handshake refused"));

    // B presents a certificate from the other CA: A refuses it.
    let b2 = proxy(&[], tls(o, "b", &both, "mode = \"strict\""));
    let _srv2 = upper_server(&b2, "inventory");
    let a2 = proxy(
        &[("inventory", format!("proxy:{}", b2.tcp))],
        tls(g, "a", &g.join("ca.pem"), "upstream_mode = \"strict\""),
    );
    let r = a2.client().call("inventory", "X", b"x", T);
    expect_status(
        r,
        status::UNAVAILABLE,
        "invalid peer certificate: UnknownIssuer",
    );
    wait_counter(&a2, "upstream_refused", 1);
}

#[test]
fn expired_certificate_is_refused_both_ways() {
    let pki = pki(&["a", "b"]);
    let d = &pki.0;
    let ca = d.join("ca.pem");
    let exp = TempDir::new("expired");
    let e = &exp.0;
    certs(&[
        "--out",
        e.to_str().unwrap(),
        "--ca-cert",
        ca.to_str().unwrap(),
        "--ca-key",
        d.join("ca.key").to_str().unwrap(),
        "--name",
        "a",
        "--name",
        "b",
        "--expired",
    ]);
    let b = proxy(&[], tls(d, "b", &ca, "mode = \"strict\""));
    let _srv = upper_server(&b, "inventory");
    let route = [("inventory", format!("proxy:{}", b.tcp))];
    // A's certificate has expired: B refuses it.
    let a = proxy(&route, tls(e, "a", &ca, "upstream_mode = \"strict\""));
    assert!(eventually(T, || a
        .log_text()
        .contains("will be refused by peers")));
    expect_status(
        a.client().call("inventory", "X", b"x", T),
        status::UNAVAILABLE,
        "received fatal alert: CertificateExpired",
    );
    wait_counter(&b, "tls_refused", 1);
    assert!(b.log_text().contains("handshake refused"));

    // B's certificate has expired: A refuses it.
    let b2 = proxy(&[], tls(e, "b", &ca, "mode = \"strict\""));
    let _srv2 = upper_server(&b2, "inventory");
    let a2 = proxy(
        &[("inventory", format!("proxy:{}", b2.tcp))],
        tls(d, "a", &ca, "upstream_mode = \"strict\""),
    );
    expect_status(
        a2.client().call("inventory", "X", b"x", T),
        status::UNAVAILABLE,
        "certificate expired",
    );
}

#[test]
fn upstream_identity_is_checked() {
    let pki = pki(&["a", "b"]);
    let d = &pki.0;
    let ca = d.join("ca.pem");
    let b = proxy(&[], tls(d, "b", &ca, "mode = \"strict\""));
    let _srv = upper_server(&b, "inventory");
    let route = [("inventory", format!("proxy:{}", b.tcp))];
    let want = |id: &str| {
        tls(
            d,
            "a",
            &ca,
            &format!(
                "[tls.upstream.\"{}\"]\nmode = \"strict\"\nidentity = \"{id}\"\n",
                b.tcp
            ),
        )
    };
    let ok = proxy(&route, want("spiffe://example.org/svc/b"));
    shout(&ok.client(), "inventory", "the right peer");
    let ok_dns = proxy(&route, want("b.example.org"));
    shout(&ok_dns.client(), "inventory", "by dns name");
    let wrong = proxy(&route, want("spiffe://example.org/svc/payment"));
    expect_status(
        wrong.client().call("inventory", "X", b"x", T),
        status::UNAVAILABLE,
        "expected \"spiffe://example.org/svc/payment\"",
    );
}

/// A TLS client of our own: connect to `addr` as `name` and return the
/// certificate the server presents (DER), verified against `ca`.
fn presented_cert(addr: std::net::SocketAddr, dir: &Path, name: &str, ca: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(dir.join(format!("{name}.pem")))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let mut conn = rustls::ClientConnection::new(
        Arc::new(cfg),
        ServerName::try_from("b.example.org").unwrap(),
    )
    .unwrap();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).unwrap();
    }
    conn.peer_certificates().unwrap()[0].to_vec()
}

fn pem_der(path: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(path)
        .unwrap()
        .to_vec()
}

/// Replace `dst` by `src` atomically (what a certificate agent does).
fn install(src: &Path, dst: &Path) {
    let tmp: PathBuf = dst.with_extension("new");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

#[test]
fn rotation_while_traffic_flows() {
    let pki = pki(&["a", "b"]);
    let d = &pki.0;
    let ca = d.join("ca.pem");
    // B's live files, in a directory of their own.
    let live = TempDir::new("live");
    let l = &live.0;
    for f in ["b.pem", "b.key"] {
        std::fs::copy(d.join(f), l.join(f)).unwrap();
    }
    let b = proxy(&[], tls(l, "b", &ca, "mode = \"strict\""));
    let _srv = upper_server(&b, "inventory");
    let a = proxy(
        &[("inventory", format!("proxy:{}", b.tcp))],
        tls(d, "a", &ca, "upstream_mode = \"strict\""),
    );
    let old = pem_der(&d.join("b.pem"));
    assert_eq!(presented_cert(b.tcp, d, "a", &ca), old);

    // Traffic through A → B all along, from several threads.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let c = a.client();
    let workers: Vec<_> = (0..3)
        .map(|i| {
            let (c, stop, ok, failed) = (c.clone(), stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let m = format!("req-{i}-{n}");
                    match c.call("inventory", "C", m.as_bytes(), T) {
                        Ok(r) if r == m.to_uppercase().as_bytes() => {
                            ok.fetch_add(1, Ordering::Relaxed)
                        }
                        other => {
                            eprintln!("failed: {other:?}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    n += 1;
                }
            })
        })
        .collect();
    assert!(eventually(T, || ok.load(Ordering::Relaxed) > 50));

    // A new certificate for B from the same CA, installed in place.
    let next = TempDir::new("next");
    let n = &next.0;
    certs(&[
        "--out",
        n.to_str().unwrap(),
        "--ca-cert",
        ca.to_str().unwrap(),
        "--ca-key",
        d.join("ca.key").to_str().unwrap(),
        "--name",
        "b",
    ]);
    let new = pem_der(&n.join("b.pem"));
    assert_ne!(new, old);
    install(&n.join("b.key"), &l.join("b.key"));
    install(&n.join("b.pem"), &l.join("b.pem"));
    assert!(
        eventually(T, || presented_cert(b.tcp, d, "a", &ca) == new),
        "new connections never saw the new certificate; log:\n{}",
        b.log_text()
    );
    wait_counter(&b, "reloads", 1);

    // A bad new certificate is refused; the one in force stays.
    let refused = counter(&b, "reloads_refused");
    std::fs::write(l.join("b.pem"), "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    wait_counter(&b, "reloads_refused", refused + 1);
    assert_eq!(presented_cert(b.tcp, d, "a", &ca), new);
    // So is a well-formed one that has expired.
    let exp = TempDir::new("exp");
    certs(&[
        "--out",
        exp.0.to_str().unwrap(),
        "--ca-cert",
        ca.to_str().unwrap(),
        "--ca-key",
        d.join("ca.key").to_str().unwrap(),
        "--name",
        "b",
        "--expired",
    ]);
    install(&exp.0.join("b.key"), &l.join("b.key"));
    install(&exp.0.join("b.pem"), &l.join("b.pem"));
    wait_counter(&b, "reloads_refused", refused + 2);
    assert_eq!(presented_cert(b.tcp, d, "a", &ca), new);
    assert!(b.log_text().contains("the old one stays in force"));

    // Traffic went on through all of it.
    let before = ok.load(Ordering::Relaxed);
    assert!(eventually(T, || ok.load(Ordering::Relaxed) > before + 50));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during rotation"
    );
    // New connections from A use the new certificate too.
    let a2 = proxy(
        &[("inventory", format!("proxy:{}", b.tcp))],
        tls(d, "a", &ca, "upstream_mode = \"strict\""),
    );
    shout(&a2.client(), "inventory", "after rotation");
}

#[test]
fn identity_rules_deny_or_only_count_in_dry_run() {
    let pki = pki(&["checkout", "web"]);
    let d = &pki.0;
    let ca = d.join("ca.pem");
    for mode in ["enforce", "dry-run"] {
        let rule = format!(
            "mode = \"permissive\"\n[[tls.allow]]\nidentity = \"spiffe://example.org/svc/checkout\"\nservices = [\"payment\"]\nmode = \"{mode}\"\n"
        );
        let b = proxy(&[], tls(d, "web", &ca, &rule));
        let _srv = upper_server(&b, "payment");
        let _srv2 = upper_server(&b, "catalog");
        let routes = [
            ("payment", format!("proxy:{}", b.tcp)),
            ("catalog", format!("proxy:{}", b.tcp)),
        ];
        let checkout = proxy(
            &routes,
            tls(d, "checkout", &ca, "upstream_mode = \"strict\""),
        );
        let web = proxy(&routes, tls(d, "web", &ca, "upstream_mode = \"strict\""));
        let plain = proxy(&routes, String::new());
        // The allowed identity calls payment; everyone calls catalog.
        shout(&checkout.client(), "payment", "charge 10");
        shout(&web.client(), "catalog", "list");
        shout(&plain.client(), "catalog", "list");
        let (w, p) = (web.client(), plain.client());
        if mode == "enforce" {
            expect_status(
                w.call("payment", "Charge", b"x", T),
                status::PERMISSION_DENIED,
                "\"spiffe://example.org/svc/web\" may not call service \"payment\"",
            );
            expect_status(
                p.call("payment", "Charge", b"x", T),
                status::PERMISSION_DENIED,
                "a plaintext peer may not call",
            );
            wait_counter(&b, "denied", 2);
            assert_eq!(counter(&b, "would_deny"), 0);
        } else {
            shout(&w, "payment", "allowed but counted");
            shout(&p, "payment", "allowed but counted");
            wait_counter(&b, "would_deny", 2);
            assert_eq!(counter(&b, "denied"), 0);
            assert!(b.log_text().contains("would be denied (dry-run)"));
        }
    }
}

#[test]
fn bad_tls_configuration_is_refused_at_start() {
    let pki = pki(&["a", "b"]);
    let d = &pki.0;
    let base = String::from_utf8(
        Command::new(bin("meshshm-proxy"))
            .arg("--print-default-config")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let check = |extra: &str| {
        let f = d.join("cfg.toml");
        std::fs::write(&f, format!("{base}{extra}")).unwrap();
        Command::new(bin("meshshm-proxy"))
            .args(["--check-config", "--config"])
            .arg(&f)
            .output()
            .unwrap()
    };
    let ca = d.join("ca.pem");
    let out = check(&tls(d, "a", &ca, "mode = \"strict\""));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (extra, needle) in [
        ("\n[tls]\nmode = \"strict\"\n".to_owned(), "tls.cert"),
        (tls(d, "nobody", &ca, "mode = \"strict\""), "nobody.pem"),
        (
            format!(
                "\n[tls]\ncert = \"{0}/a.pem\"\nkey = \"{0}/b.key\"\nca = \"{1}\"\nmode = \"strict\"\n",
                d.display(),
                ca.display()
            ),
            "do not go together",
        ),
        (tls(d, "a", &ca, "mode = \"sometimes\""), "unknown variant"),
    ] {
        let out = check(&extra);
        assert_eq!(out.status.code(), Some(64), "{extra}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }
}

/// CPU time (user + system) of process `pid` so far.
fn cpu_of(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime), counted from after the name.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// The cost of mTLS on the proxy-to-proxy path: 1 KiB round trips, one in
/// flight, app → A (shm) → B (TCP) → B's echo, plaintext vs mutual TLS, in
/// one run, alternating rounds. Release mode:
/// `cargo build --release --workspace --bins && cargo test --release -p meshshm-tests --test mtls -- --ignored --nocapture mtls_cost`
#[test]
#[ignore = "measurement; run in release mode by hand"]
fn mtls_cost() {
    let pki = pki(&["a", "b"]);
    let d = &pki.0;
    let ca = d.join("ca.pem");
    // No spinning in the proxies: their CPU is then the work per request
    // (MTLS_COST_SPIN_US to change it).
    let spin = std::env::var("MTLS_COST_SPIN_US").unwrap_or_else(|_| "0".into());
    let start = |routes: &[(&str, String)], extra: String| {
        Proxy::start_with(ProxyOpts {
            routes: routes
                .iter()
                .map(|(s, u)| (s.to_string(), u.clone()))
                .collect(),
            extra,
            args: vec!["--spin-us".into(), spin.clone()],
            ..Default::default()
        })
    };
    let b_plain = start(&[("plain", "echo".into())], String::new());
    let b_tls = start(
        &[("tls", "echo".into())],
        tls(d, "b", &ca, "mode = \"strict\""),
    );
    let a = start(
        &[
            ("plain", format!("proxy:{}", b_plain.tcp)),
            ("tls", format!("proxy:{}", b_tls.tcp)),
        ],
        tls(
            d,
            "a",
            &ca,
            &format!("[tls.upstream.\"{}\"]\nmode = \"strict\"\n", b_tls.tcp),
        ),
    );
    let c = a.client();
    let body = vec![7u8; 1024];
    let rounds = 10;
    let per_round: usize = std::env::var("MTLS_COST_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    for svc in ["plain", "tls"] {
        for _ in 0..1000 {
            c.call(svc, "E", &body, T).unwrap();
        }
    }
    let mut lat: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut cpu = [Duration::ZERO; 2];
    let mut n = [0usize; 2];
    for r in 0..rounds {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let (svc, b) = if k == 0 {
                ("plain", &b_plain)
            } else {
                ("tls", &b_tls)
            };
            let c0 = cpu_of(a.pid()) + cpu_of(b.pid());
            for _ in 0..per_round {
                let t0 = Instant::now();
                let r = c.call(svc, "E", &body, T).unwrap();
                lat[k].push(t0.elapsed());
                assert_eq!(r.len(), 1024);
            }
            cpu[k] += cpu_of(a.pid()) + cpu_of(b.pid()) - c0;
            n[k] += per_round;
        }
    }
    let mut report = String::new();
    for (k, name) in ["plaintext", "mutual TLS"].into_iter().enumerate() {
        lat[k].sort();
        let p = |q: f64| lat[k][((lat[k].len() as f64 * q) as usize).min(lat[k].len() - 1)];
        report.push_str(&format!(
            "{name:>10}: p50 {:>7.1} µs  p99 {:>7.1} µs  proxies' CPU {:>6.1} µs/request  ({} requests)\n",
            p(0.5).as_secs_f64() * 1e6,
            p(0.99).as_secs_f64() * 1e6,
            cpu[k].as_secs_f64() * 1e6 / n[k] as f64,
            n[k]
        ));
    }
    let ratio = |a: f64, b: f64| if a > 0.0 { b / a } else { f64::NAN };
    report.push_str(&format!(
        "TLS/plaintext: p50 {:.2}x, CPU {:.2}x\n",
        ratio(
            lat[0][lat[0].len() / 2].as_secs_f64(),
            lat[1][lat[1].len() / 2].as_secs_f64()
        ),
        ratio(cpu[0].as_secs_f64(), cpu[1].as_secs_f64())
    ));
    println!("mTLS cost, 1 KiB, 1 in flight, app → A (shm) → B (TCP) → echo:\n{report}");
}
