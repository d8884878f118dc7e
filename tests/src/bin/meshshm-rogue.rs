//! An app that speaks the meshshm protocol by hand, for the fault,
//! hostile-peer and security tests: it does the handshake itself, then
//! behaves (a server that never answers, a consumer that stops reading) or
//! misbehaves (garbage in its ring, forged counters, endless messages).
//!
//! Raw writes into the segment go through `pwrite` on the segment's fd (the
//! same memory the proxy maps), so this needs no `unsafe`.
//!
//! ```text
//! meshshm-rogue MODE --socket PATH [--service S] [--ring BYTES] [--n N]
//!               [--size BYTES] [--pause-ms MS] [--secs S]
//! ```
//!
//! Hostile modes (each ends by waiting for the proxy to close the session and
//! prints `closed_ms=N`, or `open` with exit code 2): garbage, len-past-end,
//! len-past-tail, len-changes, tail-backwards, tail-ahead, head-forged,
//! unknown-kind, unknown-flags, endless-fragments, oversized, ctl-bytes,
//! reuse-id, wrong-kind.
//!
//! Other modes: victim-fragment and victim-partial (hold a half-sent message
//! or a half-written frame until killed), stuck (stop reading responses,
//! then resume and check every one), serve-hang (serve a service, never
//! answer, report requests and cancels), serve-forge (answer correctly, but
//! also forge answers to stream ids it never got), cancel-storm (cancel
//! stream ids it never used), flood (open many control connections),
//! attack (as another uid: try to reach other processes' segments).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshshm_proto::{
    recv_with_fds, status, write_control, Answer, Hello, RequestMeta, ResponseMeta, Role, Welcome,
};
use meshshm_ring::{
    wire_len, write_message, Bell, Endpoint, FrameHeader, FrameKind, Reassembler, RingCtl, Segment,
    SegmentHeader, Side, WriteProgress, FLAG_CONT, FLAG_MORE, HEADER_LEN,
};
use meshshm_tests::{body, fnv};

struct Args {
    mode: String,
    socket: PathBuf,
    service: String,
    ring: u64,
    n: u64,
    size: usize,
    pause_ms: u64,
    secs: f64,
    uid: Option<u32>,
    pids: Vec<i32>,
    files: Vec<PathBuf>,
    calls: Vec<String>,
    serve: Option<String>,
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        mode: it.next().expect("a mode"),
        socket: PathBuf::new(),
        service: "echo".into(),
        ring: 64 * 1024,
        n: 100,
        size: 8192,
        pause_ms: 1000,
        secs: 2.0,
        uid: None,
        pids: Vec::new(),
        files: Vec::new(),
        calls: Vec::new(),
        serve: None,
    };
    while let Some(f) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{f} needs a value"));
        match f.as_str() {
            "--socket" => a.socket = PathBuf::from(v()),
            "--service" => a.service = v(),
            "--ring" => a.ring = v().parse().expect("--ring"),
            "--n" => a.n = v().parse().expect("--n"),
            "--size" => a.size = v().parse().expect("--size"),
            "--pause-ms" => a.pause_ms = v().parse().expect("--pause-ms"),
            "--secs" => a.secs = v().parse().expect("--secs"),
            "--as-uid" => a.uid = Some(v().parse().expect("--as-uid")),
            "--pids" => {
                a.pids = v()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|p| p.parse().expect("pid"))
                    .collect()
            }
            "--call" => a.calls = v().split(',').map(String::from).collect(),
            "--serve" => a.serve = Some(v()),
            "--files" => {
                a.files = v()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect()
            }
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// Die with the test that started us (the parent-death signal), so that a
/// test killed by its watchdog leaves nothing running.
fn die_with_parent() {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if nix::unistd::getppid().as_raw() == 1 {
        std::process::exit(3);
    }
}

fn main() -> ExitCode {
    die_with_parent();
    let a = parse_args();
    let r = match a.mode.as_str() {
        "victim-fragment" => victim_fragment(&a),
        "victim-partial" => victim_partial(&a),
        "stuck" => stuck(&a),
        "serve-hang" => serve_hang(&a),
        "serve-forge" => serve_forge(&a),
        "cancel-storm" => cancel_storm(&a),
        "flood" => flood(&a),
        "attack" => attack(&a),
        m => hostile(&a, m),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            println!("error={e}");
            eprintln!("meshshm-rogue {}: {e}", a.mode);
            ExitCode::from(1)
        }
    }
}

/// A session set up by hand: the control socket, this app's honest view of
/// the segment, and the segment's fd for raw writes.
struct Raw {
    ctl: UnixStream,
    ep: Endpoint,
    file: Arc<File>,
    hdr: SegmentHeader,
    welcome: Welcome,
}

fn read_answer(ctl: &mut UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), String> {
    let mut buf = vec![0u8; 4096];
    let (n, fds) = recv_with_fds(ctl.as_fd(), &mut buf).map_err(|e| format!("recv: {e}"))?;
    if n < 4 {
        return Err("closed without an answer".into());
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > buf.len() - 4 {
        return Err(format!("answer of {len} bytes"));
    }
    if n < 4 + len {
        ctl.read_exact(&mut buf[n..4 + len])
            .map_err(|e| format!("read: {e}"))?;
    }
    Ok((buf[4..4 + len].to_vec(), fds))
}

fn handshake(socket: &Path, role: Role, service: &str, ring: u64) -> Result<Raw, String> {
    let mut ctl = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    ctl.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let hello = Hello {
        role,
        service: service.into(),
        token: String::new(),
        ring_up: ring,
        ring_down: ring,
    };
    write_control(&mut ctl, &hello.encode()).map_err(|e| format!("hello: {e}"))?;
    let (answer, mut fds) = read_answer(&mut ctl)?;
    let welcome = match Answer::decode(&answer) {
        Ok(Answer::Welcome(w)) => w,
        Ok(Answer::Reject(r)) => return Err(format!("rejected: {}", r.reason)),
        Err(e) => return Err(format!("answer: {e}")),
    };
    if fds.len() != 3 {
        return Err(format!("{} fds with the welcome", fds.len()));
    }
    let proxy_bell = Bell::from_eventfd(fds.pop().expect("3"));
    let app_bell = Bell::from_eventfd(fds.pop().expect("3"));
    let seg_fd = fds.pop().expect("3");
    let file = File::from(seg_fd.try_clone().map_err(|e| e.to_string())?);
    let seg = Segment::open(seg_fd).map_err(|e| e.to_string())?;
    let hdr = *seg.header();
    let ep = seg.into_endpoint(Side::App, app_bell, proxy_bell);
    ctl.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(Raw {
        ctl,
        ep,
        file: Arc::new(file),
        hdr,
        welcome,
    })
}

/// Where the counters sit in a `RingCtl`: tail first, head one padded cache
/// line later (two equal halves).
const TAIL_AT: u64 = 0;
const HEAD_AT: u64 = (std::mem::size_of::<RingCtl>() / 2) as u64;

impl Raw {
    /// Write `bytes` at offset `off` of ring `ring`'s data area (wrapping).
    fn poke(&self, ring: usize, off: u64, bytes: &[u8]) {
        let cap = self.hdr.capacity[ring];
        for (i, b) in bytes.iter().enumerate() {
            let at = self.hdr.data_offset[ring] + (off + i as u64) % cap;
            self.file.write_all_at(&[*b], at).expect("pwrite");
        }
    }

    fn store(&self, ring: usize, which: u64, v: u64) {
        self.file
            .write_all_at(&v.to_ne_bytes(), self.hdr.ctl_offset[ring] + which)
            .expect("pwrite counter");
    }

    fn load(&self, ring: usize, which: u64) -> u64 {
        let mut b = [0u8; 8];
        self.file
            .read_exact_at(&mut b, self.hdr.ctl_offset[ring] + which)
            .expect("pread counter");
        u64::from_ne_bytes(b)
    }

    /// Publish by hand: store the app→proxy tail and wake the proxy.
    fn set_tail(&self, v: u64) {
        self.store(0, TAIL_AT, v);
        self.ep.peer.ring();
    }

    fn cap(&self, ring: usize) -> u64 {
        self.hdr.capacity[ring]
    }

    /// Send one whole message honestly, waiting for room (bounded).
    fn send(&mut self, kind: FrameKind, id: u64, meta: &[u8], body: &[u8]) -> Result<(), String> {
        let mut p = WriteProgress { sent: 0 };
        let t0 = Instant::now();
        loop {
            let done = write_message(&mut self.ep.tx, kind, id, meta.len(), &[meta, body], &mut p)
                .map_err(|e| format!("send: {e}"))?;
            self.ep.flush();
            if done {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(10) || self.closed_now() {
                return Err("no room in the ring".into());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Whether the proxy closed the control socket (non-blocking check).
    fn closed_now(&self) -> bool {
        let _ = self.ctl.set_nonblocking(true);
        let mut b = [0u8; 16];
        let r = (&self.ctl).read(&mut b);
        let _ = self.ctl.set_nonblocking(false);
        match r {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }

    /// Wait until the proxy closes the session; how long it took.
    fn await_close(&self, t: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        let _ = self.ctl.set_read_timeout(Some(Duration::from_millis(20)));
        let mut b = [0u8; 64];
        while t0.elapsed() < t {
            match (&self.ctl).read(&mut b) {
                Ok(0) => return Some(t0.elapsed()),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return Some(t0.elapsed()),
            }
        }
        None
    }

    /// Read every complete message now in the proxy→app ring.
    fn drain(
        &mut self,
        re: &mut Reassembler,
        mut on: impl FnMut(FrameKind, u64, &[u8], &[u8]),
    ) -> Result<usize, String> {
        let mut n = 0;
        while let Some(f) = self.ep.rx.peek().map_err(|e| e.to_string())? {
            let h = *f.header();
            if let Some(m) = re.feed(&h, f.payload()).map_err(|e| e.to_string())? {
                on(m.kind, m.stream_id, m.meta(), m.body());
                n += 1;
            }
            f.release();
        }
        self.ep.flush();
        Ok(n)
    }
}

fn request_meta(service: &str, timeout_ms: u32) -> Vec<u8> {
    let mut m = Vec::new();
    RequestMeta::encode(&mut m, service, "Rogue", timeout_ms, 1, &[]);
    m
}

fn header(
    kind: FrameKind,
    flags: u8,
    len: u32,
    meta_len: u32,
    msg_len: u32,
    id: u64,
) -> FrameHeader {
    FrameHeader {
        len,
        kind,
        flags,
        meta_len,
        msg_len,
        stream_id: id,
    }
}

/// Send a Ping and wait for its Pong: the proxy has then consumed everything
/// published so far (its cached tail equals ours).
fn ping_pong(r: &mut Raw) -> Result<(), String> {
    r.send(FrameKind::Ping, 99, &[], b"ping")?;
    let mut re = Reassembler::new(1 << 20);
    let t0 = Instant::now();
    let mut got = false;
    while !got {
        r.drain(&mut re, |k, _, _, _| got |= k == FrameKind::Pong)?;
        if t0.elapsed() > Duration::from_secs(10) {
            return Err("no pong".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn hostile(a: &Args, mode: &str) -> Result<u8, String> {
    let mut r = handshake(&a.socket, Role::Client, "rogue", a.ring)?;
    let cap = r.cap(0);
    match mode {
        // Random bytes where the next frame should be, then published.
        "garbage" => {
            r.poke(0, 0, &body(0xbad, 4096));
            r.set_tail(4096);
        }
        // A header whose length reaches past the end of the ring.
        "len-past-end" => {
            let h = header(FrameKind::Request, 0, cap as u32 * 4, 0, cap as u32 * 4, 1);
            r.poke(0, 0, &h.encode());
            r.set_tail(cap / 2);
        }
        // A valid-looking header whose payload was never published.
        "len-past-tail" => {
            let h = header(FrameKind::Request, 0, 1000, 0, 1000, 1);
            r.poke(0, 0, &h.encode());
            r.set_tail(HEADER_LEN as u64 + 8);
        }
        // Honest frames, while another thread rewrites the length and the
        // metadata of the latest one as the proxy reads it.
        "len-changes" => {
            let last = Arc::new(AtomicU64::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let flipper = {
                let (file, last, stop) = (r.file.clone(), last.clone(), stop.clone());
                let base = r.hdr.data_offset[0];
                std::thread::spawn(move || {
                    let mut i = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        let pos = last.load(Ordering::Relaxed);
                        let len: u32 = match i % 4 {
                            0 => 300,
                            1 => u32::MAX,
                            2 => 7,
                            _ => cap as u32,
                        };
                        let _ = file.write_all_at(&len.to_le_bytes(), base + pos);
                        // The metadata's service length (bytes 8..10 of it).
                        let sl = (i as u16).wrapping_mul(977).to_le_bytes();
                        let _ = file.write_all_at(&sl, base + pos + HEADER_LEN as u64 + 8);
                        i = i.wrapping_add(1);
                    }
                })
            };
            let meta = request_meta("echo", 0);
            let payload = body(7, 300 - meta.len());
            let mut re = Reassembler::new(1 << 20);
            let t0 = Instant::now();
            let mut id = 1;
            while t0.elapsed() < Duration::from_secs(2) && !r.closed_now() {
                let pos = r.load(0, TAIL_AT) % cap;
                // The next frame goes at `pos` unless it would not fit before the end.
                if cap - pos >= wire_len(300) as u64 {
                    last.store(pos, Ordering::Relaxed);
                }
                let _ = r.send(FrameKind::Request, id, &meta, &payload);
                id += 1;
                let _ = r.drain(&mut re, |_, _, _, _| {});
            }
            stop.store(true, Ordering::Relaxed);
            flipper.join().expect("flipper");
            // Whatever the races did, end with a frame that cannot be valid.
            let t = r.load(0, TAIL_AT);
            let h = header(FrameKind::Request, 0, u32::MAX, 0, u32::MAX, 1);
            r.poke(0, t % cap, &h.encode()[..8]);
            r.set_tail(t + 8);
        }
        // The producer counter moves backwards.
        "tail-backwards" => {
            ping_pong(&mut r)?;
            r.set_tail(0);
        }
        // The producer counter jumps past anything possible.
        "tail-ahead" => {
            ping_pong(&mut r)?;
            let t = r.load(0, TAIL_AT);
            r.set_tail(t + cap * 3);
        }
        // The consumer counter of the proxy→app ring is forged; the proxy
        // reads it when that ring fills (we send pings, never read pongs).
        "head-forged" => {
            r.store(1, HEAD_AT, u64::MAX / 3);
            let payload = vec![0x55u8; 1024];
            let t0 = Instant::now();
            let mut id = 0;
            while t0.elapsed() < Duration::from_secs(5) && !r.closed_now() {
                let _ =
                    r.ep.tx
                        .try_push(header(FrameKind::Ping, 0, 1024, 0, 1024, id), &[&payload]);
                r.ep.flush();
                id += 1;
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        "unknown-kind" => {
            let mut raw = header(FrameKind::Ping, 0, 0, 0, 0, 1).encode();
            raw[4] = 99;
            r.poke(0, 0, &raw);
            r.set_tail(HEADER_LEN as u64);
        }
        "unknown-flags" => {
            let mut raw = header(FrameKind::Ping, 0, 0, 0, 0, 1).encode();
            raw[5] = 0x80;
            r.poke(0, 0, &raw);
            r.set_tail(HEADER_LEN as u64);
        }
        // A fragmented message that never ends: it declares the largest
        // message allowed, then keeps sending past it.
        "endless-fragments" => {
            let max = r.welcome.max_message as u32;
            let chunk = (r.ep.tx.max_payload() / 2) as u32;
            let data = body(3, chunk as usize);
            let mut first = true;
            let mut sent: u64 = 0;
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(20) && !r.closed_now() {
                let h = if first {
                    header(FrameKind::Request, FLAG_MORE, chunk, 0, max, 1)
                } else {
                    header(FrameKind::Request, FLAG_MORE | FLAG_CONT, chunk, 0, 0, 1)
                };
                match r.ep.tx.try_push(h, &[&data]) {
                    Ok(()) => {
                        first = false;
                        sent += chunk as u64;
                        r.ep.flush();
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
            println!("sent={sent}");
        }
        // A message declaring more than the maximum message size.
        "oversized" => {
            let h = header(FrameKind::Request, FLAG_MORE, 1024, 0, u32::MAX, 1);
            r.ep.tx
                .try_push(h, &[&[0u8; 1024]])
                .map_err(|e| e.to_string())?;
            r.ep.flush();
        }
        // Bytes on the control socket after the handshake.
        "ctl-bytes" => {
            (&r.ctl).write_all(b"hello?").map_err(|e| e.to_string())?;
        }
        // A stream id used again while its request is in flight (to a
        // service that does not answer).
        "reuse-id" => {
            let meta = request_meta(&a.service, 0);
            r.send(FrameKind::Request, 7, &meta, b"first")?;
            std::thread::sleep(Duration::from_millis(50));
            r.send(FrameKind::Request, 7, &meta, b"second")?;
        }
        // A frame kind a client app may not send (a response).
        "wrong-kind" => {
            let mut meta = Vec::new();
            ResponseMeta::encode(&mut meta, status::OK, "", &[]);
            r.send(FrameKind::Response, 1, &meta, b"not yours")?;
        }
        m => return Err(format!("unknown mode {m}")),
    }
    match r.await_close(Duration::from_secs(10)) {
        Some(t) => {
            println!("closed_ms={}", t.as_millis());
            Ok(0)
        }
        None => {
            println!("open");
            Ok(2)
        }
    }
}

/// Send the first fragments of a large message, then hold (until killed).
fn victim_fragment(a: &Args) -> Result<u8, String> {
    let mut r = handshake(&a.socket, Role::Client, "victim", a.ring)?;
    let meta = request_meta("echo", 0);
    let data = body(11, 1 << 20);
    let chunk = r.ep.tx.max_payload() / 2;
    let mut p = WriteProgress { sent: 0 };
    // Stage fragments one by one until a few are out, never the last.
    let mut frames = 0;
    let total = meta.len() + data.len();
    while frames < 3 {
        let first = p.sent == 0;
        let n = chunk.min(total - p.sent - 1);
        let mut all = meta.clone();
        all.extend_from_slice(&data);
        let h = if first {
            header(
                FrameKind::Request,
                FLAG_MORE,
                n as u32,
                meta.len() as u32,
                total as u32,
                1,
            )
        } else {
            header(FrameKind::Request, FLAG_MORE | FLAG_CONT, n as u32, 0, 0, 1)
        };
        match r.ep.tx.try_push(h, &[&all[p.sent..p.sent + n]]) {
            Ok(()) => {
                p.sent += n;
                frames += 1;
                r.ep.flush();
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    println!("ready sent={}", p.sent);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Reserve a frame, write half of it, never commit (until killed).
fn victim_partial(a: &Args) -> Result<u8, String> {
    let mut r = handshake(&a.socket, Role::Client, "victim", a.ring)?;
    // One complete request first, so the session is in use.
    let meta = request_meta("echo", 0);
    r.send(FrameKind::Request, 1, &meta, b"complete")?;
    let mut g = r.ep.tx.reserve(4000).map_err(|e| e.to_string())?;
    g.write_at(0, &body(5, 2000));
    println!("ready");
    loop {
        std::thread::sleep(Duration::from_secs(60));
        g.write_at(0, b"x");
    }
}

/// Send echo requests without reading a single response until the proxy
/// stops taking them (backpressure), hold `pause_ms`, then read everything
/// while sending the rest: every request must get exactly its response.
fn stuck(a: &Args) -> Result<u8, String> {
    let mut r = handshake(&a.socket, Role::Client, "stuck", a.ring)?;
    let meta = request_meta(&a.service, 0);
    let mut expect: HashMap<u64, u64> = HashMap::new();
    let mut next = 1u64;
    let mut full_since: Option<Instant> = None;
    let t0 = Instant::now();
    // Phase 1: write only.
    loop {
        if next > a.n {
            return Err(format!("never stalled after {} requests", a.n));
        }
        let b = body(next, a.size);
        let mut p = WriteProgress { sent: 0 };
        let done = write_message(
            &mut r.ep.tx,
            FrameKind::Request,
            next,
            meta.len(),
            &[&meta, &b],
            &mut p,
        )
        .map_err(|e| e.to_string())?;
        if done {
            r.ep.tx.publish();
            r.ep.peer.notify();
            expect.insert(next, fnv(&b));
            next += 1;
            full_since = None;
        } else if p.sent > 0 {
            return Err("request fragmented: use --size below half the ring".into());
        } else {
            let since = *full_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_millis(500) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if t0.elapsed() > Duration::from_secs(20) {
            return Err("phase 1 took too long".into());
        }
    }
    println!("stalled sent={}", next - 1);
    std::thread::sleep(Duration::from_millis(a.pause_ms));
    // Phase 2: read everything, send the rest.
    let (mut ok, mut dup, mut bad) = (0u64, 0u64, 0u64);
    let mut seen = std::collections::HashSet::new();
    let mut re = Reassembler::new(r.welcome.max_message as usize);
    let t1 = Instant::now();
    while (next <= a.n || !expect.is_empty()) && t1.elapsed() < Duration::from_secs(30) {
        r.drain(&mut re, |k, id, m, b| {
            if k != FrameKind::Response {
                return;
            }
            let good = ResponseMeta::decode(m).is_ok_and(|m| m.status == status::OK);
            match expect.remove(&id) {
                Some(sum) if good && sum == fnv(b) => {
                    ok += 1;
                    seen.insert(id);
                }
                Some(_) => bad += 1,
                None if seen.contains(&id) => dup += 1,
                None => bad += 1,
            }
        })?;
        if next <= a.n {
            let b = body(next, a.size);
            let mut p = WriteProgress { sent: 0 };
            if write_message(
                &mut r.ep.tx,
                FrameKind::Request,
                next,
                meta.len(),
                &[&meta, &b],
                &mut p,
            )
            .map_err(|e| e.to_string())?
            {
                expect.insert(next, fnv(&b));
                next += 1;
            }
            r.ep.flush();
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    println!(
        "sent={} ok={ok} lost={} dup={dup} bad={bad}",
        next - 1,
        expect.len()
    );
    Ok(0)
}

/// Serve `service` as a server app: take every request, answer none, and
/// report the requests and the cancellations received.
fn serve_hang(a: &Args) -> Result<u8, String> {
    let mut r = handshake(&a.socket, Role::Server, &a.service, a.ring)?;
    println!("ready");
    let (mut reqs, mut cancels) = (0u64, 0u64);
    let mut re = Reassembler::new(r.welcome.max_message as usize);
    let mut reported = (0, 0);
    let ctl = r.ctl.try_clone().map_err(|e| e.to_string())?;
    loop {
        r.drain(&mut re, |k, _, _, _| match k {
            FrameKind::Request => reqs += 1,
            FrameKind::Cancel => cancels += 1,
            _ => {}
        })?;
        if (reqs, cancels) != reported {
            println!("req={reqs} cancel={cancels}");
            reported = (reqs, cancels);
        }
        let ep = &mut r.ep;
        let out = ep
            .waiter
            .wait_until(
                || ep.rx.has_data().unwrap_or(true),
                Some(Instant::now() + Duration::from_millis(100)),
                Some(ctl.as_fd()),
            )
            .map_err(|e| e.to_string())?;
        if out == meshshm_ring::WaitOutcome::Other {
            println!("gone req={reqs} cancel={cancels}");
            return Ok(0);
        }
    }
}

/// Serve `service` correctly, and also answer, with a forged body, every
/// stream id given on stdin (`id N` lines: requests the proxy forwarded to
/// another server app).
fn serve_forge(a: &Args) -> Result<u8, String> {
    let mut r = handshake(&a.socket, Role::Server, &a.service, a.ring)?;
    println!("ready");
    let (tx, foreign) = std::sync::mpsc::channel::<u64>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for l in std::io::BufRead::lines(stdin.lock()).map_while(Result::ok) {
            if let Some(id) = l.strip_prefix("id ").and_then(|v| v.trim().parse().ok()) {
                let _ = tx.send(id);
            }
        }
    });
    let mut ok_meta = Vec::new();
    ResponseMeta::encode(&mut ok_meta, status::OK, "", &[]);
    let mut re = Reassembler::new(r.welcome.max_message as usize);
    let mut received = std::collections::HashSet::new();
    let (mut answered, mut forged) = (0u64, 0u64);
    loop {
        let mut reqs: Vec<(u64, Vec<u8>)> = Vec::new();
        r.drain(&mut re, |k, id, _, b| {
            if k == FrameKind::Request {
                reqs.push((id, b.to_vec()));
            }
        })?;
        for (id, b) in reqs {
            received.insert(id);
            r.send(FrameKind::Response, id, &ok_meta, &b)?;
            answered += 1;
        }
        let targets: Vec<u64> = foreign
            .try_iter()
            .filter(|t| !received.contains(t))
            .collect();
        for &t in &targets {
            r.send(FrameKind::Response, t, &ok_meta, b"FORGED")?;
            forged += 1;
        }
        if !targets.is_empty() {
            println!("answered={answered} forged={forged}");
        }
        if r.closed_now() {
            println!("gone answered={answered} forged={forged}");
            return Ok(0);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Cancel stream ids this app never used, as fast as the ring allows.
fn cancel_storm(a: &Args) -> Result<u8, String> {
    let mut r = handshake(&a.socket, Role::Client, "storm", a.ring)?;
    println!("ready");
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < Duration::from_secs_f64(a.secs) {
        let id = n % 4096 + 1;
        if r.ep
            .tx
            .try_push(header(FrameKind::Cancel, 0, 0, 0, 0, id), &[])
            .is_ok()
        {
            n += 1;
            if n % 64 == 0 {
                r.ep.flush();
            }
        } else {
            r.ep.flush();
            std::thread::sleep(Duration::from_micros(50));
        }
        if n % 4096 == 0 && r.closed_now() {
            return Err("the proxy closed the session".into());
        }
    }
    r.ep.flush();
    println!("cancels={n}");
    Ok(0)
}

/// Open `n` control connections, each sending a Hello, then count the answers.
fn flood(a: &Args) -> Result<u8, String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let hello = Hello {
        role: Role::Client,
        service: "flood".into(),
        token: String::new(),
        ring_up: 4096,
        ring_down: 4096,
    };
    let msg = meshshm_proto::frame_control(&hello.encode());
    let mut conns = Vec::with_capacity(a.n as usize);
    let mut connect_failed = 0;
    for _ in 0..a.n {
        match UnixStream::connect(&a.socket) {
            Ok(mut s) => {
                let _ = s.write_all(&msg);
                conns.push(s);
            }
            Err(_) => connect_failed += 1,
        }
    }
    println!("connected={}", conns.len());
    std::thread::sleep(Duration::from_millis(a.pause_ms));
    let (mut welcome, mut reject, mut closed, mut pending) = (0, 0, 0, 0);
    let mut reason = String::new();
    for s in &mut conns {
        let _ = s.set_nonblocking(true);
        let mut buf = vec![0u8; 4096];
        match recv_with_fds(s.as_fd(), &mut buf) {
            Ok((0, _)) => closed += 1,
            Ok((n, _fds)) if n >= 4 => match Answer::decode(&buf[4..n]) {
                Ok(Answer::Welcome(_)) => welcome += 1,
                Ok(Answer::Reject(r)) => {
                    reject += 1;
                    reason = r.reason;
                }
                Err(_) => closed += 1,
            },
            Ok(_) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => pending += 1,
            Err(_) => closed += 1,
        }
    }
    println!(
        "welcome={welcome} reject={reject} closed={closed} pending={pending} connect_failed={connect_failed} reason={reason}"
    );
    // Hold the connections until told to stop (stdin closes).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(0)
}

/// As another uid (`--as-uid`, when started as root): try every way to the
/// proxy's and the apps' segments and doorbells, and to the control socket.
/// One line per attempt: `NAME ok` or `NAME denied (error)`.
fn attack(a: &Args) -> Result<u8, String> {
    if let Some(uid) = a.uid {
        use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
        let (u, g) = (Uid::from_raw(uid), Gid::from_raw(uid));
        setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
        setresgid(g, g, g).map_err(|e| format!("setresgid: {e}"))?;
        setresuid(u, u, u).map_err(|e| format!("setresuid: {e}"))?;
    }
    println!("uid={}", nix::unistd::geteuid());
    let report = |name: &str, r: std::io::Result<()>| match r {
        Ok(()) => println!("{name} ok"),
        Err(e) => println!("{name} denied ({e})"),
    };
    // The control socket: connect, and if that works, the handshake.
    if !a.socket.as_os_str().is_empty() {
        match handshake(&a.socket, Role::Client, "attacker", 4096) {
            Ok(_) => println!("socket ok"),
            Err(e) => println!("socket denied ({e})"),
        }
        for svc in &a.calls {
            let c = meshshm::Client::with_options(meshshm::ClientOptions {
                socket: Some(a.socket.clone()),
                ..Default::default()
            });
            match c.and_then(|c| c.call(svc, "Attack", b"x", Duration::from_secs(5))) {
                Ok(_) => println!("call {svc} ok"),
                Err(meshshm::Error::Status { code, message }) => {
                    println!("call {svc} status={code} ({message})")
                }
                Err(e) => println!("call {svc} error ({e})"),
            }
        }
        if let Some(svc) = &a.serve {
            match handshake(&a.socket, Role::Server, svc, 4096) {
                Ok(_) => println!("serve {svc} ok"),
                Err(e) => println!("serve {svc} denied ({e})"),
            }
        }
    }
    for &pid in &a.pids {
        let fd_dir = format!("/proc/{pid}/fd");
        report(
            &format!("list {fd_dir}"),
            std::fs::read_dir(&fd_dir).map(|_| ()),
        );
        let mut opened = 0;
        let mut first_err = None;
        for n in 0..256 {
            let p = format!("{fd_dir}/{n}");
            for write in [false, true] {
                match std::fs::OpenOptions::new().read(true).write(write).open(&p) {
                    Ok(_) => opened += 1,
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        match opened {
            0 => println!(
                "open {fd_dir}/* denied ({})",
                first_err.map(|e| e.to_string()).unwrap_or_default()
            ),
            n => println!("open {fd_dir}/* ok ({n} opened)"),
        }
        let maps = format!("/proc/{pid}/map_files");
        report(
            &format!("list {maps}"),
            std::fs::read_dir(&maps).map(|_| ()),
        );
        let mem = format!("/proc/{pid}/mem");
        report(&format!("open {mem}"), File::open(&mem).map(|_| ()));
    }
    for f in &a.files {
        report(
            &format!("open {}", f.display()),
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(f)
                .map(|_| ()),
        );
        report(&format!("read {}", f.display()), File::open(f).map(|_| ()));
    }
    Ok(0)
}
