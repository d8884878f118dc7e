//! Two processes on one segment: the test binary re-executes itself as the
//! child (`--exact <test> --nocapture`, role in `MESHSHM_TEST_ROLE`) and
//! hands it the segment and doorbell fds by inheritance (a `dup` of each,
//! which is not close-on-exec, its number in an environment variable).
//!
//! Every child is reaped (a guard kills and waits for it if the parent
//! panics), and every wait has a deadline, so a hang fails the test instead
//! of blocking it.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meshshm_ring::{
    sweep_stale, write_message, Backing, Bell, Endpoint, FrameKind, Reassembler, Segment,
    SegmentOptions, Side, WaitOutcome, WriteProgress,
};

const ROLE: &str = "MESHSHM_TEST_ROLE";
const SEG_FD: &str = "MESHSHM_TEST_SEG_FD";
const APP_BELL_FD: &str = "MESHSHM_TEST_APP_BELL_FD";
const PROXY_BELL_FD: &str = "MESHSHM_TEST_PROXY_BELL_FD";
const COUNT: &str = "MESHSHM_TEST_COUNT";
/// Lines the child prints for the parent start with this.
const SAY: &str = "MESHSHM-CHILD:";
/// Upper bound on any single wait; a test that needs longer is hung.
const WATCHDOG: Duration = Duration::from_secs(60);
const SHM: &str = "/dev/shm";

/// The tests of this file start children that inherit fds and look at
/// `/dev/shm` by pid: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// A child process that is killed and reaped however the test ends.
struct ChildGuard {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
}

impl ChildGuard {
    /// Run this test binary's test `test` as a child with `role`, `env`, and
    /// the fds in `pass` inherited (each `dup`ed without close-on-exec; the
    /// dups are closed in the parent once the child runs).
    fn spawn(test: &str, role: &str, env: &[(&str, String)], pass: &[(&str, RawFd)]) -> Self {
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd = Command::new(exe);
        cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut dups = Vec::new();
        for &(k, fd) in pass {
            // SAFETY: dup of a descriptor we own; the result is checked and
            // owned below. dup() never copies FD_CLOEXEC, so the child
            // inherits it.
            let d = unsafe { libc::dup(fd) };
            assert!(d >= 0, "dup: {}", std::io::Error::last_os_error());
            // SAFETY: `d` is a fresh descriptor owned by nobody else.
            dups.push(unsafe { OwnedFd::from_raw_fd(d) });
            cmd.env(k, d.to_string());
        }
        let mut child = cmd.spawn().expect("spawn child");
        drop(dups);
        let out = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                // libtest may have printed "test name ... " on the same line.
                if let Some(msg) = line.find(SAY).map(|i| &line[i + SAY.len()..]) {
                    if tx.send(msg.trim().to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        ChildGuard {
            child: Some(child),
            lines,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("not reaped").id()
    }

    /// The next line the child says, within the watchdog.
    fn expect_line(&self) -> String {
        self.lines
            .recv_timeout(WATCHDOG)
            .expect("child said nothing in time")
    }

    /// Whether the child has exited (reaping it if so).
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .expect("not reaped")
            .try_wait()
            .expect("try_wait")
    }

    /// Wait for the child to exit by itself, within the watchdog.
    fn wait(mut self) -> ExitStatus {
        let end = Instant::now() + WATCHDOG;
        loop {
            if let Some(st) = self.exited() {
                self.child = None;
                return st;
            }
            assert!(Instant::now() < end, "child did not exit in time");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL the child and reap it.
    fn kill(mut self) -> ExitStatus {
        let mut c = self.child.take().expect("not reaped");
        c.kill().expect("kill");
        c.wait().expect("wait")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn inherited_fd(var: &str) -> OwnedFd {
    let n: RawFd = std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} not set"))
        .parse()
        .expect("fd number");
    // SAFETY: the parent passed us this descriptor (inherited across exec);
    // nothing else in this process owns it.
    unsafe { OwnedFd::from_raw_fd(n) }
}

/// Make the child die with its parent (the spawning thread), so that a
/// parent killed mid-test leaves no orphan behind.
fn die_with_parent() {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
}

/// Names in /dev/shm that a segment of `pid` would have.
fn shm_names_of(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("meshshm-{pid}-");
    std::fs::read_dir(SHM)
        .expect("read /dev/shm")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

fn named_options(ring: usize) -> SegmentOptions {
    SegmentOptions {
        app_to_proxy: ring,
        proxy_to_app: 4096,
        max_message: 1 << 20,
        backing: Backing::Dir(SHM.into()),
    }
}

/// FNV-1a, the checksum the child puts in each message's metadata.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Message `i`'s size: mostly small, some medium, a few larger than the
/// ring (fragments).
fn message_size(rng: &mut XorShift) -> usize {
    let r = rng.next();
    match r % 1000 {
        0..=1 => 65_536 + (r >> 20) as usize % 250_000,
        2..=60 => 1024 + (r >> 20) as usize % 15_000,
        _ => (r >> 20) as usize % 240,
    }
}

const META_LEN: usize = 16;
const RING: usize = 64 * 1024;

/// Child: open the inherited segment as the app and send `COUNT` messages
/// of random sizes, each with `[index, fnv1a(body)]` as metadata.
fn stream_child(bells: &str) {
    die_with_parent();
    let n: u64 = std::env::var(COUNT).expect("count").parse().expect("count");
    let seg = Segment::open(inherited_fd(SEG_FD)).expect("open segment");
    let (mine, peer) = match bells {
        "eventfd" => (
            Bell::from_eventfd(inherited_fd(APP_BELL_FD)),
            Bell::from_eventfd(inherited_fd(PROXY_BELL_FD)),
        ),
        _ => (Bell::Futex, Bell::Futex),
    };
    let mut ep = seg.into_endpoint(Side::App, mine, peer);
    ep.waiter.set_spin(200);
    let Endpoint {
        tx, waiter, peer, ..
    } = &mut ep;
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut body = Vec::new();
    let end = Instant::now() + WATCHDOG;
    for i in 0..n {
        body.resize(message_size(&mut rng), 0);
        rng.fill(&mut body);
        let mut meta = [0u8; META_LEN];
        meta[..8].copy_from_slice(&i.to_le_bytes());
        meta[8..].copy_from_slice(&fnv1a(&body).to_le_bytes());
        let parts: [&[u8]; 2] = [&meta, &body];
        let mut prog = WriteProgress { sent: 0 };
        let mut done = write_message(tx, FrameKind::Request, i, META_LEN, &parts, &mut prog)
            .expect("write_message");
        while !done {
            // Full: publish what is staged, wake the proxy, and sleep until
            // another try makes progress.
            tx.publish();
            peer.notify();
            let before = prog.sent;
            let out = waiter
                .wait_until(
                    || {
                        done =
                            write_message(tx, FrameKind::Request, i, META_LEN, &parts, &mut prog)
                                .expect("write_message");
                        done || prog.sent != before
                    },
                    Some(end),
                    None,
                )
                .expect("wait");
            assert_eq!(out, WaitOutcome::Ready, "proxy stopped reading");
        }
        if i % 16 == 15 {
            tx.publish();
            peer.notify();
        }
    }
    tx.publish();
    peer.notify();
    println!("{SAY} sent {n}");
}

/// Parent: create a named segment, start the child, receive and check all.
fn stream_parent(test: &str, bells: &str, n: u64) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let seg = Segment::create(&named_options(RING)).expect("create segment");
    let name = seg.path().expect("named").to_owned();
    assert!(name.exists());
    let (app_bell, proxy_bell) = match bells {
        "eventfd" => (
            Bell::eventfd().expect("eventfd"),
            Bell::eventfd().expect("eventfd"),
        ),
        _ => (Bell::Futex, Bell::Futex),
    };
    let mut pass = vec![(SEG_FD, seg.fd().as_raw_fd())];
    if let (Some(a), Some(p)) = (app_bell.fd(), proxy_bell.fd()) {
        pass.push((APP_BELL_FD, a.as_raw_fd()));
        pass.push((PROXY_BELL_FD, p.as_raw_fd()));
    }
    let mut child = ChildGuard::spawn(test, bells, &[(COUNT, n.to_string())], &pass);
    let child_pid = child.pid();
    // The child holds the fd: the name can go now.
    let mut ep = seg.into_endpoint(Side::Proxy, proxy_bell, app_bell);
    assert!(!name.exists(), "name not unlinked");
    ep.waiter.set_spin(200);
    let Endpoint {
        rx, waiter, peer, ..
    } = &mut ep;
    let mut re = Reassembler::new(1 << 20);
    let (mut got, mut frames, mut bytes) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    while got < n {
        while let Some(f) = rx.peek().expect("child broke the protocol") {
            let h = *f.header();
            frames += 1;
            if let Some(m) = re.feed(&h, f.payload()).expect("bad fragments") {
                assert_eq!(m.stream_id, got, "messages out of order");
                assert_eq!(m.meta().len(), META_LEN);
                let meta = m.meta();
                assert_eq!(u64::from_le_bytes(meta[..8].try_into().unwrap()), got);
                let sum = u64::from_le_bytes(meta[8..].try_into().unwrap());
                assert_eq!(fnv1a(m.body()), sum, "message {got} corrupted");
                bytes += m.len() as u64;
                got += 1;
            }
            f.release();
            if frames % 32 == 0 {
                rx.publish();
                peer.notify();
            }
        }
        rx.publish();
        peer.notify();
        if got == n {
            break;
        }
        let out = waiter
            .wait_until(
                || rx.has_data().expect("child broke the protocol"),
                Some(Instant::now() + Duration::from_secs(1)),
                None,
            )
            .expect("wait");
        if out == WaitOutcome::TimedOut {
            if let Some(st) = child.exited() {
                assert!(
                    rx.has_data().expect("protocol"),
                    "child exited ({st}) after {got} of {n} messages"
                );
            }
            assert!(start.elapsed() < WATCHDOG, "stuck after {got} of {n}");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{test}: {got} messages, {frames} frames, {bytes} bytes in {secs:.2}s \
         ({:.2} M msgs/s, {:.2} GB/s)",
        got as f64 / secs / 1e6,
        bytes as f64 / secs / 1e9
    );
    assert_eq!(child.expect_line(), format!("sent {n}"));
    let st = child.wait();
    assert!(st.success(), "child failed: {st}");
    assert!(rx.peek().expect("protocol").is_none(), "more than sent");
    assert!(shm_names_of(std::process::id()).is_empty());
    assert!(shm_names_of(child_pid).is_empty());
}

#[test]
fn stream_across_processes_eventfd() {
    const TEST: &str = "stream_across_processes_eventfd";
    match role().as_deref() {
        Some(r) => stream_child(r),
        None => stream_parent(TEST, "eventfd", 200_000),
    }
}

#[test]
fn stream_across_processes_futex() {
    const TEST: &str = "stream_across_processes_futex";
    match role().as_deref() {
        Some(r) => stream_child(r),
        None => stream_parent(TEST, "futex", 200_000),
    }
}

/// The parent creates a named segment, the child maps it and writes a frame,
/// the parent unlinks the name (both have mapped it) and SIGKILLs the
/// child: nothing is left in /dev/shm, and the parent's mapping still holds
/// what the child wrote.
#[test]
fn killed_peer_leaves_nothing() {
    const TEST: &str = "killed_peer_leaves_nothing";
    if role().is_some() {
        die_with_parent();
        let seg = Segment::open(inherited_fd(SEG_FD)).expect("open");
        let mut ep = seg.into_endpoint(Side::App, Bell::Futex, Bell::Futex);
        ep.tx
            .try_push(
                meshshm_ring::FrameHeader::single(FrameKind::Ping, 7, 0, 4),
                &[b"ping"],
            )
            .expect("push");
        ep.flush();
        println!("{SAY} mapped");
        // Wait to be killed (bounded, in case the parent is gone).
        std::thread::sleep(WATCHDOG);
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let seg = Segment::create(&named_options(4096)).expect("create");
    let name = seg.path().expect("named").to_owned();
    let child = ChildGuard::spawn(TEST, "app", &[], &[(SEG_FD, seg.fd().as_raw_fd())]);
    let child_pid = child.pid();
    assert_eq!(child.expect_line(), "mapped");
    let mut ep = seg.into_endpoint(Side::Proxy, Bell::Futex, Bell::Futex);
    assert!(!name.exists());
    let st = child.kill();
    assert!(!st.success(), "child was killed: {st}");
    let f = ep.rx.peek().expect("protocol").expect("the child's frame");
    assert_eq!((f.header().stream_id, f.payload()), (7, &b"ping"[..]));
    f.release();
    drop(ep);
    assert!(shm_names_of(std::process::id()).is_empty());
    assert!(shm_names_of(child_pid).is_empty());
}

/// The child creates a named segment and is SIGKILLed before it unlinks
/// it: the name stays until `sweep_stale` finds its creator gone.
#[test]
fn killed_creator_is_swept() {
    const TEST: &str = "killed_creator_is_swept";
    if role().is_some() {
        die_with_parent();
        let seg = Segment::create(&named_options(4096)).expect("create");
        println!("{SAY} {}", seg.path().expect("named").display());
        std::thread::sleep(WATCHDOG);
        drop(seg);
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Should an assertion fail, sweep after the child is killed and reaped
    // (locals drop in reverse order), so the name does not outlive the test.
    struct SweepOnDrop;
    impl Drop for SweepOnDrop {
        fn drop(&mut self) {
            sweep_stale(Path::new(SHM));
        }
    }
    let _sweep = SweepOnDrop;
    let child = ChildGuard::spawn(TEST, "creator", &[], &[]);
    let child_pid = child.pid();
    let name = PathBuf::from(child.expect_line());
    assert!(name.starts_with(SHM));
    assert!(
        name.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(&format!("meshshm-{child_pid}-")),
        "{name:?}"
    );
    assert!(name.exists());
    // A live creator's segment is not touched.
    sweep_stale(Path::new(SHM));
    assert!(name.exists(), "swept while its creator lives");
    child.kill();
    assert!(name.exists(), "SIGKILL cannot unlink");
    assert!(sweep_stale(Path::new(SHM)) >= 1);
    assert!(!name.exists());
    assert!(shm_names_of(child_pid).is_empty());
}
