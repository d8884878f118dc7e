//! The meshshm session protocol, written once and shared by the client shim
//! and the proxy: the control-socket handshake (Hello → Welcome | Reject),
//! request and response metadata, the control socket's default path, fd
//! passing, and framing of the same frames over a byte stream (TCP).
//!
//! The byte layouts are documented in `docs/PROTOCOL.md`, whose test
//! vectors `tests/vectors.rs` checks.
#![deny(unsafe_code)] // one exception: adopting fds received by SCM_RIGHTS
#![deny(missing_docs)]

mod codec;
mod fdpass;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz;
mod handshake;
mod meta;
mod path;
mod stream;

pub use codec::DecodeError;
pub use fdpass::{peer_credentials, recv_with_fds, send_with_fds, PeerCred};
pub use handshake::{
    frame_control, read_control, write_control, Answer, Hello, Reject, Role, Welcome, MAX_CONTROL,
    PROTOCOL_VERSION,
};
pub use meta::{status, HeaderIter, RequestMeta, ResponseMeta};
pub use path::default_socket_path;
pub use stream::{encode_frame, FrameDecoder};
