//! The SPSC byte ring: a power-of-two data area and two monotonically
//! increasing `u64` counters, each on its own cache line.
//!
//! Frames are written in place (`reserve` → fill → `commit`) and read in place
//! (`peek` → read → `release`). Nothing becomes visible to the other side
//! until `publish`, so any number of frames go out with one store.
//!
//! A frame never straddles the end of the data area: if it would, the producer
//! writes a `Pad` frame to the end (or, when fewer than [`HEADER_LEN`] bytes
//! remain, both sides skip them by rule) and starts again at offset 0.
//!
//! The peer is not trusted. The consumer copies each header out before it
//! checks it, and bounds every counter it reads; a violation poisons the ring
//! for good.

use std::ptr::NonNull;
use std::sync::Arc;

use crossbeam_utils::CachePadded;

use crate::error::RingError;
use crate::frame::{wire_len, FrameHeader, FrameKind, HEADER_LEN};
use crate::sync::{AtomicU64, Ordering};

/// The two counters of a ring, as laid out in shared memory.
#[repr(C)]
pub struct RingCtl {
    /// Bytes published by the producer. Written by the producer only;
    /// invariant (for an honest producer): `head <= tail <= head + capacity`.
    pub(crate) tail: CachePadded<AtomicU64>,
    /// Bytes released by the consumer. Written by the consumer only;
    /// invariant: `head <= tail`.
    pub(crate) head: CachePadded<AtomicU64>,
}

impl RingCtl {
    /// Fresh counters (both zero).
    pub fn new() -> Self {
        RingCtl {
            tail: CachePadded::new(AtomicU64::new(0)),
            head: CachePadded::new(AtomicU64::new(0)),
        }
    }
}

impl Default for RingCtl {
    fn default() -> Self {
        Self::new()
    }
}

/// Smallest ring capacity accepted.
pub const MIN_CAPACITY: usize = 4096;

/// Raw view of one ring: where its counters and data live, and who keeps
/// that memory alive.
#[derive(Clone)]
pub(crate) struct RawRing {
    ctl: NonNull<RingCtl>,
    data: NonNull<u8>,
    cap: usize,
    _owner: Arc<dyn Send + Sync>,
}

// SAFETY: RawRing only hands out pointers; the memory they point to is kept
// alive by `_owner` (Send + Sync), and all access to the counters is atomic.
unsafe impl Send for RawRing {}

impl RawRing {
    /// # Safety
    /// `ctl` must point to a valid, aligned `RingCtl` and `data` to `cap`
    /// bytes, both alive as long as `owner` is, and `cap` must be a power of
    /// two `>= MIN_CAPACITY`.
    pub(crate) unsafe fn new(
        ctl: NonNull<RingCtl>,
        data: NonNull<u8>,
        cap: usize,
        owner: Arc<dyn Send + Sync>,
    ) -> Self {
        debug_assert!(cap.is_power_of_two() && cap >= MIN_CAPACITY);
        RawRing {
            ctl,
            data,
            cap,
            _owner: owner,
        }
    }

    fn ctl(&self) -> &RingCtl {
        // SAFETY: `new`'s contract: ctl is valid and aligned for the life of
        // `_owner`, which self holds; RingCtl is only atomics, so shared
        // references to it are sound even with the peer writing.
        unsafe { self.ctl.as_ref() }
    }

    /// Largest payload of a single frame: the whole data area. A frame that
    /// would cross the end waits behind a pad frame (written on its own as
    /// soon as the pad's bytes are free) and then starts at offset 0, so any
    /// frame up to the capacity fits once the ring is empty.
    fn max_payload(&self) -> usize {
        self.cap - HEADER_LEN
    }
}

/// Heap-backed memory for an in-process ring (tests, benchmarks, loom).
struct HeapRegion {
    ctl: Box<RingCtl>,
    data: Box<[u64]>,
}

/// A ring in ordinary memory, for two threads of one process.
///
/// # Examples
/// ```
/// use meshshm_ring::{heap_ring, FrameHeader, FrameKind};
/// let (mut tx, mut rx) = heap_ring(4096);
/// tx.try_push(FrameHeader::single(FrameKind::Request, 7, 0, 5), &[b"hello"]).unwrap();
/// tx.publish();
/// let f = rx.peek().unwrap().unwrap();
/// assert_eq!(f.payload(), b"hello");
/// f.release();
/// ```
///
/// # Panics
/// If `capacity` is not a power of two of at least [`MIN_CAPACITY`].
pub fn heap_ring(capacity: usize) -> (Producer, Consumer) {
    assert!(
        capacity.is_power_of_two() && capacity >= MIN_CAPACITY,
        "ring capacity must be a power of two >= {MIN_CAPACITY}"
    );
    let mut region = Box::new(HeapRegion {
        ctl: Box::new(RingCtl::new()),
        data: vec![0u64; capacity / 8].into_boxed_slice(),
    });
    let ctl = NonNull::from(&mut *region.ctl);
    let data = NonNull::new(region.data.as_mut_ptr().cast::<u8>()).expect("non-null");
    let owner: Arc<dyn Send + Sync> = Arc::new(HeapOwner(region));
    // SAFETY: ctl and data point into `region`, a heap allocation that does
    // not move when the Box moves and lives as long as `owner`; data is
    // `capacity` bytes; capacity was checked above.
    let raw = unsafe { RawRing::new(ctl, data, capacity, owner) };
    (Producer::new(raw.clone()), Consumer::new(raw))
}

struct HeapOwner(#[allow(dead_code)] Box<HeapRegion>);
// SAFETY: the region is only reached through RawRing's raw pointers, whose
// accesses follow the SPSC protocol (atomics for counters, disjoint byte
// ranges for data).
unsafe impl Sync for HeapOwner {}
// SAFETY: as above; nothing in HeapRegion is tied to a thread.
unsafe impl Send for HeapOwner {}

/// Copy `src` to `dst`, avoiding the `rep movsb` 4 KiB-aliasing cliff: when
/// `(dst - src) mod 4096` is in `1..64`, glibc's `rep movsb` path (used from
/// a few KiB up) runs many times slower, so such copies go in 2 KiB pieces,
/// each below that threshold, which take the vector path instead.
///
/// # Safety
/// `dst` must be valid for `src.len()` bytes of writes, not overlapping `src`.
#[inline]
pub(crate) unsafe fn copy_to(dst: *mut u8, src: &[u8]) {
    const PIECE: usize = 2048;
    let delta = (dst as usize).wrapping_sub(src.as_ptr() as usize) & 4095;
    if src.len() > PIECE && delta != 0 && delta < 64 {
        let mut off = 0;
        while off < src.len() {
            let n = PIECE.min(src.len() - off);
            // SAFETY: off + n <= src.len(); dst is valid for src.len() bytes
            // (caller), and the ranges do not overlap (caller).
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(off), dst.add(off), n) };
            off += n;
        }
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
    }
}

/// The writing end of a ring. One per ring; `&mut self` everywhere makes it
/// single-producer by construction.
pub struct Producer {
    ring: RawRing,
    /// Next write position (staged; may be ahead of `published`).
    tail: u64,
    /// Last value stored to the shared `tail`.
    published: u64,
    /// Last `head` read from the consumer; `head_cache <= published`.
    head_cache: u64,
    poisoned: bool,
    /// Payload bytes of the frames committed so far.
    sent: u64,
}

impl Producer {
    pub(crate) fn new(ring: RawRing) -> Self {
        Producer {
            ring,
            sent: 0,
            tail: 0,
            published: 0,
            head_cache: 0,
            poisoned: false,
        }
    }

    /// Data-area size in bytes.
    pub fn capacity(&self) -> usize {
        self.ring.cap
    }

    /// Largest payload one frame can carry; larger messages travel as fragments.
    pub fn max_payload(&self) -> usize {
        self.ring.max_payload()
    }

    /// True once the consumer broke the protocol.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Re-read the consumer's counter (SYNC POINT B, acquire side: pairs with
    /// the consumer's release store in [`Consumer::publish`], so its reads of
    /// released bytes happen before we overwrite them).
    fn refresh_head(&mut self) -> Result<(), RingError> {
        let head = self.ring.ctl().head.load(Ordering::Acquire);
        if head < self.head_cache || head > self.published {
            self.poisoned = true;
            return Err(RingError::CounterOutOfRange {
                read: head,
                lo: self.head_cache,
                hi: self.published,
            });
        }
        self.head_cache = head;
        Ok(())
    }

    fn free(&self) -> usize {
        self.ring.cap - (self.tail - self.head_cache) as usize
    }

    /// Bytes written and not yet released, by the consumer's counter read
    /// now, for fill metrics: nothing else changes (the cache, the poisoned
    /// state). A counter out of range reads as the cached one; the next
    /// real re-read reports it.
    pub fn in_use_now(&self) -> usize {
        let head = self.ring.ctl().head.load(Ordering::Relaxed);
        let head = if (self.head_cache..=self.published).contains(&head) {
            head
        } else {
            self.head_cache
        };
        (self.tail - head) as usize
    }

    /// Free bytes now (re-reads the consumer's counter).
    pub fn free_space(&mut self) -> Result<usize, RingError> {
        if self.poisoned {
            return Err(RingError::Poisoned);
        }
        self.refresh_head()?;
        Ok(self.free())
    }

    /// Reserve room for a frame with `len` payload bytes. Fill the payload
    /// through the returned [`Grant`], then [`Grant::commit`] it.
    ///
    /// # Errors
    /// [`RingError::Full`] when the space is not free yet (nothing of the
    /// frame was written; a pad to the end of the ring may have been, which
    /// the next `publish` makes visible), [`RingError::TooLarge`] when
    /// `len > max_payload()`.
    pub fn reserve(&mut self, len: usize) -> Result<Grant<'_>, RingError> {
        if self.poisoned {
            return Err(RingError::Poisoned);
        }
        if len > self.max_payload() {
            return Err(RingError::TooLarge(len));
        }
        let need = wire_len(len);
        let pos = (self.tail as usize) & (self.ring.cap - 1);
        let to_end = self.ring.cap - pos;
        if to_end < need {
            // The frame would cross the end: pad to the end first, on its
            // own, as soon as those bytes are free (a pad plus a frame of more
            // than half the ring would never fit together). The pad is
            // committed even if the frame then has to wait: a later reserve
            // starts at offset 0.
            self.make_room(to_end)?;
            if to_end >= HEADER_LEN {
                let pad = FrameHeader {
                    len: (to_end - HEADER_LEN) as u32,
                    kind: FrameKind::Pad,
                    flags: 0,
                    meta_len: 0,
                    msg_len: 0,
                    stream_id: 0,
                };
                self.write_header(pos, &pad);
            }
            self.tail += to_end as u64;
        }
        self.make_room(need)?;
        let pos = (self.tail as usize) & (self.ring.cap - 1);
        Ok(Grant {
            producer: self,
            pos,
            len,
        })
    }

    /// `Ok` if `n` bytes are free, re-reading the consumer's counter only
    /// when the cached one says they are not.
    /// Whether a frame of `len` payload bytes can be written now: a
    /// [`Producer::reserve`] whose grant is dropped. Like it, it may stage
    /// the pad to the end of the ring, so that a frame that must start at
    /// offset 0 gets there once the consumer has passed the pad.
    ///
    /// # Errors
    /// As [`Producer::reserve`], except that a full ring is `Ok(false)`.
    pub fn fits_now(&mut self, len: usize) -> Result<bool, RingError> {
        match self.reserve(len) {
            Ok(_grant) => Ok(true),
            Err(RingError::Full) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn make_room(&mut self, n: usize) -> Result<(), RingError> {
        if self.free() < n {
            self.refresh_head()?;
            if self.free() < n {
                return Err(RingError::Full);
            }
        }
        Ok(())
    }

    fn write_header(&mut self, pos: usize, h: &FrameHeader) {
        let bytes = h.encode();
        debug_assert!(pos + HEADER_LEN <= self.ring.cap);
        // SAFETY: pos + HEADER_LEN <= cap (reserve only places headers where a
        // whole frame or pad header fits before the end), and these bytes are
        // free: they lie in [tail, head_cache + cap), which the consumer has
        // released (acquire in refresh_head).
        unsafe { copy_to(self.ring.data.as_ptr().add(pos), &bytes) };
    }

    /// Copy a whole frame in: header plus the concatenation of `parts` as payload.
    /// `hdr.len` is set from the parts.
    ///
    /// # Errors
    /// As [`Producer::reserve`].
    pub fn try_push(&mut self, mut hdr: FrameHeader, parts: &[&[u8]]) -> Result<(), RingError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut g = self.reserve(len)?;
        let mut off = 0;
        for p in parts {
            g.write_at(off, p);
            off += p.len();
        }
        hdr.len = len as u32;
        g.commit(hdr);
        Ok(())
    }

    /// Make every committed frame visible to the consumer with one store.
    /// Returns whether anything new was published.
    pub fn publish(&mut self) -> bool {
        if self.tail == self.published {
            return false;
        }
        // SYNC POINT A (release side): the frame bytes written above happen
        // before the consumer's acquire load of `tail` sees this value.
        self.ring.ctl().tail.store(self.tail, Ordering::Release);
        self.published = self.tail;
        true
    }

    /// Bytes committed but not yet published.
    pub fn unpublished(&self) -> usize {
        (self.tail - self.published) as usize
    }

    /// Payload bytes of the frames committed since the ring was made: the
    /// difference of two readings is what went out between them.
    pub fn bytes_sent(&self) -> u64 {
        self.sent
    }
}

/// Room for one frame, reserved by [`Producer::reserve`]. Dropping it
/// without `commit` leaves the ring as if nothing was reserved (a pad frame
/// may already have been staged; it is harmless).
pub struct Grant<'a> {
    producer: &'a mut Producer,
    pos: usize,
    len: usize,
}

impl Grant<'_> {
    /// The payload area, `len` bytes, in shared memory.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        // SAFETY: [pos + HEADER_LEN, pos + HEADER_LEN + len) lies inside the
        // data area (reserve placed the frame where wire_len(len) fits before
        // the end: where it stood, or at offset 0 behind a pad, and
        // wire_len(len) <= capacity by max_payload) and in the free
        // part of the ring, which the consumer does not read until we publish.
        // A hostile consumer process could still write these bytes; that can
        // only corrupt the frame it will itself receive.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.producer.ring.data.as_ptr().add(self.pos + HEADER_LEN),
                self.len,
            )
        }
    }

    /// Copy `src` into the payload at `off`, avoiding the 4 KiB-aliasing cliff.
    ///
    /// # Panics
    /// If `off + src.len()` exceeds the reserved length.
    pub fn write_at(&mut self, off: usize, src: &[u8]) {
        assert!(off + src.len() <= self.len, "write past the grant");
        // SAFETY: bounds checked just above against the grant, which lies in
        // the free part of the data area (see payload_mut).
        unsafe {
            copy_to(
                self.producer
                    .ring
                    .data
                    .as_ptr()
                    .add(self.pos + HEADER_LEN + off),
                src,
            )
        }
    }

    /// Stage the frame (visible after [`Producer::publish`]). `hdr.len` may
    /// be smaller than what was reserved.
    ///
    /// # Panics
    /// If `hdr.len` exceeds the reserved length.
    pub fn commit(self, hdr: FrameHeader) {
        assert!(hdr.len as usize <= self.len, "frame longer than its grant");
        let pos = self.pos;
        self.producer.write_header(pos, &hdr);
        self.producer.tail += hdr.wire_len() as u64;
        self.producer.sent += u64::from(hdr.len);
    }
}

/// The reading end of a ring. One per ring.
pub struct Consumer {
    ring: RawRing,
    /// Next read position (staged; may be ahead of `published`).
    head: u64,
    /// Last value stored to the shared `head`.
    published: u64,
    /// Last `tail` read from the producer; `head <= tail_cache <= published + cap`.
    tail_cache: u64,
    poisoned: bool,
}

impl Consumer {
    pub(crate) fn new(ring: RawRing) -> Self {
        Consumer {
            ring,
            head: 0,
            published: 0,
            tail_cache: 0,
            poisoned: false,
        }
    }

    /// Data-area size in bytes.
    pub fn capacity(&self) -> usize {
        self.ring.cap
    }

    /// Bytes published and not yet read, by the producer's counter read
    /// now, for fill metrics: nothing else changes (the cache, the poisoned
    /// state). A counter out of range reads as the cached one; the next
    /// real re-read reports it.
    pub fn pending_now(&self) -> usize {
        let tail = self.ring.ctl().tail.load(Ordering::Relaxed);
        let hi = self.published + self.ring.cap as u64;
        let tail = if (self.tail_cache..=hi).contains(&tail) {
            tail
        } else {
            self.tail_cache
        };
        (tail - self.head) as usize
    }

    /// Largest payload one frame can carry.
    pub fn max_payload(&self) -> usize {
        self.ring.max_payload()
    }

    /// True once the producer broke the protocol.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Addresses of the data area (for the hostile-producer harness, which
    /// checks that every frame handed out lies inside it).
    #[cfg(feature = "fuzzing")]
    pub(crate) fn data_area(&self) -> std::ops::Range<usize> {
        let base = self.ring.data.as_ptr() as usize;
        base..base + self.ring.cap
    }

    fn poison(&mut self, e: RingError) -> RingError {
        self.poisoned = true;
        e
    }

    fn bad(&mut self, reason: &'static str) -> RingError {
        let offset = self.head;
        self.poison(RingError::BadFrame { offset, reason })
    }

    /// Re-read the producer's counter (SYNC POINT A, acquire side: pairs
    /// with the release store in [`Producer::publish`]).
    fn refresh_tail(&mut self) -> Result<(), RingError> {
        let tail = self.ring.ctl().tail.load(Ordering::Acquire);
        let hi = self.published + self.ring.cap as u64;
        if tail < self.tail_cache || tail > hi {
            let lo = self.tail_cache;
            return Err(self.poison(RingError::CounterOutOfRange { read: tail, lo, hi }));
        }
        self.tail_cache = tail;
        Ok(())
    }

    /// Whether a frame (or padding) is waiting, re-reading the producer's
    /// counter if needed. Cheap enough to spin on.
    pub fn has_data(&mut self) -> Result<bool, RingError> {
        if self.poisoned {
            return Err(RingError::Poisoned);
        }
        if self.head == self.tail_cache {
            self.refresh_tail()?;
        }
        Ok(self.head != self.tail_cache)
    }

    /// The next frame, if one is published. The header is copied out and
    /// checked before anything else is read.
    ///
    /// # Errors
    /// Any protocol violation poisons the ring and is returned.
    pub fn peek(&mut self) -> Result<Option<Frame<'_>>, RingError> {
        loop {
            if !self.has_data()? {
                return Ok(None);
            }
            let avail = (self.tail_cache - self.head) as usize;
            let pos = (self.head as usize) & (self.ring.cap - 1);
            let to_end = self.ring.cap - pos;
            if to_end < HEADER_LEN {
                // Skip-by-rule gap at the end of the data area.
                if avail < to_end {
                    return Err(self.bad("tail inside the end-of-ring gap"));
                }
                self.head += to_end as u64;
                continue;
            }
            if avail < HEADER_LEN {
                return Err(self.bad("partial header published"));
            }
            let mut raw = [0u8; HEADER_LEN];
            // SAFETY: pos + HEADER_LEN <= cap (to_end >= HEADER_LEN above),
            // and the bytes are published (avail >= HEADER_LEN). They are
            // copied out once, so a producer changing them now cannot make
            // what we check differ from what we use.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.ring.data.as_ptr().add(pos),
                    raw.as_mut_ptr(),
                    HEADER_LEN,
                )
            };
            let hdr = match FrameHeader::decode(&raw) {
                Ok(h) => h,
                Err(e) => return Err(self.bad(e.as_str())),
            };
            if hdr.kind == FrameKind::Pad {
                if hdr.len as usize + HEADER_LEN != to_end {
                    return Err(self.bad("pad frame does not reach the end of the ring"));
                }
                if avail < to_end {
                    return Err(self.bad("pad frame past tail"));
                }
                self.head += to_end as u64;
                continue;
            }
            if hdr.len as usize > self.ring.max_payload() {
                return Err(self.bad("frame longer than the maximum payload"));
            }
            let wl = hdr.wire_len();
            if wl > to_end {
                return Err(self.bad("frame crosses the end of the ring"));
            }
            if wl > avail {
                return Err(self.bad("frame extends past the published tail"));
            }
            return Ok(Some(Frame {
                consumer: self,
                hdr,
                pos,
            }));
        }
    }

    /// Hand every released byte back to the producer with one store.
    /// Returns whether anything new was published.
    pub fn publish(&mut self) -> bool {
        if self.head == self.published {
            return false;
        }
        // SYNC POINT B (release side): our reads of the released frames
        // happen before the producer's acquire load sees this value.
        self.ring.ctl().head.store(self.head, Ordering::Release);
        self.published = self.head;
        true
    }

    /// Bytes released but not yet published.
    pub fn unpublished(&self) -> usize {
        (self.head - self.published) as usize
    }
}

/// A frame in the ring, borrowed until [`Frame::release`] (or drop, which
/// leaves it in place to be peeked again).
pub struct Frame<'a> {
    consumer: &'a mut Consumer,
    hdr: FrameHeader,
    pos: usize,
}

impl Frame<'_> {
    /// The validated header (a private copy).
    pub fn header(&self) -> &FrameHeader {
        &self.hdr
    }

    /// The payload, in shared memory. Its bounds are checked; its bytes are
    /// the peer's, and a hostile peer may change them while they are read,
    /// so parse them as untrusted (or copy them out first).
    pub fn payload(&self) -> &[u8] {
        // SAFETY: peek checked pos + wire_len(len) <= cap and that the frame
        // is published (<= tail). The producer does not reuse these bytes
        // until we publish a head past them.
        unsafe {
            std::slice::from_raw_parts(
                self.consumer.ring.data.as_ptr().add(self.pos + HEADER_LEN),
                self.hdr.len as usize,
            )
        }
    }

    /// Consume the frame (handed back to the producer at the next
    /// [`Consumer::publish`]).
    pub fn release(self) {
        self.consumer.head += self.hdr.wire_len() as u64;
    }
}
