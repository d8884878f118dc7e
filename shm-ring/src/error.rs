use std::io;

/// Why a ring refused to go on. Every variant but [`RingError::Full`] and
/// [`RingError::TooLarge`] means the peer broke the protocol: the ring is
/// poisoned and every later call returns [`RingError::Poisoned`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// Not enough free space now; try again after the consumer releases.
    #[error("ring full")]
    Full,
    /// The frame can never fit in this ring (split it into fragments).
    #[error("frame of {0} bytes exceeds the ring's maximum frame payload")]
    TooLarge(usize),
    /// The peer's counter moved backwards or past what is possible.
    #[error("peer counter out of range (read {read}, expected {lo}..={hi})")]
    CounterOutOfRange {
        /// the value read from shared memory
        read: u64,
        /// lowest acceptable value
        lo: u64,
        /// highest acceptable value
        hi: u64,
    },
    /// A frame header that cannot be valid.
    #[error("malformed frame at offset {offset}: {reason}")]
    BadFrame {
        /// ring offset (counter value) of the header
        offset: u64,
        /// what was wrong
        reason: &'static str,
    },
    /// A message broke the fragmentation rules or the size limit.
    #[error("bad message: {0}")]
    BadMessage(&'static str),
    /// An earlier violation poisoned this ring.
    #[error("ring poisoned by an earlier protocol violation")]
    Poisoned,
}

/// Errors of segment creation and opening.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// what we were doing
        op: &'static str,
        /// the OS error
        #[source]
        source: io::Error,
    },
    /// The mapping does not hold a segment this version understands.
    #[error("invalid segment: {0}")]
    Invalid(String),
    /// Requested sizes are not acceptable.
    #[error("invalid segment options: {0}")]
    Options(String),
}

impl SegmentError {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Self {
        SegmentError::Io { op, source }
    }
}
