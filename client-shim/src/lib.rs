//! `meshshm`: the application side of the meshshm service-mesh transport.
//!
//! A [`Client`] calls services through the local sidecar proxy; a
//! [`Server`] serves one. Requests and responses travel through lock-free
//! rings in shared memory set up over the proxy's control socket, or, when
//! asked (or as a fallback), over loopback TCP with the very same frames.
//!
//! ```no_run
//! use std::time::Duration;
//! // The proxy's default socket ($MESHSHM_SOCKET, $XDG_RUNTIME_DIR/meshshm/proxy.sock
//! // or /tmp/meshshm-<uid>/proxy.sock).
//! let client = meshshm::Client::connect(None)?;
//! let body = client.call("echo", "Echo", b"ping", Duration::from_secs(1))?;
//! assert_eq!(body, b"ping");
//! # Ok::<(), meshshm::Error>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

#[cfg(feature = "tokio")]
mod asynch;
mod client;
mod conn;
mod core;
mod error;
mod pipeline;
#[cfg(feature = "tokio")]
mod room;
mod server;
mod shm;
mod tcp;

#[cfg(feature = "tokio")]
pub use asynch::AsyncClient;
pub use client::{Client, ClientOptions, Transport};
pub use error::{Error, Result};
pub use meshshm_proto::{default_socket_path, status};
pub use pipeline::{Pipeline, Reply};
pub use server::{Request, Server};

use std::time::Duration;

/// One call: where to, what, and how.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// destination service
    pub service: &'a str,
    /// method of the service
    pub method: &'a str,
    /// request body
    pub body: &'a [u8],
    /// request headers
    pub headers: &'a [(&'a str, &'a [u8])],
    /// give up (and cancel) after this long; sent to the proxy as the deadline
    pub timeout: Option<Duration>,
    /// 0 = low (shed first under overload), 1 = normal, 2+ = high
    pub priority: u8,
}

/// A response, whatever its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// a [`status`] code; 0 is OK
    pub status: u32,
    /// the error message ("" on success)
    pub message: String,
    /// response headers
    pub headers: Vec<(String, Vec<u8>)>,
    /// the body
    pub body: Vec<u8>,
}
