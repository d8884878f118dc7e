use std::io;

use meshshm_proto::status;

/// Why a call or connection failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The proxy could not be reached (socket missing, refused, ...).
    #[error("cannot connect to the proxy at {target}: {reason}")]
    Connect {
        /// socket path or TCP address
        target: String,
        /// what went wrong
        reason: String,
    },
    /// The proxy refused the handshake.
    #[error("the proxy rejected the connection: {0}")]
    Rejected(String),
    /// The proxy went away (crash, kill, shutdown) while the call was in flight.
    #[error("the proxy is gone: {0}")]
    ProxyGone(String),
    /// The deadline passed before a response arrived (the call was cancelled).
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The service answered with a non-OK status.
    #[error("{} ({code}): {message}", status::name(*code))]
    Status {
        /// a `meshshm_proto::status` code
        code: u32,
        /// the message that came with it
        message: String,
    },
    /// The peer broke the protocol; the connection was closed.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// An argument was refused (e.g. a body above the maximum message size).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The handle was closed.
    #[error("closed")]
    Closed,
}

impl Error {
    pub(crate) fn connect(target: impl std::fmt::Display, e: impl std::fmt::Display) -> Self {
        Error::Connect {
            target: target.to_string(),
            reason: e.to_string(),
        }
    }

    /// Whether retrying on a new connection may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Connect { .. } | Error::ProxyGone(_))
    }
}

impl From<meshshm_ring::RingError> for Error {
    fn from(e: meshshm_ring::RingError) -> Self {
        Error::Protocol(e.to_string())
    }
}

pub(crate) fn gone(e: io::Error) -> Error {
    Error::ProxyGone(e.to_string())
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
