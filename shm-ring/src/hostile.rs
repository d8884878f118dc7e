//! A hostile producer, for the property tests (`tests/prop.rs`) and the fuzz
//! target (`fuzz/fuzz_targets/hostile_producer.rs`). Only built with the
//! `fuzzing` feature.
//!
//! [`Hostile`] holds one memfd segment with three views of it: the proxy's
//! [`Endpoint`] (the code under test), an honest app [`Endpoint`] (to send
//! well-formed traffic the hostile steps then corrupt), and a raw mapping
//! through which the app plays foul: it writes any bytes anywhere in the
//! segment and stores any value into the counters it can reach (the
//! app→proxy `tail`, the proxy→app `head`). After every step the proxy
//! drains its ring through a [`Reassembler`].
//!
//! What is checked, whatever the steps:
//! - nothing panics, and every drain ends within a bound (no loop);
//! - every frame the proxy is handed lies inside its ring's data area;
//! - once the proxy's consumer returns an error it stays poisoned;
//! - every message handed out is within `max_message` and consistent;
//! - as long as no hostile step has run, every message arrives intact and
//!   in order (the honest path checked against a model queue).
//!
//! Steps run one after another on one thread: the harness does not model a
//! producer that changes bytes while the consumer reads them (the consumer
//! copies each header out once, so that only changes payload bytes).

use std::collections::VecDeque;
use std::os::fd::AsFd;

use memmap2::MmapRaw;

use crate::doorbell::Bell;
use crate::error::RingError;
use crate::fragment::{write_message, Reassembler, WriteProgress};
use crate::frame::{wire_len, FrameHeader, FrameKind, HEADER_LEN};
use crate::ring::{Consumer, Producer, RingCtl};
use crate::segment::{Backing, Endpoint, Segment, SegmentOptions, Side};

/// Where the counters sit in a `RingCtl` (tail at 0, head one padded
/// cache line later: 128 bytes on x86_64).
const TAIL_AT: u64 = std::mem::offset_of!(RingCtl, tail) as u64;
const HEAD_AT: u64 = std::mem::offset_of!(RingCtl, head) as u64;

/// Largest message the harness's segment accepts.
pub const MAX_MESSAGE: u64 = 256 * 1024;

/// One step of the app (honest or not) or of the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Honest app: send one message of `len` bytes (`meta_len` of them
    /// metadata), fragmented as needed, letting the proxy drain when full.
    Send {
        /// message bytes
        len: u32,
        /// metadata bytes (clamped to `len`)
        meta_len: u32,
        /// stream id
        stream: u64,
        /// seeds the message bytes
        seed: u64,
    },
    /// Hostile: write `bytes` at byte `at` (modulo the segment length) of
    /// the segment: header, wake cells, counters, either data area.
    Poke {
        /// segment offset (reduced modulo the segment length)
        at: u32,
        /// what to write (cut at the end of the segment)
        bytes: Vec<u8>,
    },
    /// Hostile: write these 24 header bytes (valid or not) at the hostile
    /// cursor in the app→proxy ring, with `len` bytes of payload pattern
    /// after them (cut at the end of the data area), and move the cursor
    /// past it as if it were a frame. Not published until [`Op::Tail`].
    Header {
        /// raw header bytes
        raw: [u8; HEADER_LEN],
    },
    /// Hostile: store `cursor + delta` to the app→proxy `tail`, where the
    /// cursor is the `tail` in shared memory plus the bytes staged by
    /// [`Op::Header`] since the last store.
    Tail {
        /// added to the cursor (wrapping)
        delta: i64,
    },
    /// Hostile: store any value to the app→proxy `tail`.
    SetTail(u64),
    /// Hostile: store the proxy→app `tail` (read from shared memory) plus
    /// `delta` to the proxy→app `head`: the proxy's producer reads it.
    PeerHead {
        /// added to the proxy→app tail (wrapping)
        delta: i64,
    },
    /// Proxy: send a message of `len` bytes to the app (its producer then
    /// re-reads the head the app may have forged).
    ProxySend {
        /// message bytes
        len: u32,
    },
    /// Proxy: drain the app→proxy ring now.
    Drain,
}

impl Op {
    /// A well-formed header, encoded (for building [`Op::Header`] steps).
    pub fn header(h: &FrameHeader) -> Op {
        Op::Header { raw: h.encode() }
    }

    /// Decode one step from fuzzer bytes; `None` when the input is used up.
    /// Any byte string decodes to some sequence of steps.
    pub fn decode(input: &mut &[u8]) -> Option<Op> {
        let tag = take_u8(input)?;
        Some(match tag % 16 {
            0..=2 => {
                let len = (take_u16(input) as u32) << (take_u8(input).unwrap_or(0) % 3);
                let meta_len = take_u16(input) as u32 % (len + 1);
                let stream = take_u8(input).unwrap_or(0) as u64;
                Op::Send {
                    len,
                    meta_len,
                    stream,
                    seed: tag as u64,
                }
            }
            3 | 4 => {
                let at = take_u16(input) as u32;
                let n = (take_u8(input).unwrap_or(0) as usize).min(input.len());
                let (bytes, rest) = input.split_at(n);
                *input = rest;
                Op::Poke {
                    at,
                    bytes: bytes.to_vec(),
                }
            }
            5 => {
                // Raw bytes, which rarely decode...
                let mut raw = [0u8; HEADER_LEN];
                let n = HEADER_LEN.min(input.len());
                raw[..n].copy_from_slice(&input[..n]);
                *input = &input[n..];
                Op::Header { raw }
            }
            6..=8 => {
                // ...and structured fields, which often do, so that the
                // fuzzer reaches the fragment rules and the bounds checks.
                let len = take_u16(input) as u32;
                let kind = match take_u8(input).unwrap_or(1) % 7 {
                    0 => FrameKind::Pad,
                    1 => FrameKind::Request,
                    2 => FrameKind::Response,
                    3 => FrameKind::Cancel,
                    4 => FrameKind::Ping,
                    5 => FrameKind::Pong,
                    _ => FrameKind::Goaway,
                };
                let flags = take_u8(input).unwrap_or(0) % 4;
                let meta_len = take_u16(input) as u32;
                let msg_len = match take_u8(input).unwrap_or(0) % 3 {
                    0 => len,
                    1 => 0,
                    _ => take_u32(input),
                };
                let stream_id = take_u8(input).unwrap_or(0) as u64;
                Op::header(&FrameHeader {
                    len,
                    kind,
                    flags,
                    meta_len: meta_len.min(msg_len),
                    msg_len,
                    stream_id,
                })
            }
            // Mostly tails near the staged frames, sometimes far, rarely anything.
            9 | 10 => Op::Tail {
                delta: take_u8(input).unwrap_or(0) as i8 as i64,
            },
            11 => Op::Tail {
                delta: take_u16(input) as i16 as i64,
            },
            12 => Op::SetTail(take_u64(input)),
            13 => Op::PeerHead {
                delta: take_u16(input) as i16 as i64,
            },
            14 => Op::ProxySend {
                len: take_u16(input) as u32,
            },
            _ => Op::Drain,
        })
    }

    /// Decode a whole fuzzer input into steps (at most `max`).
    pub fn decode_all(mut input: &[u8], max: usize) -> Vec<Op> {
        let mut ops = Vec::new();
        while ops.len() < max {
            match Op::decode(&mut input) {
                Some(op) => ops.push(op),
                None => break,
            }
        }
        ops
    }
}

fn take_u8(input: &mut &[u8]) -> Option<u8> {
    let (&b, rest) = input.split_first()?;
    *input = rest;
    Some(b)
}

fn take_bytes<const N: usize>(input: &mut &[u8]) -> [u8; N] {
    let mut b = [0u8; N];
    let n = N.min(input.len());
    b[..n].copy_from_slice(&input[..n]);
    *input = &input[n..];
    b
}

fn take_u16(input: &mut &[u8]) -> u16 {
    u16::from_le_bytes(take_bytes(input))
}

fn take_u32(input: &mut &[u8]) -> u32 {
    u32::from_le_bytes(take_bytes(input))
}

fn take_u64(input: &mut &[u8]) -> u64 {
    u64::from_le_bytes(take_bytes(input))
}

/// Deterministic message bytes for `(seed, len)`.
pub fn message_bytes(seed: u64, len: usize) -> Vec<u8> {
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

/// A message the honest side sent and expects to arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    kind: FrameKind,
    stream: u64,
    meta_len: usize,
    data: Vec<u8>,
}

/// What a run saw, for the tests to assert on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// frames the proxy consumed
    pub frames: u64,
    /// whole messages the proxy received
    pub messages: u64,
    /// messages the app received from the proxy
    pub app_messages: u64,
    /// the error that ended the proxy's side of the connection, if any
    pub error: Option<RingError>,
    /// the error that stopped the proxy's producer (a forged head), if any
    pub proxy_tx_error: Option<RingError>,
    /// whether any hostile step ran
    pub tampered: bool,
}

/// One receiving side: a consumer, its reassembler and its expectations.
struct Rx<'a> {
    rx: &'a mut Consumer,
    re: &'a mut Reassembler,
    expected: &'a mut VecDeque<Expected>,
    tampered: bool,
    max_message: usize,
}

/// Drain `side` once: consume every published frame, feed it to the
/// reassembler, check each message. Returns (frames, messages, first error).
fn drain(side: Rx<'_>) -> (u64, u64, Option<RingError>) {
    let Rx {
        rx,
        re,
        expected,
        tampered,
        max_message,
    } = side;
    let area = rx.data_area();
    // Each frame takes at least HEADER_LEN bytes and the consumer can be
    // handed at most `capacity` published bytes per drain (the tail it
    // bounds does not move during one), so this bound is never reached
    // unless the consumer loops.
    let bound = rx.capacity() / HEADER_LEN + 2;
    let (mut frames, mut messages) = (0u64, 0u64);
    for _ in 0..bound {
        let f = match rx.peek() {
            Ok(Some(f)) => f,
            Ok(None) => {
                rx.publish();
                return (frames, messages, None);
            }
            Err(e) => return (frames, messages, Some(e)),
        };
        frames += 1;
        let h = *f.header();
        let p = f.payload();
        let (start, end) = (p.as_ptr() as usize, p.as_ptr() as usize + p.len());
        assert!(
            area.start <= start && end <= area.end,
            "frame {start:#x}..{end:#x} outside the data area {area:#x?}"
        );
        match re.feed(&h, p) {
            Ok(None) => {}
            Ok(Some(m)) => {
                messages += 1;
                assert!(m.len() <= max_message, "message over max_message");
                assert_eq!(m.meta().len() + m.body().len(), m.len());
                if !tampered {
                    let want = expected.pop_front().expect("a message nobody sent");
                    assert_eq!(m.kind, want.kind);
                    assert_eq!(m.stream_id, want.stream);
                    assert_eq!(m.meta().len(), want.meta_len);
                    assert!(m.to_vec() == want.data, "message bytes differ");
                }
            }
            Err(e) => return (frames, messages, Some(e)),
        }
        f.release();
        rx.publish();
    }
    panic!("consumer handed out more than {bound} frames in one drain: it loops");
}

/// The harness: a segment, the proxy under test, an honest app, and the
/// hostile app's raw view.
pub struct Hostile {
    raw: MmapRaw,
    ctl_offset: [u64; 2],
    data_offset: [u64; 2],
    proxy: Endpoint,
    app: Endpoint,
    proxy_re: Reassembler,
    app_re: Reassembler,
    to_proxy: VecDeque<Expected>,
    to_app: VecDeque<Expected>,
    /// Bytes staged by `Op::Header` past the shared tail.
    staged: u64,
    out: Outcome,
    /// The proxy dropped the connection (after `out.error`).
    dead: bool,
    /// The app gave up on the proxy→app ring.
    app_dead: bool,
}

/// Rounds of "write what fits, let the other side drain" before a sender
/// gives up (only reached once the peer is broken): an empty ring takes at
/// least one frame of `max_payload` bytes per round.
fn send_rounds(len: usize, max_payload: usize) -> usize {
    len / max_payload + 8
}

impl Hostile {
    /// A fresh memfd segment with an app→proxy ring of `capacity` bytes
    /// (a power of two `>= MIN_CAPACITY`) and a 4 KiB proxy→app ring.
    ///
    /// # Panics
    /// If the segment cannot be created or mapped.
    pub fn new(capacity: usize) -> Hostile {
        let seg = Segment::create(&SegmentOptions {
            app_to_proxy: capacity,
            proxy_to_app: 4096,
            max_message: MAX_MESSAGE,
            backing: Backing::Memfd,
        })
        .expect("create segment");
        let fd = seg.fd().try_clone_to_owned().expect("dup segment fd");
        let raw = MmapRaw::map_raw(&fd.as_fd()).expect("map segment again");
        let app_seg = Segment::open(fd).expect("open segment");
        let ctl_offset = seg.header().ctl_offset;
        let data_offset = seg.header().data_offset;
        let proxy = seg.into_endpoint(Side::Proxy, Bell::Futex, Bell::Futex);
        let app = app_seg.into_endpoint(Side::App, Bell::Futex, Bell::Futex);
        Hostile {
            raw,
            ctl_offset,
            data_offset,
            proxy_re: Reassembler::new(MAX_MESSAGE as usize),
            app_re: Reassembler::new(MAX_MESSAGE as usize),
            proxy,
            app,
            to_proxy: VecDeque::new(),
            to_app: VecDeque::new(),
            staged: 0,
            out: Outcome::default(),
            dead: false,
            app_dead: false,
        }
    }

    /// Run `ops` on a fresh harness (capacity as in [`Hostile::new`]) and
    /// a final drain; panics if any check fails.
    pub fn run(capacity: usize, ops: &[Op]) -> Outcome {
        let mut h = Hostile::new(capacity);
        for op in ops {
            h.step(op);
        }
        h.finish()
    }

    /// Run a fuzzer input: its first byte picks the ring size, the rest is
    /// decoded into at most 256 steps.
    pub fn run_bytes(input: &[u8]) -> Outcome {
        let Some((&first, rest)) = input.split_first() else {
            return Outcome::default();
        };
        let cap = 4096 << (first % 3);
        Hostile::run(cap, &Op::decode_all(rest, 256))
    }

    /// Drain the proxy's ring one last time and report. If nothing hostile
    /// ran, everything sent must have arrived.
    pub fn finish(mut self) -> Outcome {
        self.drain_proxy();
        self.drain_app();
        if !self.out.tampered {
            assert_eq!(self.out.error, None, "honest traffic poisoned the ring");
            assert!(self.to_proxy.is_empty(), "messages lost app→proxy");
            assert!(self.to_app.is_empty(), "messages lost proxy→app");
            assert!(!self.proxy_re.in_progress());
        }
        self.out
    }

    /// Apply one step, then let the proxy drain.
    pub fn step(&mut self, op: &Op) {
        match op {
            Op::Send {
                len,
                meta_len,
                stream,
                seed,
            } => {
                let len = (*len).min(MAX_MESSAGE as u32);
                let data = message_bytes(*seed, len as usize);
                let meta_len = (*meta_len).min(len) as usize;
                self.app_send(FrameKind::Request, *stream, meta_len, data);
            }
            Op::Poke { at, bytes } => {
                self.out.tampered = true;
                let seg_len = self.raw.len();
                let at = *at as usize % seg_len;
                let n = bytes.len().min(seg_len - at);
                // SAFETY: at + n <= the mapping's length; the mapping is
                // shared memory that the other views reach only through raw
                // pointers and atomics, and nothing else runs concurrently.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.raw.as_mut_ptr().add(at), n)
                };
            }
            Op::Header { raw } => {
                self.out.tampered = true;
                let cap = self.proxy.rx.capacity();
                let base = self
                    .load(self.ctl_offset[0] + TAIL_AT)
                    .wrapping_add(self.staged);
                let pos = (base as usize) & (cap - 1);
                let len = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
                let to_end = cap - pos;
                let data_off = self.data_offset(0) + pos;
                let n = HEADER_LEN.min(to_end);
                self.write(data_off, &raw[..n]);
                let body = message_bytes(base, len.min(to_end - n).min(1 << 16));
                self.write(data_off + n, &body);
                self.staged = self.staged.wrapping_add(wire_len(len.min(1 << 30)) as u64);
            }
            Op::Tail { delta } => {
                self.out.tampered = true;
                let t = self
                    .load(self.ctl_offset[0])
                    .wrapping_add(self.staged)
                    .wrapping_add(*delta as u64);
                self.store(self.ctl_offset[0] + TAIL_AT, t);
                self.staged = 0;
            }
            Op::SetTail(v) => {
                self.out.tampered = true;
                self.store(self.ctl_offset[0] + TAIL_AT, *v);
                self.staged = 0;
            }
            Op::PeerHead { delta } => {
                self.out.tampered = true;
                let tail = self.load(self.ctl_offset[1] + TAIL_AT);
                self.store(
                    self.ctl_offset[1] + HEAD_AT,
                    tail.wrapping_add(*delta as u64),
                );
            }
            Op::ProxySend { len } => {
                let len = (*len).min(MAX_MESSAGE as u32);
                let data = message_bytes(0x5eed ^ len as u64, len as usize);
                self.proxy_send(data);
            }
            Op::Drain => {}
        }
        self.drain_proxy();
    }

    fn data_offset(&self, ring: usize) -> usize {
        self.data_offset[ring] as usize
    }

    fn write(&self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= self.raw.len());
        // SAFETY: bounds checked just above; see `Op::Poke`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.raw.as_mut_ptr().add(off),
                bytes.len(),
            )
        };
    }

    fn load(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        assert!(off as usize + 8 <= self.raw.len());
        // SAFETY: bounds checked just above; a plain byte read of a counter
        // the hostile side does not trust anyway.
        unsafe {
            std::ptr::copy_nonoverlapping(self.raw.as_ptr().add(off as usize), b.as_mut_ptr(), 8)
        };
        u64::from_ne_bytes(b)
    }

    fn store(&self, off: u64, v: u64) {
        self.write(off as usize, &v.to_ne_bytes());
    }

    fn drain_proxy(&mut self) {
        if self.dead {
            // A ring error poisons for good; a reassembly error means the
            // proxy dropped the connection and reads no more.
            if matches!(self.out.error, Some(RingError::BadMessage(_))) {
                return;
            }
            assert_eq!(self.proxy.rx.peek().err(), Some(RingError::Poisoned));
            assert_eq!(self.proxy.rx.has_data(), Err(RingError::Poisoned));
            return;
        }
        let (f, m, e) = drain(Rx {
            rx: &mut self.proxy.rx,
            re: &mut self.proxy_re,
            expected: &mut self.to_proxy,
            tampered: self.out.tampered,
            max_message: MAX_MESSAGE as usize,
        });
        self.out.frames += f;
        self.out.messages += m;
        if let Some(e) = e {
            if !self.out.tampered {
                panic!("honest traffic was refused: {e}");
            }
            if !matches!(e, RingError::BadMessage(_)) {
                assert!(self.proxy.rx.is_poisoned(), "error without poison: {e}");
            }
            self.out.error = Some(e);
            self.dead = true;
        }
    }

    fn drain_app(&mut self) {
        if self.app_dead {
            return;
        }
        let (_, m, e) = drain(Rx {
            rx: &mut self.app.rx,
            re: &mut self.app_re,
            expected: &mut self.to_app,
            tampered: self.out.tampered,
            max_message: MAX_MESSAGE as usize,
        });
        self.out.app_messages += m;
        if let Some(e) = e {
            assert!(self.out.tampered, "honest traffic was refused: {e}");
            self.app_dead = true;
        }
    }

    fn app_send(&mut self, kind: FrameKind, stream: u64, meta_len: usize, data: Vec<u8>) {
        let mut prog = WriteProgress { sent: 0 };
        for _ in 0..send_rounds(data.len(), self.app.tx.max_payload()) {
            let r = write_message(
                &mut self.app.tx,
                kind,
                stream,
                meta_len,
                &[&data],
                &mut prog,
            );
            self.app.tx.publish();
            match r {
                Ok(true) => {
                    self.to_proxy.push_back(Expected {
                        kind,
                        stream,
                        meta_len,
                        data,
                    });
                    return;
                }
                Ok(false) => self.drain_proxy(),
                Err(e) => {
                    assert!(self.out.tampered, "honest send failed: {e}");
                    return;
                }
            }
        }
        assert!(self.out.tampered, "honest send made no progress");
    }

    fn proxy_send(&mut self, data: Vec<u8>) {
        let mut prog = WriteProgress { sent: 0 };
        for _ in 0..send_rounds(data.len(), self.proxy.tx.max_payload()) {
            let tx: &mut Producer = &mut self.proxy.tx;
            let r = write_message(tx, FrameKind::Response, 1, 0, &[&data], &mut prog);
            tx.publish();
            match r {
                Ok(true) => {
                    self.to_app.push_back(Expected {
                        kind: FrameKind::Response,
                        stream: 1,
                        meta_len: 0,
                        data,
                    });
                    self.drain_app();
                    return;
                }
                Ok(false) => {
                    self.drain_app();
                    if self.app_dead {
                        return;
                    }
                }
                Err(e) => {
                    assert!(self.out.tampered, "proxy send failed: {e}");
                    self.out.proxy_tx_error.get_or_insert(e);
                    return;
                }
            }
        }
        assert!(self.out.tampered, "proxy send made no progress");
    }
}
