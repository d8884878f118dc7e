//! What the reliability tests (faults, hostile, security, soak) share:
//! one test at a time, a watchdog per test, the proxy started with config
//! changes (or as another uid), helper processes that die with the test,
//! and the checks every test ends with: no process left behind, nothing of
//! meshshm left in /dev/shm.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use meshshm_tests::*;

static SERIAL: Mutex<()> = Mutex::new(());
/// Pids of the processes the running test started (for the watchdog).
static PIDS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

fn pids() -> MutexGuard<'static, Vec<i32>> {
    PIDS.lock().unwrap_or_else(|p| p.into_inner())
}

/// One reliability test: holds the lock that runs them one at a time (their
/// timings must not share two cores with another test's load), arms a
/// watchdog, and on drop checks what every test must leave behind.
pub struct Test {
    name: String,
    stop: mpsc::Sender<()>,
    proxies: Vec<i32>,
    _serial: MutexGuard<'static, ()>,
}

/// Start test `name`; if it runs past `limit`, the watchdog kills every
/// process it started and fails the run (a hang fails, it does not block).
pub fn begin(name: &str, limit: Duration) -> Test {
    let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    pids().clear();
    let (stop, rx) = mpsc::channel::<()>();
    let n = name.to_owned();
    std::thread::spawn(move || {
        if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("WATCHDOG: {n} still running after {limit:?}: killing its processes");
            for &pid in pids().iter() {
                if parent_of(pid) == Some(std::process::id() as i32) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            std::process::exit(101);
        }
    });
    Test {
        name: name.to_owned(),
        stop,
        proxies: Vec::new(),
        _serial: serial,
    }
}

impl Test {
    /// Remember a proxy's pid, to check its named segments at the end.
    pub fn proxy_started(&mut self, pid: i32) {
        self.proxies.push(pid);
    }
}

impl Drop for Test {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if std::thread::panicking() {
            return;
        }
        let me = std::process::id() as i32;
        let left = || children_of(me);
        assert!(
            eventually(Duration::from_secs(5), || left().is_empty()),
            "{}: processes left behind: {:?}",
            self.name,
            left()
        );
        for &p in &self.proxies {
            assert!(
                shm_leftovers_of(p).is_empty(),
                "{}: left in /dev/shm: {:?}",
                self.name,
                shm_leftovers_of(p)
            );
        }
    }
}

fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces; split after ')'.
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(String::from).collect())
}

fn parent_of(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// Processes (zombies included) whose parent is `pid`, with their names.
pub fn children_of(pid: i32) -> Vec<(i32, String)> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| parent_of(p) == Some(pid))
        .map(|p| {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            (p, comm.trim().to_owned())
        })
        .collect()
}

/// Whether the tests run as root (needed to act as another uid).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

// ---- the proxy --------------------------------------------------------

/// How to start a proxy: config values to change, TOML to append, and more.
#[derive(Default, Clone)]
pub struct ProxyCfg {
    /// `key = value` lines of the default config to replace (the value is
    /// TOML text, e.g. `"64"` or `"\"/dev/shm\""`).
    pub set: Vec<(&'static str, String)>,
    /// TOML appended at the end (after `[routes]`).
    pub append: String,
    /// Extra command-line arguments.
    pub args: Vec<String>,
    /// Reuse this socket path (restart in place).
    pub socket: Option<PathBuf>,
    /// Run the proxy as this uid (and gid) through `setpriv` (root only).
    pub run_as: Option<u32>,
    /// No TCP listener.
    pub no_tcp: bool,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

impl ProxyCfg {
    pub fn set(mut self, key: &'static str, value: impl ToString) -> Self {
        self.set.push((key, value.to_string()));
        self
    }
    pub fn route(mut self, service: &str, upstream: &str) -> Self {
        self.append
            .push_str(&format!("{service} = \"{upstream}\"\n"));
        self
    }
}

/// Start the real proxy binary; the test remembers it.
pub fn proxy(t: &mut Test, c: ProxyCfg) -> Proxy {
    let dir = TempDir::new("rel");
    let socket = c.socket.clone().unwrap_or_else(|| dir.0.join("proxy.sock"));
    let out = Command::new(bin("meshshm-proxy"))
        .arg("--print-default-config")
        .output()
        .expect("meshshm-proxy --print-default-config");
    let mut text = String::from_utf8(out.stdout).expect("utf-8");
    let mut set = c.set.clone();
    // Tests read /proc/<proxy>/fd and maps, which a non-dumpable process
    // hides from a non-root test; the security tests turn it back on.
    if !set.iter().any(|(k, _)| *k == "non_dumpable") {
        set.push(("non_dumpable", "false".into()));
    }
    for (k, v) in &set {
        let prefix = format!("{k} =");
        let mut found = false;
        text = text
            .lines()
            .map(|l| {
                if !found && l.starts_with(&prefix) {
                    found = true;
                    format!("{k} = {v}")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(found, "no `{k} =` line in the default config");
        text.push('\n');
    }
    text.push_str(&c.append);
    let cfg = dir.0.join("proxy.toml");
    std::fs::write(&cfg, text).expect("write config");
    let log = dir.0.join("proxy.log");
    let mut cmd = match c.run_as {
        Some(uid) => {
            let mut cmd = Command::new("setpriv");
            cmd.args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
            ])
            .arg(bin("meshshm-proxy"));
            cmd
        }
        None => Command::new(bin("meshshm-proxy")),
    };
    cmd.arg("--config")
        .arg(&cfg)
        .arg("--socket")
        .arg(&socket)
        .arg("--tcp")
        .arg(if c.no_tcp { "off" } else { "127.0.0.1:0" })
        .args(&c.args)
        .args(meshshm_tests::waiter_args(&c.args))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .envs(c.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log file"));
    let mut child = cmd.spawn().expect("start meshshm-proxy");
    pids().push(child.id() as i32);
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    let line = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(l) => l,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "proxy not ready; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        }
    };
    let tcp = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tcp="))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| "0.0.0.0:0".parse().expect("addr"));
    t.proxy_started(child.id() as i32);
    Proxy {
        child,
        socket,
        tcp,
        dir,
        log,
    }
}

/// The proxy's log without terminal colour codes.
pub fn log(p: &Proxy) -> String {
    let raw = p.log_text();
    let mut out = String::with_capacity(raw.len());
    let mut esc = false;
    for ch in raw.chars() {
        match (esc, ch) {
            (false, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

/// Log lines containing every one of `needles`.
pub fn log_lines(p: &Proxy, needles: &[&str]) -> Vec<String> {
    log(p)
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(String::from)
        .collect()
}

/// When the proxy logged that the session of app `pid` closed (from the
/// log line's own timestamp), with the line.
pub fn session_closed(p: &Proxy, pid: i32) -> Option<(SystemTime, String)> {
    let pid_field = format!(" pid={pid} ");
    log(p)
        .lines()
        .find(|l| l.contains("shm session closed") && l.contains(&pid_field))
        .and_then(|l| Some((log_time(l)?, l.to_owned())))
}

/// The timestamp at the start of a log line (`2026-01-02T03:04:05.123456Z`).
pub fn log_time(line: &str) -> Option<SystemTime> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, dd) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>());
    let (h, mi, s) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let mut f = frac.to_owned();
    f.truncate(9);
    while f.len() < 9 {
        f.push('0');
    }
    let nanos: u32 = f.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
    let yy = if m <= 2 { y - 1 } else { y };
    let era = if yy >= 0 { yy } else { yy - 399 } / 400;
    let yoe = yy - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + s;
    Some(UNIX_EPOCH + Duration::new(u64::try_from(secs).ok()?, nanos))
}

pub fn unix_us(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros())
}

/// Resident memory of `pid` in KiB.
pub fn rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Open fds of `pid`.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(usize::MAX)
}

/// Segment mappings in proxy `pid`: memfds named "meshshm", or files
/// `meshshm-<pid>-N` (named segments).
pub fn segment_maps(pid: i32) -> usize {
    let named = format!("/meshshm-{pid}-");
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|m| {
            m.lines()
                .filter(|l| l.contains("/memfd:meshshm") || l.contains(&named))
                .count()
        })
        .unwrap_or(usize::MAX)
}

/// Wait until the proxy's fd count and segment mappings are back at the
/// given baseline (sessions ended, everything freed).
/// The proxy's fd count and segment mappings once they have stopped
/// moving (the same over 5 reads 50 ms apart; at most 5 s): a baseline
/// taken while another app's session is still being set up would be low.
pub fn settled_baseline(p: &Proxy) -> (usize, usize) {
    let t0 = std::time::Instant::now();
    let read = || (fd_count(p.pid()), segment_maps(p.pid()));
    let mut last = read();
    let mut same = 0;
    while same < 5 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
        let now = read();
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

pub fn back_to(p: &Proxy, fds: usize, maps: usize) -> bool {
    eventually(Duration::from_secs(10), || {
        fd_count(p.pid()) <= fds && segment_maps(p.pid()) <= maps
    })
}

// ---- helper processes -------------------------------------------------

/// A helper process (meshshm-rogue, meshshm-work) started by the running
/// test: its stdout lines are collected; dropped, it is killed and reaped.
pub struct Proc {
    pub child: Child,
    stdin: Option<ChildStdin>,
    rx: Mutex<Receiver<String>>,
    lines: Arc<Mutex<Vec<String>>>,
    name: String,
}

pub fn spawn(name: &str, args: &[&str]) -> Proc {
    spawn_args(name, args.iter().map(|s| s.to_string()).collect())
}

pub fn spawn_args(name: &str, args: Vec<String>) -> Proc {
    let mut child = Command::new(bin(name))
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    pids().push(child.id() as i32);
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                lines
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(l.clone());
                let _ = tx.send(l);
            }
        });
    }
    {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                lines
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("stderr: {l}"));
            }
        });
    }
    Proc {
        stdin: child.stdin.take(),
        child,
        rx: Mutex::new(rx),
        lines,
        name: format!("{name} {}", args.first().map_or("", |s| s.as_str())),
    }
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The next stdout line starting with `prefix` (earlier ones skipped).
    pub fn wait_line(&self, prefix: &str, t: Duration) -> String {
        let t0 = Instant::now();
        loop {
            let left = t.saturating_sub(t0.elapsed());
            match self.next_line(left) {
                Some(l) if l.starts_with(prefix) => return l,
                Some(l) if l.starts_with("error=") => {
                    panic!("{}: {l}\n{}", self.name, self.output())
                }
                Some(_) => {}
                None => panic!(
                    "{}: no line starting with {prefix:?} within {t:?}; output:\n{}",
                    self.name,
                    self.output()
                ),
            }
        }
    }

    /// Its next stdout line, if one comes within `t`.
    pub fn next_line(&self, t: Duration) -> Option<String> {
        self.rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recv_timeout(t)
            .ok()
    }

    /// Its stdin, to write to from elsewhere.
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.stdin.take()
    }

    /// Everything it printed so far (stdout, and stderr lines prefixed).
    pub fn output(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    pub fn write_stdin(&mut self, s: &str) {
        if let Some(i) = &mut self.stdin {
            let _ = i.write_all(s.as_bytes());
        }
    }

    /// Close its stdin (the "stop" signal of the load helpers), wait for it
    /// to exit (killed after `t`), and return its output.
    pub fn finish(mut self, t: Duration) -> String {
        self.stdin = None;
        let t0 = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                _ if t0.elapsed() > t => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!(
                        "{} did not finish within {t:?}:\n{}",
                        self.name,
                        self.output()
                    );
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        // Let the reader threads take the last lines.
        std::thread::sleep(Duration::from_millis(50));
        self.output()
    }

    /// Wait for it to exit by itself; its output.
    pub fn wait_exit(self, t: Duration) -> String {
        let mut me = self;
        let t0 = Instant::now();
        while t0.elapsed() < t {
            if let Ok(Some(_)) = me.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                return me.output();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{} still running after {t:?}:\n{}", me.name, me.output());
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key=value` from a line of `k=v` words.
pub fn field<T: std::str::FromStr>(line: &str, key: &str) -> T {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// The `calls=...` summary line of a `meshshm-work load`.
pub struct LoadReport {
    pub calls: u64,
    pub ok: u64,
    pub failed: u64,
    pub mismatched: u64,
    pub bytes: u64,
    pub line: String,
    pub threads: Vec<String>,
}

pub fn load_report(out: &str) -> LoadReport {
    let line = out
        .lines()
        .find(|l| l.starts_with("calls="))
        .unwrap_or_else(|| panic!("no summary in:\n{out}"))
        .to_owned();
    LoadReport {
        calls: field(&line, "calls"),
        ok: field(&line, "ok"),
        failed: field(&line, "failed"),
        mismatched: field(&line, "mismatched"),
        bytes: field(&line, "bytes"),
        threads: out
            .lines()
            .filter(|l| l.starts_with("thread="))
            .map(String::from)
            .collect(),
        line,
    }
}

/// Start `meshshm-work load` against `socket` until its stdin closes.
pub fn load(socket: &Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "load".to_owned(),
        "--socket".into(),
        socket.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let p = spawn_args("meshshm-work", args);
    p.wait_line("ready", Duration::from_secs(20));
    p
}
