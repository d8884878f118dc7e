//! Messages of any size up to a configured maximum, carried as one frame or
//! as a run of fragments (`MORE`/`CONT` flags), and put back together.
//!
//! Fragments of one message are contiguous in a ring: a producer finishes a
//! message before it starts the next, so the consumer keeps at most one
//! partial message per ring.

use crate::error::RingError;
use crate::frame::{FrameHeader, FrameKind, FLAG_CONT, FLAG_MORE, HEADER_LEN};
use crate::ring::Producer;

/// Where a message being written stands; keep it to resume after
/// [`RingError::Full`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteProgress {
    /// message bytes already staged
    pub sent: usize,
}

/// Stage `parts` (concatenated: metadata then body) as one message of `kind`
/// on `stream_id`, from `progress.sent` on, in as many frames as needed.
/// Returns `Ok(true)` when all of it is staged, `Ok(false)` when the ring
/// filled first (publish, wait for room, call again with the same progress).
///
/// # Errors
/// [`RingError::TooLarge`] when the message exceeds `u32::MAX` bytes; ring
/// errors from the producer.
pub fn write_message(
    tx: &mut Producer,
    kind: FrameKind,
    stream_id: u64,
    meta_len: usize,
    parts: &[&[u8]],
    progress: &mut WriteProgress,
) -> Result<bool, RingError> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    write_from(
        tx, kind, stream_id, meta_len, total, 0, parts, progress, None,
    )
}

/// Messages larger than this go streamed by [`write_message_streamed`].
pub const STREAM_FROM: usize = 128 << 10;
/// The fragment size of a streamed message.
pub const STREAM_FRAGMENT: usize = 128 << 10;

/// As [`write_message`], for a message whose consumer takes it in as it
/// comes (the proxy's answers: the app's reassembler copies each fragment
/// once, into the body it hands over): one larger than [`STREAM_FROM`]
/// goes in fragments of [`STREAM_FRAGMENT`] even when one frame would hold
/// it, and `publish` is called after each fragment but the last (to
/// publish it and ring the consumer), so that the consumer copies one
/// while the next is written. 1 MiB echoed: the app reads the answer while
/// the proxy writes it, instead of after.
///
/// # Errors
/// As [`write_message`].
pub fn write_message_streamed(
    tx: &mut Producer,
    kind: FrameKind,
    stream_id: u64,
    meta_len: usize,
    parts: &[&[u8]],
    progress: &mut WriteProgress,
    publish: &mut dyn FnMut(&mut Producer),
) -> Result<bool, RingError> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    write_from(
        tx,
        kind,
        stream_id,
        meta_len,
        total,
        0,
        parts,
        progress,
        Some(publish),
    )
}

/// [`next_frame_len`] for [`write_message_streamed`].
pub fn next_streamed_frame_len(tx: &Producer, total: usize, sent: usize) -> usize {
    let n = next_frame_len(tx, total, sent);
    if total > STREAM_FROM {
        n.min(STREAM_FRAGMENT)
    } else {
        n
    }
}

/// The payload length of the next frame [`write_message`] writes for a
/// message of `total` bytes with `sent` of them written (for a writer that
/// wants to know whether there is room for it: [`Producer::fits_now`]).
pub fn next_frame_len(tx: &Producer, total: usize, sent: usize) -> usize {
    let remaining = total.saturating_sub(sent);
    // A message that fits one frame goes as one (up to the whole ring: the
    // consumer then reads it in place, with no reassembly). Larger ones go in
    // fragments of at most half the ring, so that the producer writes one
    // while the consumer reads the previous.
    if total <= tx.max_payload() {
        remaining
    } else {
        remaining.min((tx.capacity() / 2).saturating_sub(HEADER_LEN).max(8))
    }
}

/// Resume a message of `total` bytes whose bytes before `base` are already
/// staged (`progress.sent >= base > 0`), from `rest`, its bytes from `base`
/// to the end (a copy kept by a writer that could not wait for room).
///
/// # Errors
/// As [`write_message`]; [`RingError::TooLarge`] also when `rest` and
/// `base` do not add up to `total` or `progress` is outside them.
pub fn write_message_rest(
    tx: &mut Producer,
    kind: FrameKind,
    stream_id: u64,
    total: usize,
    base: usize,
    rest: &[u8],
    progress: &mut WriteProgress,
) -> Result<bool, RingError> {
    if base == 0 || base + rest.len() != total || !(base..=total).contains(&progress.sent) {
        return Err(RingError::TooLarge(total));
    }
    write_from(tx, kind, stream_id, 0, total, base, &[rest], progress, None)
}

/// Stage bytes `progress.sent..total` of a message; `parts` hold its bytes
/// from `base` on.
#[allow(clippy::too_many_arguments)]
fn write_from(
    tx: &mut Producer,
    kind: FrameKind,
    stream_id: u64,
    meta_len: usize,
    total: usize,
    base: usize,
    parts: &[&[u8]],
    progress: &mut WriteProgress,
    mut stream: Option<&mut dyn FnMut(&mut Producer)>,
) -> Result<bool, RingError> {
    if total > u32::MAX as usize || meta_len > total {
        return Err(RingError::TooLarge(total));
    }
    loop {
        let first = progress.sent == 0;
        let remaining = total - progress.sent;
        if !first && remaining == 0 {
            return Ok(true);
        }
        let chunk = if stream.is_some() {
            next_streamed_frame_len(tx, total, progress.sent)
        } else {
            next_frame_len(tx, total, progress.sent)
        };
        let mut g = match tx.reserve(chunk) {
            Ok(g) => g,
            Err(RingError::Full) => return Ok(false),
            Err(e) => return Err(e),
        };
        // Gather [sent, sent + chunk) of the concatenated parts.
        let mut skip = progress.sent - base;
        let mut off = 0;
        for p in parts {
            if off == chunk {
                break;
            }
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            let n = (p.len() - skip).min(chunk - off);
            g.write_at(off, &p[skip..skip + n]);
            off += n;
            skip = 0;
        }
        let more = chunk < remaining;
        let hdr = FrameHeader {
            len: chunk as u32,
            kind,
            flags: if more { FLAG_MORE } else { 0 } | if first { 0 } else { FLAG_CONT },
            meta_len: if first { meta_len as u32 } else { 0 },
            msg_len: if first { total as u32 } else { 0 },
            stream_id,
        };
        g.commit(hdr);
        progress.sent += chunk;
        if !more {
            return Ok(true);
        }
        if let Some(publish) = stream.as_mut() {
            publish(tx);
        }
    }
}

/// A whole message: its kind, stream, metadata and body.
#[derive(Debug)]
pub struct Message<'a> {
    /// frame kind of the message
    pub kind: FrameKind,
    /// its stream
    pub stream_id: u64,
    meta: &'a [u8],
    body: Body<'a>,
}

/// Where a message's body is: in the ring (one frame), or in the
/// reassembler's buffer (fragments), which [`Message::take_body`] hands
/// over without a copy.
#[derive(Debug)]
enum Body<'a> {
    InPlace(&'a [u8]),
    Gathered(&'a mut Vec<u8>),
}

impl Message<'_> {
    /// The metadata bytes.
    pub fn meta(&self) -> &[u8] {
        self.meta
    }

    /// The body bytes.
    pub fn body(&self) -> &[u8] {
        match &self.body {
            Body::InPlace(b) => b,
            Body::Gathered(b) => b,
        }
    }

    /// Metadata and body, in bytes.
    pub fn len(&self) -> usize {
        self.meta.len() + self.body().len()
    }

    /// True for a message of no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Metadata then body, copied.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(self.meta);
        v.extend_from_slice(self.body());
        v
    }

    /// The body as an owned vector: a copy of a message read in place
    /// (shared memory must be copied out anyway), the reassembler's buffer
    /// itself for a fragmented one (its bytes were copied once, fragment by
    /// fragment, as they arrived). Leaves the body empty.
    pub fn take_body(&mut self) -> Vec<u8> {
        match &mut self.body {
            Body::InPlace(b) => {
                let v = b.to_vec();
                *b = &[];
                v
            }
            Body::Gathered(b) => std::mem::take(*b),
        }
    }
}

/// Puts fragments back together, with a bound on message size.
pub struct Reassembler {
    max_message: usize,
    open: Option<Open>,
    /// The open message's metadata, then its body (kept apart, so that the
    /// body can be handed over whole: [`Message::take_body`]).
    meta: Vec<u8>,
    body: Vec<u8>,
}

struct Open {
    kind: FrameKind,
    stream_id: u64,
    meta_len: usize,
    msg_len: usize,
}

impl Reassembler {
    /// A reassembler that refuses messages over `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Reassembler {
            max_message,
            open: None,
            meta: Vec::new(),
            body: Vec::new(),
        }
    }

    /// True while a fragmented message is half received.
    pub fn in_progress(&self) -> bool {
        self.open.is_some()
    }

    /// Feed one frame. Returns the message when this frame completes one: a
    /// single-frame message is handed back in place (borrowing `payload`,
    /// no copy); a fragmented one from the internal buffer.
    ///
    /// # Errors
    /// [`RingError::BadMessage`] for any break of the fragment rules or the
    /// size bound; the caller should drop the connection.
    pub fn feed<'a>(
        &'a mut self,
        hdr: &FrameHeader,
        payload: &'a [u8],
    ) -> Result<Option<Message<'a>>, RingError> {
        let more = hdr.flags & FLAG_MORE != 0;
        if hdr.flags & FLAG_CONT == 0 {
            if self.open.is_some() {
                return Err(RingError::BadMessage(
                    "new message before the previous one ended",
                ));
            }
            if hdr.msg_len as usize > self.max_message {
                return Err(RingError::BadMessage("message larger than max_message"));
            }
            if payload.len() != hdr.len as usize {
                return Err(RingError::BadMessage("payload length mismatch"));
            }
            if !more {
                let (meta, body) = payload.split_at((hdr.meta_len as usize).min(payload.len()));
                return Ok(Some(Message {
                    kind: hdr.kind,
                    stream_id: hdr.stream_id,
                    meta,
                    body: Body::InPlace(body),
                }));
            }
            if payload.is_empty() || payload.len() >= hdr.msg_len as usize {
                return Err(RingError::BadMessage(
                    "first fragment empty or already complete",
                ));
            }
            let meta_len = hdr.meta_len as usize;
            self.meta.clear();
            self.body.clear();
            // The whole body at once, so that no reallocation copies it
            // again as fragments arrive; up to 8 MiB (a peer that declares
            // a large message and sends a few bytes of it gets no more).
            let body_len = hdr.msg_len as usize - meta_len.min(hdr.msg_len as usize);
            self.body.reserve(body_len.min(8 << 20));
            self.gather(meta_len, payload);
            self.open = Some(Open {
                kind: hdr.kind,
                stream_id: hdr.stream_id,
                meta_len: hdr.meta_len as usize,
                msg_len: hdr.msg_len as usize,
            });
            return Ok(None);
        }
        let Some(open) = &self.open else {
            return Err(RingError::BadMessage("continuation without a message"));
        };
        if open.kind != hdr.kind || open.stream_id != hdr.stream_id {
            return Err(RingError::BadMessage(
                "continuation of another stream or kind",
            ));
        }
        if self.meta.len() + self.body.len() + payload.len() > open.msg_len {
            return Err(RingError::BadMessage(
                "fragments exceed the declared length",
            ));
        }
        if more && payload.is_empty() {
            return Err(RingError::BadMessage("empty non-final fragment"));
        }
        let (meta_len, msg_len) = (open.meta_len, open.msg_len);
        self.gather(meta_len, payload);
        if more {
            return Ok(None);
        }
        if self.meta.len() + self.body.len() != msg_len {
            return Err(RingError::BadMessage(
                "message ended short of its declared length",
            ));
        }
        let open = self.open.take().expect("checked above");
        Ok(Some(Message {
            kind: open.kind,
            stream_id: open.stream_id,
            meta: &self.meta,
            body: Body::Gathered(&mut self.body),
        }))
    }

    /// Append `payload`: the bytes before `meta_len` of the message to the
    /// metadata, the rest to the body.
    fn gather(&mut self, meta_len: usize, payload: &[u8]) {
        let to_meta = meta_len.saturating_sub(self.meta.len()).min(payload.len());
        self.meta.extend_from_slice(&payload[..to_meta]);
        self.body.extend_from_slice(&payload[to_meta..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::heap_ring;

    type Got = Option<(u64, Vec<u8>, Vec<u8>)>;

    /// Read every frame published in `rx` into `re` (a whole message into
    /// `got`), hand the room back; returns the frames read.
    fn read_all(rx: &mut crate::ring::Consumer, re: &mut Reassembler, got: &mut Got) -> usize {
        let mut frames = 0;
        while let Some(f) = rx.peek().unwrap() {
            frames += 1;
            let h = *f.header();
            if let Some(mut m) = re.feed(&h, f.payload()).unwrap() {
                *got = Some((m.stream_id, m.meta().to_vec(), m.take_body()));
            }
            f.release();
        }
        rx.publish();
        frames
    }

    /// Write `meta` + `body` as one message through a ring of `capacity`
    /// (waiting for room by reading), read it back; returns the frames it
    /// took and the message.
    fn through_ring(capacity: usize, meta: &[u8], body: &[u8]) -> (usize, Got) {
        let (mut tx, mut rx) = heap_ring(capacity);
        let mut prog = WriteProgress { sent: 0 };
        let mut re = Reassembler::new(1 << 20);
        let mut got = None;
        let mut frames = 0;
        loop {
            let done = write_message(
                &mut tx,
                FrameKind::Request,
                9,
                meta.len(),
                &[meta, body],
                &mut prog,
            )
            .unwrap();
            tx.publish();
            frames += read_all(&mut rx, &mut re, &mut got);
            if done {
                return (frames, got);
            }
        }
    }

    #[test]
    fn big_message_fragments_and_reassembles() {
        let meta = b"meta".to_vec();
        let body: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (frames, got) = through_ring(8192, &meta, &body);
        assert!(frames > 10, "expected fragmentation, got {frames} frames");
        assert_eq!(got, Some((9, meta, body)));
    }

    #[test]
    fn a_streamed_message_is_published_fragment_by_fragment_and_its_body_handed_over() {
        let (mut tx, mut rx) = heap_ring(4 << 20);
        let meta = b"response-meta".to_vec();
        let body: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 13 % 251) as u8).collect();
        // One frame would hold it (4 MiB ring): streamed, it goes in
        // STREAM_FRAGMENT pieces, each published before the next is written.
        let total = meta.len() + body.len();
        assert_eq!(next_streamed_frame_len(&tx, total, 0), STREAM_FRAGMENT);
        assert_eq!(next_frame_len(&tx, total, 0), total);
        let mut published = Vec::new();
        let mut prog = WriteProgress { sent: 0 };
        let done = write_message_streamed(
            &mut tx,
            FrameKind::Response,
            5,
            meta.len(),
            &[&meta, &body],
            &mut prog,
            &mut |tx| {
                tx.publish();
                published.push(tx.bytes_sent());
            },
        )
        .unwrap();
        assert!(done);
        let frames = total.div_ceil(STREAM_FRAGMENT);
        assert_eq!(
            published.len(),
            frames - 1,
            "a publish per fragment but the last"
        );
        assert_eq!(published[0], STREAM_FRAGMENT as u64);
        tx.publish();
        let mut re = Reassembler::new(2 << 20);
        let mut n = 0;
        let mut taken = None;
        while let Some(f) = rx.peek().unwrap() {
            n += 1;
            let h = *f.header();
            if let Some(mut m) = re.feed(&h, f.payload()).unwrap() {
                assert_eq!((m.kind, m.stream_id), (FrameKind::Response, 5));
                assert_eq!(m.meta(), &meta[..]);
                taken = Some(m.take_body());
                // Handed over, not copied: the message's body is now empty.
                assert!(m.body().is_empty());
            }
            f.release();
        }
        assert_eq!(n, frames);
        assert!(taken == Some(body), "body differs");
    }

    #[test]
    fn metadata_longer_than_the_first_fragment_is_split_off_the_body() {
        // Fragments of at most 2 KiB: the metadata spans two of them.
        let meta: Vec<u8> = (0..3000u32).map(|i| (i % 7) as u8).collect();
        let body: Vec<u8> = (0..5000u32).map(|i| (i % 11) as u8).collect();
        let (frames, got) = through_ring(4096, &meta, &body);
        assert!(frames >= 4, "{frames} frames");
        assert!(got == Some((9, meta, body)), "metadata or body differs");
    }

    #[test]
    fn a_message_resumed_from_a_copy_of_its_rest_reassembles() {
        let (mut tx, mut rx) = heap_ring(8192);
        let meta = b"service/method".to_vec();
        let body: Vec<u8> = (0..40_000u32).map(|i| (i * 13 % 251) as u8).collect();
        let whole = [meta.as_slice(), body.as_slice()].concat();
        let mut prog = WriteProgress { sent: 0 };
        let first = write_message(
            &mut tx,
            FrameKind::Request,
            3,
            meta.len(),
            &[&meta, &body],
            &mut prog,
        )
        .unwrap();
        assert!(
            !first && prog.sent > meta.len(),
            "the ring filled mid-message"
        );
        // The writer keeps a copy of the rest and drops the original.
        let base = prog.sent;
        let rest = whole[base..].to_vec();
        for bad in [0, base + 1] {
            let mut p = prog;
            let r = write_message_rest(
                &mut tx,
                FrameKind::Request,
                3,
                whole.len(),
                bad,
                &rest,
                &mut p,
            );
            assert!(r.is_err(), "base {bad} does not match the rest");
        }
        let mut re = Reassembler::new(1 << 20);
        let mut got = None;
        loop {
            tx.publish();
            read_all(&mut rx, &mut re, &mut got);
            if got.is_some() {
                break;
            }
            write_message_rest(
                &mut tx,
                FrameKind::Request,
                3,
                whole.len(),
                base,
                &rest,
                &mut prog,
            )
            .unwrap();
        }
        assert_eq!(got, Some((3, meta, body)));
        assert_eq!(prog.sent, whole.len());
    }

    #[test]
    fn rejects_never_ending_and_overlong() {
        let mut re = Reassembler::new(100);
        let first = FrameHeader {
            len: 10,
            kind: FrameKind::Request,
            flags: FLAG_MORE,
            meta_len: 0,
            msg_len: 50,
            stream_id: 1,
        };
        assert!(re.feed(&first, &[0; 10]).unwrap().is_none());
        let cont = FrameHeader {
            len: 0,
            flags: FLAG_MORE | FLAG_CONT,
            meta_len: 0,
            msg_len: 0,
            ..first
        };
        assert!(re.feed(&cont, &[]).is_err());
        let mut re = Reassembler::new(100);
        let huge = FrameHeader {
            msg_len: 101,
            ..first
        };
        assert!(re.feed(&huge, &[0; 10]).is_err());
    }
}
