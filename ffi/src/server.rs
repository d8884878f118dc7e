//! `meshshm_server`: an app that serves one service through the proxy.

use std::ffi::{c_char, c_int, c_void};
use std::time::Instant;

use crate::args::{bytes_arg, out_arg, path_arg, str_arg, wait_timeout};
use crate::buffer::{free_c_string, give_c_string, meshshm_buffer};
use crate::error::{guard, guard_void, Fail, Res, MESHSHM_ERR_TIMEOUT, MESHSHM_OK};
use crate::options::meshshm_headers;

/// An app registered with the proxy as the handler of one service (opaque).
///
/// Thread-safety: `meshshm_server_next` takes one request at a time (threads
/// calling it together take turns); `meshshm_server_reply` may be called from
/// any thread, also while another thread waits in `meshshm_server_next`.
/// `meshshm_server_close` must be called once, after every other use of the
/// server has returned.
#[allow(non_camel_case_types)]
pub struct meshshm_server {
    _private: [u8; 0],
}

/// A request delivered by `meshshm_server_next`. Its strings and body belong
/// to libmeshshm until `meshshm_request_free`.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug)]
pub struct meshshm_request {
    /// answer with this id (`meshshm_server_reply`)
    pub id: u64,
    /// the service called (NUL-terminated UTF-8)
    pub service: *mut c_char,
    /// the method called (NUL-terminated UTF-8)
    pub method: *mut c_char,
    /// the request body
    pub body: meshshm_buffer,
    /// milliseconds left before the caller gives up, as of delivery (0: the
    /// caller set no deadline)
    pub timeout_ms: u32,
    /// 0 = low, 1 = normal, 2+ = high
    pub priority: u8,
}

/// The `shim::Server` behind `s`.
///
/// # Safety
/// `s` is NULL or a pointer returned by `meshshm_server_bind`, not yet closed.
unsafe fn server<'a>(s: *mut meshshm_server) -> Res<&'a shim::Server> {
    // SAFETY: such a pointer is a live `Box<shim::Server>` (see
    // `meshshm_server_bind`); we take shared access, and `Server` is `Sync`.
    unsafe { s.cast::<shim::Server>().as_ref() }.ok_or_else(|| Fail::arg("server is NULL"))
}

/// Connect to the proxy (`socket_path` NULL or "": the default, as for
/// `meshshm_client_connect`) and register as the handler of `service`.
/// On success `*out` is a new server, to be released with
/// `meshshm_server_close`.
///
/// # Safety
/// `socket_path` and `service` are NULL or NUL-terminated strings; `out` is
/// NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn meshshm_server_bind(
    socket_path: *const c_char,
    service: *const c_char,
    out: *mut *mut meshshm_server,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's promises, passed on (here and below).
        let out = unsafe { out_arg(out, "out") }?;
        *out = std::ptr::null_mut();
        // SAFETY: as above.
        let path = unsafe { path_arg(socket_path) }?;
        // SAFETY: as above.
        let service = unsafe { str_arg(service, "service") }?;
        if service.is_empty() {
            return Err(Fail::arg("service is empty"));
        }
        let s = shim::Server::bind(path, service)?;
        *out = Box::into_raw(Box::new(s)).cast::<meshshm_server>();
        Ok(MESHSHM_OK)
    })
}

/// Wait for the next request, at most `timeout_ms` milliseconds (negative:
/// as long as it takes; 0: do not wait). `MESHSHM_OK`: `*req` holds the
/// request (release it with `meshshm_request_free`, answer it with
/// `meshshm_server_reply`). `MESHSHM_ERR_TIMEOUT`: no request came in time
/// (`*req` is zeroed). `MESHSHM_ERR_PROXY_GONE`: the proxy went away (bind
/// again to go on).
///
/// # Safety
/// `s` is a live server (or NULL); `req` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn meshshm_server_next(
    s: *mut meshshm_server,
    req: *mut meshshm_request,
    timeout_ms: i32,
) -> c_int {
    // SAFETY: the caller's promises, passed on; NULL headers are not filled in.
    unsafe { meshshm_server_next_with_headers(s, req, std::ptr::null_mut(), timeout_ms) }
}

/// As `meshshm_server_next`, and the request's headers in `*headers`
/// (release them with `meshshm_headers_free`; `{ NULL, 0 }` when the caller
/// sent none, and on an error). `headers` may be NULL: then this is
/// `meshshm_server_next`. The request's priority is `req->priority`.
///
/// # Safety
/// As `meshshm_server_next`; `headers` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn meshshm_server_next_with_headers(
    s: *mut meshshm_server,
    req: *mut meshshm_request,
    headers: *mut meshshm_headers,
    timeout_ms: i32,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's promises, passed on (here and below).
        let out = unsafe { out_arg(req, "req") }?;
        *out = meshshm_request {
            id: 0,
            service: std::ptr::null_mut(),
            method: std::ptr::null_mut(),
            body: meshshm_buffer::EMPTY,
            timeout_ms: 0,
            priority: 0,
        };
        // SAFETY: NULL is refused by `as_mut`; otherwise the caller promises
        // a writable `meshshm_headers`.
        let mut headers = unsafe { headers.as_mut() };
        if let Some(h) = headers.as_deref_mut() {
            *h = meshshm_headers::EMPTY;
        }
        // SAFETY: as above.
        let s = unsafe { server(s) }?;
        let Some(r) = s.next(wait_timeout(timeout_ms))? else {
            return Err(Fail::new(MESHSHM_ERR_TIMEOUT, "no request came in time"));
        };
        let left = r.deadline.map_or(0, |d| {
            let ms = d.saturating_duration_since(Instant::now()).as_millis();
            ms.clamp(1, u128::from(u32::MAX)) as u32
        });
        *out = meshshm_request {
            id: r.id,
            service: give_c_string(&r.service),
            method: give_c_string(&r.method),
            body: meshshm_buffer::from_vec(r.body),
            timeout_ms: left,
            priority: r.priority,
        };
        if let Some(h) = headers {
            *h = meshshm_headers::from_vec(r.headers);
        }
        Ok(MESHSHM_OK)
    })
}

/// Whether no one waits for the answer to request `request_id` any more:
/// 1 if its caller stopped waiting (it timed out or went away, and the
/// proxy sent a cancel), if it was answered already, or if this server never
/// handed it out; 0 while the caller still waits; or a negative error code
/// (`MESHSHM_ERR_PROTOCOL`, `MESHSHM_ERR_INVALID_ARGUMENT`, ...).
///
/// A handler doing long work can check now and then and give up: a reply to
/// a cancelled request is dropped without being sent (and
/// `meshshm_server_reply` still returns `MESHSHM_OK`). Never waits; may be
/// called from any thread, also while another waits in `meshshm_server_next`.
///
/// # Safety
/// `s` is a live server (or NULL).
#[no_mangle]
pub unsafe extern "C" fn meshshm_server_is_cancelled(
    s: *mut meshshm_server,
    request_id: u64,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's promise.
        let s = unsafe { server(s) }?;
        Ok(c_int::from(s.is_cancelled(request_id)?))
    })
}

/// Answer request `request_id` with `status` (0 = OK; else an error status
/// such as 3 invalid argument, 5 not found, 13 internal) and `len` bytes at
/// `body`. May be called from any thread.
///
/// # Safety
/// `s` is a live server (or NULL); `body` points to `len` readable bytes
/// (or is NULL when `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn meshshm_server_reply(
    s: *mut meshshm_server,
    request_id: u64,
    status: i32,
    body: *const c_void,
    len: usize,
) -> c_int {
    // SAFETY: the caller's promises, passed on; a NULL message is "".
    unsafe { meshshm_server_reply_message(s, request_id, status, std::ptr::null(), body, len) }
}

/// As `meshshm_server_reply`, with an error message that the caller receives
/// (`meshshm_last_error()` on its side). `message` may be NULL.
///
/// # Safety
/// As `meshshm_server_reply`; `message` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn meshshm_server_reply_message(
    s: *mut meshshm_server,
    request_id: u64,
    status: i32,
    message: *const c_char,
    body: *const c_void,
    len: usize,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's promises, passed on (here and below).
        let s = unsafe { server(s) }?;
        let status = u32::try_from(status).map_err(|_| Fail::arg("status is negative"))?;
        let message = if message.is_null() {
            ""
        } else {
            // SAFETY: as above.
            unsafe { str_arg(message, "message") }?
        };
        // SAFETY: as above.
        let body = unsafe { bytes_arg(body, len) }?;
        s.reply_with(request_id, status, message, &[], body)?;
        Ok(MESHSHM_OK)
    })
}

/// Release the strings and body of a request and zero them. NULL is fine;
/// freeing twice is harmless.
///
/// # Safety
/// `r` is NULL or a request filled in by `meshshm_server_next` (or zeroed).
#[no_mangle]
pub unsafe extern "C" fn meshshm_request_free(r: *mut meshshm_request) {
    guard_void(|| {
        // SAFETY: the caller promises NULL or a request of ours.
        if let Some(r) = unsafe { r.as_mut() } {
            free_c_string(&mut r.service);
            free_c_string(&mut r.method);
            r.body.release();
        }
    });
}

/// Unregister and disconnect. NULL is fine.
///
/// # Safety
/// `s` is NULL or a live server, not used by any other thread now or after.
#[no_mangle]
pub unsafe extern "C" fn meshshm_server_close(s: *mut meshshm_server) {
    guard_void(|| {
        if !s.is_null() {
            // SAFETY: a live server is a `Box<shim::Server>` leaked by
            // `meshshm_server_bind`; the caller gives it back exactly once.
            drop(unsafe { Box::from_raw(s.cast::<shim::Server>()) });
        }
    });
}
