//! The frame: a fixed 24-byte little-endian header followed by the payload,
//! padded to a multiple of 8 bytes. The same bytes travel in the rings and
//! over TCP.
//!
//! ```text
//! offset size field
//!      0    4 len        payload bytes in this frame (not counting header or padding)
//!      4    1 kind       FrameKind
//!      5    1 flags      bit 0 MORE: more fragments of this message follow
//!                        bit 1 CONT: this frame continues a message
//!      6    2 reserved   must be 0
//!      8    4 meta_len   metadata bytes at the start of the message (first frame; 0 on CONT)
//!     12    4 msg_len    total message bytes, metadata + body (first frame; 0 on CONT)
//!     16    8 stream_id
//!     24    - payload, then 0..7 zero bytes of padding
//! ```

/// Size of a frame header in bytes.
pub const HEADER_LEN: usize = 24;
/// Frames start at multiples of this.
pub const FRAME_ALIGN: usize = 8;

/// Flag: more fragments of this message follow.
pub const FLAG_MORE: u8 = 0b01;
/// Flag: this frame continues a message begun by an earlier frame.
pub const FLAG_CONT: u8 = 0b10;
const KNOWN_FLAGS: u8 = FLAG_MORE | FLAG_CONT;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Ring-internal: skip to the start of the data area.
    Pad = 0,
    /// A request (metadata: service, method, headers, deadline, priority).
    Request = 1,
    /// A response (metadata: status, message, headers).
    Response = 2,
    /// Cancel the stream (no payload).
    Cancel = 3,
    /// Liveness probe; answered with Pong carrying the same payload.
    Ping = 4,
    /// Answer to Ping.
    Pong = 5,
    /// The sender will accept no new streams; in-flight ones finish.
    Goaway = 6,
}

impl FrameKind {
    /// Decode a kind byte; `None` for kinds that do not exist.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => FrameKind::Pad,
            1 => FrameKind::Request,
            2 => FrameKind::Response,
            3 => FrameKind::Cancel,
            4 => FrameKind::Ping,
            5 => FrameKind::Pong,
            6 => FrameKind::Goaway,
            _ => return None,
        })
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// payload bytes in this frame
    pub len: u32,
    /// what the frame carries
    pub kind: FrameKind,
    /// [`FLAG_MORE`], [`FLAG_CONT`]
    pub flags: u8,
    /// metadata bytes at the start of the message (first frame only)
    pub meta_len: u32,
    /// total message bytes (first frame only)
    pub msg_len: u32,
    /// the stream this frame belongs to
    pub stream_id: u64,
}

/// Why a header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// kind byte is not a [`FrameKind`]
    UnknownKind,
    /// a flag bit that is not defined is set
    UnknownFlags,
    /// reserved bytes are not zero
    Reserved,
    /// the lengths contradict each other
    Lengths,
}

impl HeaderError {
    /// A short description for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            HeaderError::UnknownKind => "unknown frame kind",
            HeaderError::UnknownFlags => "unknown flag bits",
            HeaderError::Reserved => "reserved bytes not zero",
            HeaderError::Lengths => "inconsistent lengths",
        }
    }
}

impl FrameHeader {
    /// A single-frame message of `kind` with `meta_len` metadata bytes out of `len`.
    pub fn single(kind: FrameKind, stream_id: u64, meta_len: u32, len: u32) -> Self {
        FrameHeader {
            len,
            kind,
            flags: 0,
            meta_len,
            msg_len: len,
            stream_id,
        }
    }

    /// Encode into the 24 wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.len.to_le_bytes());
        b[4] = self.kind as u8;
        b[5] = self.flags;
        b[8..12].copy_from_slice(&self.meta_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.msg_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.stream_id.to_le_bytes());
        b
    }

    /// Decode and check the header on its own (bounds against the ring are
    /// the caller's business). Never panics, whatever the bytes.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, HeaderError> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let kind = FrameKind::from_u8(b[4]).ok_or(HeaderError::UnknownKind)?;
        let flags = b[5];
        if flags & !KNOWN_FLAGS != 0 {
            return Err(HeaderError::UnknownFlags);
        }
        if b[6] != 0 || b[7] != 0 {
            return Err(HeaderError::Reserved);
        }
        let mut sid = [0u8; 8];
        sid.copy_from_slice(&b[16..24]);
        let h = FrameHeader {
            len: u32_at(0),
            kind,
            flags,
            meta_len: u32_at(8),
            msg_len: u32_at(12),
            stream_id: u64::from_le_bytes(sid),
        };
        h.check()?;
        Ok(h)
    }

    fn check(&self) -> Result<(), HeaderError> {
        if self.kind == FrameKind::Pad {
            return if self.flags == 0 && self.meta_len == 0 && self.msg_len == 0 {
                Ok(())
            } else {
                Err(HeaderError::Lengths)
            };
        }
        if self.flags & FLAG_CONT != 0 {
            if self.meta_len != 0 || self.msg_len != 0 {
                return Err(HeaderError::Lengths);
            }
        } else {
            if self.meta_len > self.msg_len || self.len > self.msg_len {
                return Err(HeaderError::Lengths);
            }
            if self.flags & FLAG_MORE == 0 && self.len != self.msg_len {
                return Err(HeaderError::Lengths);
            }
        }
        Ok(())
    }

    /// Bytes this frame takes in a ring or on the wire, header and padding included.
    pub fn wire_len(&self) -> usize {
        wire_len(self.len as usize)
    }
}

/// Bytes a frame with `payload` bytes takes, header and padding included.
#[inline]
pub const fn wire_len(payload: usize) -> usize {
    (HEADER_LEN + payload + FRAME_ALIGN - 1) & !(FRAME_ALIGN - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_vector() {
        let h = FrameHeader::single(FrameKind::Request, 0x0102_0304_0506_0708, 5, 9);
        let b = h.encode();
        assert_eq!(
            b,
            [9, 0, 0, 0, 1, 0, 0, 0, 5, 0, 0, 0, 9, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]
        );
        assert_eq!(FrameHeader::decode(&b).unwrap(), h);
        assert_eq!(h.wire_len(), 40);
    }

    #[test]
    fn rejects_garbage() {
        let mut b = FrameHeader::single(FrameKind::Ping, 1, 0, 0).encode();
        b[4] = 99;
        assert_eq!(FrameHeader::decode(&b), Err(HeaderError::UnknownKind));
        b[4] = 1;
        b[5] = 0x80;
        assert_eq!(FrameHeader::decode(&b), Err(HeaderError::UnknownFlags));
        b[5] = 0;
        b[6] = 1;
        assert_eq!(FrameHeader::decode(&b), Err(HeaderError::Reserved));
        b[6] = 0;
        b[8] = 1; // meta_len 1 > msg_len 0
        assert_eq!(FrameHeader::decode(&b), Err(HeaderError::Lengths));
    }
}
