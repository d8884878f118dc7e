//! The same frames over a byte stream (loopback TCP): header, payload,
//! padding to 8 bytes, exactly as in a ring. A message goes as one frame
//! (no fragmentation is needed on a stream), but a decoder that meets
//! fragments hands them on for reassembly all the same.

use meshshm_ring::{wire_len, FrameHeader, FrameKind, HEADER_LEN};

use crate::codec::DecodeError;

/// Append one frame (header, the concatenated `parts`, zero padding) to `out`.
///
/// # Panics
/// If the parts add up to more than `u32::MAX` bytes.
pub fn encode_frame(
    out: &mut Vec<u8>,
    kind: FrameKind,
    stream_id: u64,
    meta_len: usize,
    parts: &[&[u8]],
) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len32 = u32::try_from(len).expect("message under 4 GiB");
    let hdr = FrameHeader::single(kind, stream_id, meta_len as u32, len32);
    out.reserve(wire_len(len));
    out.extend_from_slice(&hdr.encode());
    for p in parts {
        out.extend_from_slice(p);
    }
    out.resize(out.len() + wire_len(len) - HEADER_LEN - len, 0);
}

/// Finds frames in a buffer of received stream bytes (sans-I/O: the
/// blocking shim and the async proxy both feed it).
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_frame: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames with more than `max_frame` payload bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder { max_frame }
    }

    /// Look at the start of `buf`: `Ok(None)` if a whole frame is not there
    /// yet; else its header and the frame's total length in `buf` (payload is
    /// `buf[HEADER_LEN..HEADER_LEN + len]`).
    ///
    /// # Errors
    /// A malformed header, a pad frame (not allowed on a stream), or an
    /// oversized frame: close the connection.
    pub fn decode(&self, buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, DecodeError> {
        let Some(raw) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let raw: &[u8; HEADER_LEN] = raw.try_into().expect("24 bytes");
        let hdr = FrameHeader::decode(raw).map_err(|e| DecodeError::Invalid(e.as_str()))?;
        if hdr.kind == FrameKind::Pad {
            return Err(DecodeError::Invalid("pad frame on a stream"));
        }
        if hdr.len as usize > self.max_frame {
            return Err(DecodeError::Invalid(
                "frame larger than the maximum message",
            ));
        }
        let total = hdr.wire_len();
        if buf.len() < total {
            return Ok(None);
        }
        Ok(Some((hdr, total)))
    }
}
