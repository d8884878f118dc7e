//! `meshshm-ring`: the shared-memory data plane of meshshm.
//!
//! A [`Segment`] is one shared mapping per connection (memfd or a 0600 file
//! in `/dev/shm`), holding two lock-free single-producer/single-consumer byte
//! rings and a [`WakeCell`] per side. Each side turns it into an
//! [`Endpoint`]: a [`Producer`] for what it sends, a [`Consumer`] for what it
//! receives, a [`Waiter`] to sleep on, and a [`Notifier`] to wake the peer.
//!
//! Frames ([`FrameHeader`], 24 bytes, 8-byte aligned) are written and read in
//! place; messages larger than a frame travel as fragments
//! ([`write_message`], [`Reassembler`]). The peer is untrusted: every counter
//! and header read from shared memory is bounded first, and a violation
//! poisons the ring with a [`RingError`] instead of panicking.
//!
//! ```
//! use meshshm_ring::{Bell, Segment, SegmentOptions, Side, FrameHeader, FrameKind};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let seg = Segment::create(&SegmentOptions::default())?;
//! // The creator passes `seg.fd()` to the peer, which calls Segment::open.
//! let peer_seg = Segment::open(seg.fd().try_clone_to_owned()?)?;
//! let (app_bell, proxy_bell) = (Bell::eventfd()?, Bell::eventfd()?);
//! let mut proxy = seg.into_endpoint(Side::Proxy, proxy_bell.clone(), app_bell.clone());
//! let mut app = peer_seg.into_endpoint(Side::App, app_bell, proxy_bell);
//!
//! app.tx.try_push(FrameHeader::single(FrameKind::Request, 1, 0, 2), &[b"hi"])?;
//! app.flush(); // one store publishes every staged frame; wakes the proxy only if it sleeps
//! let f = proxy.rx.peek()?.expect("published");
//! assert_eq!(f.payload(), b"hi");
//! f.release();
//! proxy.flush();
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![warn(unreachable_pub)]

mod doorbell;
mod error;
mod fragment;
mod frame;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod hostile;
mod ring;
mod segment;
mod spin;
mod sync;
#[cfg(all(feature = "uring", target_os = "linux"))]
pub mod uring;

pub use doorbell::{
    heap_doorbell, Bell, Notifier, WaitOutcome, Waiter, WakeCell, WANT_ANY, WANT_DATA, WANT_ROOM,
};
pub use error::{RingError, SegmentError};
pub use fragment::{
    next_frame_len, next_streamed_frame_len, write_message, write_message_rest,
    write_message_streamed, Message, Reassembler, WriteProgress, STREAM_FRAGMENT, STREAM_FROM,
};
pub use frame::{
    wire_len, FrameHeader, FrameKind, HeaderError, FLAG_CONT, FLAG_MORE, FRAME_ALIGN, HEADER_LEN,
};
pub use ring::{heap_ring, Consumer, Frame, Grant, Producer, RingCtl, MIN_CAPACITY};
pub use segment::{
    sweep_stale, Backing, Endpoint, Segment, SegmentHeader, SegmentOptions, Side,
    DEFAULT_MAX_MESSAGE, LAYOUT_VERSION, MAGIC, MAX_CAPACITY,
};
pub use spin::{
    AdaptiveSpin, FollowPlan, FollowPoll, IdlePoll, PollPlan, FOLLOW_FROM, FOLLOW_MAX_US,
    FOLLOW_NS_PER_KIB, PROBE_EVERY,
};
