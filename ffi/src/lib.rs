//! `libmeshshm`: the C ABI of meshshm, for C, C++, Python, Java, Go and any
//! language that can call C.
//!
//! This crate builds `libmeshshm.so` (soname `libmeshshm.so.0`) and
//! `libmeshshm.a` on top of the Rust client shim (crate `meshshm`). The C
//! header `include/meshshm.h` is generated from this source by cbindgen and
//! checked in (`tests/header.rs` fails when it is stale; run it with
//! `MESHSHM_BLESS=1` to rewrite it).
//!
//! Conventions of the ABI:
//! - Handles (`meshshm_client`, `meshshm_server`) are opaque; each has one
//!   function that creates it and one that releases it.
//! - Functions return `int`: `MESHSHM_OK` (0) or a negative `MESHSHM_ERR_*`
//!   code; `meshshm_strerror(code)` names the code and `meshshm_last_error()`
//!   gives the message of this thread's most recent failure.
//! - Every buffer, request or completion the library fills in has its own
//!   free function; freeing twice, or freeing NULL, is harmless.
//! - NULL or bad arguments give `MESHSHM_ERR_INVALID_ARGUMENT`; no Rust
//!   panic crosses the boundary (it becomes `MESHSHM_ERR_INTERNAL`).
//!
//! From C:
//!
//! ```c
//! #include <meshshm.h>
//!
//! meshshm_client *c;
//! if (meshshm_client_connect(NULL, &c) != MESHSHM_OK) {
//!     fprintf(stderr, "connect: %s\n", meshshm_last_error());
//!     return 1;
//! }
//! meshshm_buffer resp;
//! int rc = meshshm_client_call(c, "echo", "Echo", "ping", 4, 1000, &resp);
//! if (rc == MESHSHM_OK) {
//!     fwrite(resp.data, 1, resp.len, stdout);
//!     meshshm_buffer_free(&resp);
//! } else {
//!     fprintf(stderr, "%s: %s\n", meshshm_strerror(rc), meshshm_last_error());
//! }
//! meshshm_client_close(c);
//! ```
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod args;
mod asynch;
mod buffer;
mod client;
mod error;
mod options;
mod server;

use std::ffi::{c_char, c_int};

pub use asynch::{
    meshshm_client_cancel, meshshm_client_fd, meshshm_client_poll, meshshm_client_send,
    meshshm_client_send_opts, meshshm_completion, meshshm_completion_free,
};
pub use buffer::{meshshm_buffer, meshshm_buffer_free};
pub use client::{
    meshshm_client, meshshm_client_call, meshshm_client_call_opts, meshshm_client_close,
    meshshm_client_connect, meshshm_client_connect_opts,
};
pub use error::{
    MESHSHM_ERR_CANCELLED, MESHSHM_ERR_CLOSED, MESHSHM_ERR_CONNECT, MESHSHM_ERR_INTERNAL,
    MESHSHM_ERR_INVALID_ARGUMENT, MESHSHM_ERR_NOT_FOUND, MESHSHM_ERR_PROTOCOL,
    MESHSHM_ERR_PROXY_GONE, MESHSHM_ERR_REJECTED, MESHSHM_ERR_STATUS, MESHSHM_ERR_SYSTEM,
    MESHSHM_ERR_TIMEOUT, MESHSHM_OK,
};
pub use options::{
    meshshm_call_options, meshshm_client_options, meshshm_header, meshshm_headers,
    meshshm_headers_free, MESHSHM_SPIN_DEFAULT,
};
pub use server::{
    meshshm_request, meshshm_request_free, meshshm_server, meshshm_server_bind,
    meshshm_server_close, meshshm_server_is_cancelled, meshshm_server_next,
    meshshm_server_next_with_headers, meshshm_server_reply, meshshm_server_reply_message,
};

/// The ABI major version: the `0` of the soname `libmeshshm.so.0`.
pub const MESHSHM_ABI_VERSION: c_int = 0;

// The handles are shared across threads by C callers; what they point to must allow it.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<client::ClientHandle>();
    send_sync::<shim::Server>();
};

/// The message of the most recent failure on the calling thread ("" if
/// none). The pointer stays valid until the next failing call on this
/// thread; copy the text to keep it. Never NULL.
#[no_mangle]
pub extern "C" fn meshshm_last_error() -> *const c_char {
    std::panic::catch_unwind(error::last_error).unwrap_or(c"".as_ptr())
}

/// The status (e.g. 5, not found) of the most recent `MESHSHM_ERR_STATUS`
/// on the calling thread; 0 if the last failure was of another kind.
#[no_mangle]
pub extern "C" fn meshshm_last_status() -> u32 {
    std::panic::catch_unwind(error::last_status).unwrap_or(0)
}

/// A static description of an error code (`MESHSHM_OK` or a `MESHSHM_ERR_*`).
/// Never NULL; unknown codes give "unknown error code".
#[no_mangle]
pub extern "C" fn meshshm_strerror(code: c_int) -> *const c_char {
    error::describe(code).as_ptr()
}

/// A static name of a service status (0 "ok", 4 "deadline exceeded", 5 "not
/// found", ...). Never NULL.
#[no_mangle]
pub extern "C" fn meshshm_status_name(status: u32) -> *const c_char {
    match shim::status::name(status) {
        "ok" => c"ok",
        "cancelled" => c"cancelled",
        "unknown" => c"unknown",
        "invalid argument" => c"invalid argument",
        "deadline exceeded" => c"deadline exceeded",
        "not found" => c"not found",
        "permission denied" => c"permission denied",
        "resource exhausted" => c"resource exhausted",
        "internal" => c"internal",
        "unavailable" => c"unavailable",
        _ => c"unrecognised status",
    }
    .as_ptr()
}

/// The library's version ("0.1.0"), static.
#[no_mangle]
pub extern "C" fn meshshm_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

#[cfg(test)]
mod tests;
