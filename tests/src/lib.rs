//! Helpers for the multi-process tests: start the real `meshshm-proxy`
//! binary on a private socket and TCP port, wait until it is ready, and
//! stop (or kill) it. Everything a test starts is stopped when its handle
//! drops, so a failing test leaves no process behind.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Path of a binary built by this workspace (`meshshm-proxy`, `meshshm`, ...).
pub fn bin(name: &str) -> PathBuf {
    // Integration tests run from target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built; run `cargo build --workspace --bins` (the test command does)",
        p.display()
    );
    p
}

/// A private directory under /tmp, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "meshshm-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running proxy.
pub struct Proxy {
    pub child: Child,
    pub socket: PathBuf,
    pub tcp: SocketAddr,
    pub dir: TempDir,
    pub log: PathBuf,
}

/// Options for [`Proxy::start_with`].
#[derive(Default, Clone)]
pub struct ProxyOpts {
    /// extra config text appended to a minimal config (sections such as `[routes]` entries)
    pub routes: Vec<(String, String)>,
    /// extra command-line arguments
    pub args: Vec<String>,
    /// reuse this socket path (to restart a proxy in place)
    pub socket: Option<PathBuf>,
    /// config text appended after the routes (whole sections, such as `[tls]`)
    pub extra: String,
    /// (old, new) replacements in the default config's text (to change one
    /// of its settings, e.g. `("max_in_flight = 4096", "max_in_flight = 4")`)
    pub replace: Vec<(String, String)>,
}

impl Proxy {
    /// Start a proxy with the default config on a private socket and a free port.
    pub fn start() -> Proxy {
        Proxy::start_with(ProxyOpts::default())
    }

    pub fn start_with(o: ProxyOpts) -> Proxy {
        let dir = TempDir::new("proxy");
        let socket = o.socket.clone().unwrap_or_else(|| dir.0.join("proxy.sock"));
        let mut cfg = meshshm_proxy_default_config();
        for (old, new) in &o.replace {
            assert!(cfg.contains(old.as_str()), "default config has no {old:?}");
            cfg = cfg.replace(old.as_str(), new);
        }
        for (svc, up) in &o.routes {
            cfg.push_str(&format!("{svc} = \"{up}\"\n"));
        }
        cfg.push_str(&o.extra);
        let cfg_path = dir.0.join("proxy.toml");
        std::fs::write(&cfg_path, cfg).expect("write config");
        let log = dir.0.join("proxy.log");
        let mut child = Command::new(bin("meshshm-proxy"))
            .arg("--config")
            .arg(&cfg_path)
            .arg("--socket")
            .arg(&socket)
            .arg("--tcp")
            .arg("127.0.0.1:0")
            .args(&o.args)
            .args(waiter_args(&o.args))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start meshshm-proxy");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                panic!(
                    "proxy not ready; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        let tcp = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("tcp="))
            .and_then(|a| a.parse().ok())
            .expect("ready line names the tcp address");
        Proxy {
            child,
            socket,
            tcp,
            dir,
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL the proxy and reap it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (bounded) for a clean exit; returns the exit status success.
    pub fn terminate(&mut self) -> bool {
        signal(self.pid(), libc::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        false
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A shm client of this proxy.
    pub fn client(&self) -> meshshm::Client {
        meshshm::Client::connect(Some(&self.socket)).expect("connect over shm")
    }

    /// A TCP client of this proxy.
    pub fn tcp_client(&self) -> meshshm::Client {
        meshshm::Client::with_options(meshshm::ClientOptions {
            transport: meshshm::Transport::Tcp(self.tcp),
            ..Default::default()
        })
        .expect("connect over tcp")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// A child process killed and reaped on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proxy {
    /// Start `meshshm serve SERVICE ARGS...` (a server app in another
    /// process) against this proxy and wait until calls to it are answered.
    pub fn serve_cli(&self, service: &str, args: &[&str]) -> KillOnDrop {
        let child = Command::new(bin("meshshm"))
            .arg("--socket")
            .arg(&self.socket)
            .args(["serve", service])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start meshshm serve");
        let guard = KillOnDrop(child);
        let c = self.client();
        let t = Duration::from_secs(10);
        assert!(
            eventually(t, || c.call(service, "probe", b"", t).is_ok()),
            "server for {service} never answered"
        );
        guard
    }
}

/// `--waiter W` for a proxy started by a test when `MESHSHM_TEST_WAITER=W`
/// is set (and the test does not choose a waiter itself): runs the whole
/// suite with one waiter, e.g. `MESHSHM_TEST_WAITER=epoll cargo test -p
/// meshshm-tests` (the default is the proxy's, `auto`).
pub fn waiter_args(args: &[String]) -> Vec<String> {
    match std::env::var("MESHSHM_TEST_WAITER") {
        Ok(w) if !w.is_empty() && !args.iter().any(|a| a == "--waiter") => {
            vec!["--waiter".into(), w]
        }
        _ => Vec::new(),
    }
}

/// Send a signal (via the `kill` command, keeping this crate free of unsafe).
pub fn signal(pid: i32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// The embedded default config of the proxy, minus the TCP listener line
/// (tests pass --tcp), so tests can append routes.
fn meshshm_proxy_default_config() -> String {
    let out = Command::new(bin("meshshm-proxy"))
        .arg("--print-default-config")
        .output()
        .expect("meshshm-proxy --print-default-config");
    String::from_utf8(out.stdout).expect("utf-8 config")
}

/// Files in /dev/shm that meshshm made (named segments).
pub fn shm_leftovers() -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("meshshm"))
                .collect()
        })
        .unwrap_or_default()
}

/// Named segments in /dev/shm created by process `pid` (`meshshm-<pid>-*`).
pub fn shm_leftovers_of(pid: i32) -> Vec<String> {
    let prefix = format!("meshshm-{pid}-");
    shm_leftovers()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// FNV-1a, for checksumming bodies in tests.
pub fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// A deterministic body of `len` bytes for seed `seed`.
pub fn body(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Poll `f` until it returns true or `t` passes.
pub fn eventually(t: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < t {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}
