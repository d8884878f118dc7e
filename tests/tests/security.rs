//! Security (issue 6): segments and doorbells reach only the process that
//! connected; the control socket's mode, owner and allowed uids; access
//! rules per uid; responses never cross connections.
//!
//! The tests that act as another user need root (to switch uid); run as
//! another user they print why they skip.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use meshshm::{Client, Server};
use meshshm_ring::{Backing, Segment, SegmentOptions};
use support::*;

const T: Duration = Duration::from_secs(20);
/// The attackers' uids: `nobody`, and one more with no name.
const NOBODY: u32 = 65534;
const OTHER: u32 = 65533;

fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    println!("SKIPPED {test}: needs root to run the attacker as another uid");
    true
}

fn skip_unless_setpriv(test: &str) -> bool {
    let ok = std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("SKIPPED {test}: needs setpriv (util-linux) to run the proxy as another uid");
    }
    !ok
}

/// Run `meshshm-rogue attack` as `uid` with these arguments; its report.
fn attack(uid: u32, args: &[String]) -> String {
    let mut a = vec!["attack".to_owned(), "--as-uid".into(), uid.to_string()];
    a.extend(args.iter().cloned());
    let out = spawn_args("meshshm-rogue", a).wait_exit(T);
    assert!(
        out.contains(&format!("uid={uid}")),
        "attacker did not switch uid:\n{out}"
    );
    out
}

fn line<'a>(out: &'a str, start: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("no {start:?} in:\n{out}"))
}

fn denied(out: &str, start: &str) {
    let l = line(out, start);
    assert!(l.contains(" denied"), "an attacker got through: {l}\n{out}");
}

fn a_private_dir(tag: &str) -> TempDir {
    let d = TempDir::new(tag);
    std::fs::set_permissions(&d.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    d
}

#[test]
fn another_uid_cannot_reach_segments_doorbells_or_the_socket() {
    if skip_unless_root("another_uid_cannot_reach_segments") {
        return;
    }
    let mut t = begin("another_uid", Duration::from_secs(90));
    // Only uids keep the attacker out here (the proxy stays dumpable).
    let p = proxy(&mut t, ProxyCfg::default());
    let c = p.client();
    assert_eq!(c.call("echo", "E", b"live", T).unwrap(), b"live");
    // The proxy maps the session's memfd segment and holds its eventfd
    // doorbells; their owner can reach both through /proc (the control:
    // what the attacker is denied exists).
    let links = |dir: String| -> Vec<(std::path::PathBuf, String)> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter_map(|e| {
                Some((
                    e.path(),
                    std::fs::read_link(e.path()).ok()?.display().to_string(),
                ))
            })
            .collect()
    };
    let seg_map = links(format!("/proc/{}/map_files", p.pid()))
        .into_iter()
        .find(|(_, l)| l.contains("memfd:meshshm"))
        .expect("the proxy maps a memfd segment");
    std::fs::File::open(&seg_map.0).expect("the owner opens the segment");
    let bells = links(format!("/proc/{}/fd", p.pid()))
        .into_iter()
        .filter(|(_, l)| l.contains("eventfd"))
        .count();
    assert!(bells >= 2, "doorbells of the session");
    // A named segment (the /dev/shm backing) is created 0600.
    let dir = a_private_dir("seg");
    let seg = Segment::create(&SegmentOptions {
        backing: Backing::Dir(dir.0.clone()),
        ..SegmentOptions::default()
    })
    .unwrap();
    let path = seg.path().expect("named").to_owned();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", path.display());
    let me = std::process::id().to_string();
    for uid in [NOBODY, OTHER] {
        let out = attack(
            uid,
            &[
                "--socket".into(),
                p.socket.display().to_string(),
                "--pids".into(),
                format!("{},{me}", p.pid()),
                "--files".into(),
                path.display().to_string(),
            ],
        );
        println!("as uid {uid}:\n{out}");
        denied(&out, "socket");
        for pid in [p.pid().to_string(), me.clone()] {
            denied(&out, &format!("list /proc/{pid}/fd"));
            denied(&out, &format!("open /proc/{pid}/fd/*"));
            denied(&out, &format!("list /proc/{pid}/map_files"));
            denied(&out, &format!("open /proc/{pid}/mem"));
        }
        denied(&out, &format!("open {}", path.display()));
        denied(&out, &format!("read {}", path.display()));
    }
    drop(seg);
}

#[test]
fn a_non_dumpable_proxy_hides_its_segments_from_its_own_uid() {
    if skip_unless_root("non_dumpable") || skip_unless_setpriv("non_dumpable") {
        return;
    }
    let mut t = begin("non_dumpable", Duration::from_secs(90));
    let mut found = Vec::new();
    for non_dumpable in [true, false] {
        let dir = a_private_dir("sock");
        let p = proxy(
            &mut t,
            ProxyCfg {
                run_as: Some(NOBODY),
                socket: Some(dir.0.join("proxy.sock")),
                ..ProxyCfg::default().set("non_dumpable", non_dumpable)
            },
        );
        let c = p.client();
        assert_eq!(c.call("echo", "E", b"live", T).unwrap(), b"live");
        // The attacker runs as the proxy's own uid.
        let out = attack(NOBODY, &["--pids".into(), p.pid().to_string()]);
        println!("proxy non_dumpable={non_dumpable}, attacker of the same uid:\n{out}");
        found.push(out);
        drop(c);
        drop(p);
        drop(dir);
    }
    let pid_of = |out: &str| -> String {
        line(out, "list /proc/")
            .trim_start_matches("list /proc/")
            .split('/')
            .next()
            .unwrap()
            .to_owned()
    };
    let (hardened, plain) = (&found[0], &found[1]);
    let hp = pid_of(hardened);
    denied(hardened, &format!("list /proc/{hp}/fd"));
    denied(hardened, &format!("open /proc/{hp}/fd/*"));
    denied(hardened, &format!("open /proc/{hp}/mem"));
    // The control: the same attack on a dumpable proxy of that uid works,
    // so the setting is what stops it.
    let pp = pid_of(plain);
    let l = line(plain, &format!("open /proc/{pp}/fd/*"));
    assert!(l.contains(" ok"), "{plain}");
}

#[test]
fn control_socket_mode_owner_allowed_uids_and_access_rules() {
    // Without root: the config checks only.
    let dir = TempDir::new("cfg");
    let cfg = dir.0.join("bad.toml");
    let text = String::from_utf8(
        std::process::Command::new(bin("meshshm-proxy"))
            .arg("--print-default-config")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .replace("allowed_uids = []", "allowed_uids = [1000]");
    std::fs::write(&cfg, text).unwrap();
    let out = std::process::Command::new(bin("meshshm-proxy"))
        .arg("--config")
        .arg(&cfg)
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "allowed_uids with TCP on must be refused"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("allowed_uids"));
    if skip_unless_root("control_socket_owner") {
        return;
    }
    let mut t = begin("control_socket", Duration::from_secs(120));
    // Mode 0660, owned by nobody:nogroup: nobody may connect, others not.
    let p = proxy(
        &mut t,
        ProxyCfg {
            no_tcp: true,
            ..ProxyCfg::default()
                .set("socket_mode", "0o660")
                .set("socket_owner", format!("\"{NOBODY}\""))
                .set("socket_group", format!("\"{NOBODY}\""))
        },
    );
    let md = std::fs::metadata(&p.socket).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o777),
        (NOBODY, NOBODY, 0o660)
    );
    let sock = p.socket.display().to_string();
    let out = attack(NOBODY, &["--socket".into(), sock.clone()]);
    assert!(line(&out, "socket").contains(" ok"), "{out}");
    let out = attack(OTHER, &["--socket".into(), sock]);
    denied(&out, "socket");
    // The proxy recorded who connected.
    assert!(
        !log_lines(&p, &["shm session up", "uid=65534", "gid=65534", " pid="]).is_empty(),
        "{}",
        log(&p)
    );
    drop(p);

    // allowed_uids: the socket is open to all, the proxy lets in only root.
    let p = proxy(
        &mut t,
        ProxyCfg {
            no_tcp: true,
            ..ProxyCfg::default()
                .set("socket_mode", "0o666")
                .set("allowed_uids", "[0]")
        },
    );
    let out = attack(NOBODY, &["--socket".into(), p.socket.display().to_string()]);
    let l = line(&out, "socket");
    assert!(
        l.contains("denied") && l.contains("uid 65534 may not connect"),
        "{out}"
    );
    assert_eq!(p.client().call("echo", "E", b"root", T).unwrap(), b"root");
    assert!(!log_lines(&p, &["access refused", "uid=65534"]).is_empty());
    drop(p);

    // Access rules: nobody may call echo only, and serve nothing.
    let mut c = ProxyCfg::default()
        .set("socket_mode", "0o666")
        .route("secret", "echo");
    c.append.push_str(&format!(
        "[access.call]\n\"{NOBODY}\" = [\"echo\"]\n[access.serve]\n\"{NOBODY}\" = []\n"
    ));
    let p = proxy(&mut t, c);
    let out = attack(
        NOBODY,
        &[
            "--socket".into(),
            p.socket.display().to_string(),
            "--call".into(),
            "echo,secret".into(),
            "--serve".into(),
            "payments".into(),
        ],
    );
    println!("{out}");
    assert!(line(&out, "call echo").contains(" ok"), "{out}");
    assert!(line(&out, "call secret").contains("status=7"), "{out}");
    let l = line(&out, "serve payments");
    assert!(l.contains("denied") && l.contains("may not serve"), "{out}");
    // Root has no entry: anything goes.
    let root = p.client();
    assert_eq!(root.call("secret", "S", b"s", T).unwrap(), b"s");
    drop(Server::bind(Some(&p.socket), "payments").unwrap());
}

#[test]
fn responses_never_reach_another_connection_even_when_stream_ids_collide() {
    let mut t = begin("isolation", Duration::from_secs(120));
    let p = proxy(&mut t, ProxyCfg::default());
    let sock = p.socket.display().to_string();
    // Two server apps for one service: an honest one (answering after
    // 20 ms, and telling us the stream id of each request it gets), and
    // one that answers its own requests but also forges answers to the
    // honest one's stream ids, relayed to it as they come.
    let honest = spawn(
        "meshshm-work",
        &[
            "serve-echo",
            "--socket",
            &sock,
            "--service",
            "iso",
            "--delay-ms",
            "20",
            "--print-ids",
        ],
    );
    honest.wait_line("ready", T);
    let mut forger = spawn(
        "meshshm-rogue",
        &["serve-forge", "--socket", &sock, "--service", "iso"],
    );
    forger.wait_line("ready", T);
    let mut relay_to = forger.take_stdin().expect("stdin");
    let relaying = std::sync::atomic::AtomicBool::new(true);
    // A client that cancels stream ids it never used, all along.
    let storm = spawn(
        "meshshm-rogue",
        &["cancel-storm", "--socket", &sock, "--secs", "4"],
    );
    storm.wait_line("ready", T);
    // Clients in other processes, and four here: every connection numbers
    // its streams from 1, so their ids collide all the time.
    let others: Vec<Proc> = (0..2)
        .map(|_| {
            load(
                &p.socket,
                &[
                    "--threads",
                    "3",
                    "--services",
                    "iso,echo",
                    "--sizes",
                    "16,3000,70000",
                    "--secs",
                    "3",
                ],
            )
        })
        .collect();
    let clients: Vec<Client> = (0..4).map(|_| p.client()).collect();
    let end = Instant::now() + Duration::from_secs(3);
    let mut total = 0u64;
    let mut relayed = 0u64;
    std::thread::scope(|s| {
        let relay = s.spawn(|| {
            use std::io::Write;
            let mut n = 0u64;
            while relaying.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(l) = honest.next_line(Duration::from_millis(20)) {
                    if l.starts_with("id ") && writeln!(relay_to, "{l}").is_ok() {
                        n += 1;
                    }
                }
            }
            n
        });
        let hs: Vec<_> = clients
            .iter()
            .enumerate()
            .flat_map(|(ci, c)| {
                (0..2).map(move |th| {
                    s.spawn(move || {
                        let mut n = 0u64;
                        while Instant::now() < end {
                            let svc = if n % 2 == 0 { "iso" } else { "echo" };
                            let mut b = body(n, 100 + (n as usize * 37) % 5000);
                            b[..8].copy_from_slice(&((ci * 2 + th) as u64).to_le_bytes());
                            let r = c.call(svc, "Iso", &b, T).unwrap_or_else(|e| {
                                panic!("client {ci}.{th} call {n} to {svc}: {e}")
                            });
                            assert!(r == b, "client {ci}.{th} got another's response");
                            n += 1;
                        }
                        n
                    })
                })
            })
            .collect();
        for h in hs {
            total += h.join().unwrap();
        }
        relaying.store(false, std::sync::atomic::Ordering::Relaxed);
        relayed = relay.join().unwrap();
    });
    for o in others {
        let r = load_report(&o.wait_exit(T));
        assert!(r.ok > 0 && r.failed == 0 && r.mismatched == 0, "{}", r.line);
        total += r.ok;
    }
    let out = storm.wait_exit(T);
    let cancels: u64 = field(line(&out, "cancels="), "cancels");
    drop(clients);
    let forged = forger
        .output()
        .lines()
        .rev()
        .find(|l| l.starts_with("answered="))
        .map_or(0, |l| field::<u64>(l, "forged"));
    drop(honest);
    drop(forger);
    println!(
        "{total} calls, none misrouted; {relayed} foreign ids relayed, {forged} forged answers \
         and {cancels} foreign cancels ignored"
    );
    assert!(cancels > 0 && forged > 0 && total > 100);
}

/// `listen.max_sessions_per_uid`: a uid at its limit is refused with a
/// reason, gets a session again once it closes one, and (as root) another
/// uid still gets in meanwhile.
#[test]
fn a_uid_at_its_session_limit_is_refused_and_others_are_not() {
    let mut t = begin("per_uid_limit", Duration::from_secs(60));
    let p = proxy(
        &mut t,
        ProxyCfg::default()
            .set("max_sessions_per_uid", "2")
            .set("socket_mode", "0o666"),
    );
    let a = p.client();
    let b = p.client();
    for c in [&a, &b] {
        assert_eq!(c.call("echo", "E", b"in", T).unwrap(), b"in");
    }
    let uid = nix::unistd::getuid().as_raw();
    match Client::connect(Some(&p.socket)) {
        Err(meshshm::Error::Rejected(r)) => assert!(
            r.contains(&format!("uid {uid} has reached its limit of 2 sessions")),
            "{r}"
        ),
        Ok(_) => panic!("a third session of uid {uid} was let in"),
        Err(e) => panic!("expected a rejection, got {e}"),
    }
    assert!(!log_lines(&p, &["session limit; refusing"]).is_empty());
    // The two sessions are unaffected; closing one makes room.
    assert_eq!(a.call("echo", "E", b"still", T).unwrap(), b"still");
    drop(b);
    let again = eventually(T, || Client::connect(Some(&p.socket)).is_ok());
    assert!(again, "no room after a session closed");
    if skip_unless_root("per_uid_limit_other_uid") {
        return;
    }
    // Another uid has a share of its own.
    let out = attack(NOBODY, &["--socket".into(), p.socket.display().to_string()]);
    assert!(line(&out, "socket").contains(" ok"), "{out}");
}
