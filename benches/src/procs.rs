//! The processes the benchmark starts (proxies, echo servers), and how it
//! makes sure none outlives it: every child is registered the moment it is
//! spawned; a normal exit stops them one by one (SIGTERM, then SIGKILL);
//! SIGINT/SIGTERM/SIGHUP to the benchmark are taken by a thread of their own
//! (`sigwait`) that stops every registered child and removes the private
//! directory before exiting; and each child asks the kernel for SIGTERM
//! when the benchmark dies however it dies (`PR_SET_PDEATHSIG`; our own
//! children also exit when their stdin, a pipe from us, closes). Children
//! run in their own process group, so a Ctrl-C reaches only the benchmark,
//! which then stops them in order.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::prctl;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getppid, Pid};

struct Registry {
    pids: Vec<i32>,
    dirs: Vec<PathBuf>,
    closed: bool,
}

static REG: Mutex<Registry> = Mutex::new(Registry {
    pids: Vec::new(),
    dirs: Vec::new(),
    closed: false,
});

fn reg() -> std::sync::MutexGuard<'static, Registry> {
    REG.lock().unwrap_or_else(|p| p.into_inner())
}

/// Block SIGINT, SIGTERM and SIGHUP in this thread (and so in every thread
/// started after it) and take them in a dedicated thread that cleans up and
/// exits. Call first thing in `main`, before any other thread exists.
pub fn install_signal_thread() {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    if set.thread_block().is_err() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                eprintln!("\nmeshshm-bench: {sig}: stopping the processes it started");
                cleanup();
                std::process::exit(128 + sig as i32);
            }
        });
}

/// Stop every registered child and remove every registered directory.
/// After this, no new child can be spawned.
pub fn cleanup() {
    let (pids, dirs) = {
        let mut r = reg();
        r.closed = true;
        (std::mem::take(&mut r.pids), std::mem::take(&mut r.dirs))
    };
    for pid in pids {
        terminate(pid, Duration::from_secs(3));
    }
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL; reaps the child.
fn terminate(pid: i32, grace: Duration) {
    let p = Pid::from_raw(pid);
    if kill(p, Signal::SIGTERM).is_err() {
        let _ = waitpid(p, Some(WaitPidFlag::WNOHANG));
        return;
    }
    let t0 = Instant::now();
    while t0.elapsed() < grace {
        match waitpid(p, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(5)),
            _ => return,
        }
    }
    let _ = kill(p, Signal::SIGKILL);
    let _ = waitpid(p, None);
}

/// A private directory for sockets and logs, removed on drop (and by
/// [`cleanup`] on a signal).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> Result<TempDir, String> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let path = base.join(format!("meshshm-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700));
        reg().dirs.push(path.clone());
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        reg().dirs.retain(|d| d != &self.path);
    }
}

/// A server process: started, ready, and stopped on drop.
pub struct ServerProc {
    child: Child,
    name: String,
    log: PathBuf,
    _stdin: Option<ChildStdin>,
}

impl ServerProc {
    /// Spawn `cmd` (stdout piped, stderr to `log`, its own process group)
    /// and wait for a stdout line starting with `ready`. Returns the process
    /// and that line.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log: PathBuf,
        ready: &str,
        timeout: Duration,
    ) -> Result<(ServerProc, String), String> {
        let logf = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        cmd.process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(logf);
        let mut child = {
            let mut r = reg();
            if r.closed {
                return Err("shutting down".into());
            }
            let c = cmd.spawn().map_err(|e| format!("starting {name}: {e}"))?;
            r.pids.push(c.id() as i32);
            c
        };
        let stdin = child.stdin.take();
        let out = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let want = ready.to_owned();
        std::thread::Builder::new()
            .name(format!("{name}-stdout"))
            .spawn(move || {
                let mut r = BufReader::new(out);
                let mut l = String::new();
                loop {
                    l.clear();
                    match r.read_line(&mut l) {
                        Ok(n) if n > 0 => {}
                        _ => return,
                    }
                    if l.starts_with(&want) {
                        let _ = tx.send(l.trim_end().to_owned());
                        break;
                    }
                }
                // Keep the pipe drained so the child never blocks on it.
                let mut sink = [0u8; 4096];
                while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
            })
            .map_err(|e| e.to_string())?;
        let mut sp = ServerProc {
            child,
            name: name.to_owned(),
            log,
            _stdin: stdin,
        };
        match rx.recv_timeout(timeout) {
            Ok(line) => Ok((sp, line)),
            Err(_) => {
                let status = sp.child.try_wait().ok().flatten();
                let tail = sp.log_tail();
                sp.stop();
                Err(format!(
                    "{name} did not become ready within {timeout:?}{}; its log:\n{tail}",
                    status.map(|s| format!(" ({s})")).unwrap_or_default()
                ))
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the process has exited (it should not have).
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// The last lines of its stderr.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, wait (bounded), SIGKILL; reap.
    pub fn stop(&mut self) {
        let pid = self.pid();
        let mut r = reg();
        if let Some(i) = r.pids.iter().position(|&p| p == pid) {
            r.pids.swap_remove(i);
            drop(r);
            terminate(pid, Duration::from_secs(5));
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self._stdin.take();
        self.stop();
    }
}

/// Run in a child process that we started: die with the benchmark
/// (SIGTERM when it exits; exit at once if it is already gone) and when
/// stdin, a pipe from the benchmark, closes.
pub fn child_guard(parent: i32) {
    let _ = prctl::set_pdeathsig(Signal::SIGTERM);
    if getppid().as_raw() != parent {
        std::process::exit(1);
    }
    let _ = std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(|| {
            let mut b = [0u8; 64];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut b), Ok(n) if n > 0) {}
            std::process::exit(0);
        });
}

/// The hidden `exec` subcommand: set the parent-death signal, then become
/// `argv[0]` (the proxy). The death signal survives exec, so the proxy
/// goes when the benchmark goes, even on SIGKILL.
pub fn exec_main(parent: i32, argv: &[String]) -> std::process::ExitCode {
    let _ = prctl::set_pdeathsig(Signal::SIGTERM);
    if getppid().as_raw() != parent {
        return std::process::ExitCode::from(1);
    }
    let Some((prog, args)) = argv.split_first() else {
        eprintln!("meshshm-bench exec: no program");
        return std::process::ExitCode::from(64);
    };
    let e = Command::new(prog).args(args).exec();
    eprintln!("meshshm-bench exec {prog}: {e}");
    std::process::ExitCode::from(127)
}

/// A watchdog: if a cell runs past its deadline (a hang: a lost wake-up, a
/// dead peer not noticed), report it, stop the children and exit.
pub struct Watchdog {
    state: &'static (Mutex<Option<(Instant, String)>>, Condvar),
}

static WATCH: (Mutex<Option<(Instant, String)>>, Condvar) = (Mutex::new(None), Condvar::new());

impl Watchdog {
    pub fn start() -> Watchdog {
        let state = &WATCH;
        let _ = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let (m, cv) = state;
                let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    match &*g {
                        None => g = cv.wait(g).unwrap_or_else(|p| p.into_inner()),
                        Some((deadline, what)) => {
                            let now = Instant::now();
                            if now >= *deadline {
                                eprintln!("\nmeshshm-bench: {what} is hung (past its deadline); giving up");
                                drop(g);
                                cleanup();
                                std::process::exit(2);
                            }
                            let d = *deadline - now;
                            g = cv.wait_timeout(g, d).unwrap_or_else(|p| p.into_inner()).0;
                        }
                    }
                }
            });
        Watchdog { state }
    }

    /// Arm for `what`, which must finish within `limit`.
    pub fn arm(&self, what: String, limit: Duration) {
        let (m, cv) = self.state;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now() + limit, what));
        cv.notify_all();
    }

    pub fn disarm(&self) {
        let (m, cv) = self.state;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = None;
        cv.notify_all();
    }
}

/// Where the client and the server processes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pin {
    /// `split` for one in flight, `none` for many
    Auto,
    /// wherever the scheduler puts them (all CPUs allowed)
    None,
    /// client and server on one CPU: every wake-up is a context switch
    Same,
    /// client on one CPU, server on another: every wake-up crosses CPUs
    Split,
}

impl Pin {
    /// The placement used for a cell with `concurrency` in flight.
    pub fn for_cell(self, concurrency: usize) -> Pin {
        match self {
            Pin::Auto if concurrency <= 1 => Pin::Split,
            Pin::Auto => Pin::None,
            p => p,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Pin::Auto => "auto",
            Pin::None => "none",
            Pin::Same => "same",
            Pin::Split => "split",
        }
    }
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    use nix::sched::{sched_getaffinity, CpuSet};
    let Ok(set) = sched_getaffinity(Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// Restrict every thread of `pid` to `cpus` (threads it starts later
/// inherit it from their creator).
fn pin_process(pid: i32, cpus: &[usize]) -> Result<(), String> {
    use nix::sched::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c).map_err(|e| e.to_string())?;
    }
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| e.to_string())?;
    for e in dir.flatten() {
        if let Some(tid) = e.file_name().to_str().and_then(|t| t.parse().ok()) {
            // A thread may exit meanwhile: ignore ESRCH.
            match sched_setaffinity(Pid::from_raw(tid), &set) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(format!("pinning {pid}/{tid} to {cpus:?}: {e}")),
            }
        }
    }
    Ok(())
}

/// Place this process (the client) and the server `pid` for a cell;
/// returns the placement used.
pub fn place(pin: Pin, concurrency: usize, all: &[usize], server: i32) -> Result<Pin, String> {
    let p = pin.for_cell(concurrency);
    let (c, s): (Vec<usize>, Vec<usize>) = match (p, all) {
        (Pin::Same, [a, ..]) => (vec![*a], vec![*a]),
        (Pin::Split, [a, b, ..]) => (vec![*a], vec![*b]),
        (Pin::Split, _) if pin == Pin::Auto => (all.to_vec(), all.to_vec()),
        (Pin::Split | Pin::Same, _) => return Err(format!("--pin {} needs more CPUs", p.name())),
        _ => (all.to_vec(), all.to_vec()),
    };
    pin_process(server, &s)?;
    pin_process(std::process::id() as i32, &c)?;
    Ok(if all.len() < 2 && p == Pin::Split {
        Pin::None
    } else {
        p
    })
}
