//! `meshshm_client`: outbound calls, blocking.

use std::ffi::{c_char, c_int, c_void};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use crate::args::{bytes_arg, out_arg, path_arg, str_arg};
use crate::asynch::AsyncState;
use crate::buffer::meshshm_buffer;
use crate::error::{guard, guard_void, response_result, Fail, Res, MESHSHM_OK};
use crate::options::{
    call_options, client_options, meshshm_call_options, meshshm_client_options, CallOpts,
};

/// A connection to the sidecar proxy for outbound calls (opaque).
///
/// Thread-safety: every `meshshm_client_*` function except
/// `meshshm_client_close` may be called on the same client from any number
/// of threads at once; calls from several threads share the connection and
/// are in flight together. `meshshm_client_close` must be called once, after
/// every other use of the client has returned.
#[allow(non_camel_case_types)]
pub struct meshshm_client {
    _private: [u8; 0],
}

/// What a `*mut meshshm_client` really points to.
pub(crate) struct ClientHandle {
    pub(crate) client: shim::Client,
    /// How it connected (the asynchronous side connects the same way).
    pub(crate) opts: shim::ClientOptions,
    /// The asynchronous side, set up on first use.
    pub(crate) asynch: OnceLock<Arc<AsyncState>>,
    pub(crate) asynch_init: Mutex<()>,
}

/// The handle behind `c`.
///
/// # Safety
/// `c` is NULL or a pointer returned by `meshshm_client_connect` and not yet
/// closed.
pub(crate) unsafe fn handle<'a>(c: *mut meshshm_client) -> Res<&'a ClientHandle> {
    // SAFETY: such a pointer is a live `Box<ClientHandle>` (see
    // `meshshm_client_connect`); shared access is all we take, and
    // `ClientHandle` is `Sync`.
    unsafe { c.cast::<ClientHandle>().as_ref() }.ok_or_else(|| Fail::arg("client is NULL"))
}

/// The arguments every call takes, checked: the client and the request.
pub(crate) struct CallArgs<'a> {
    pub(crate) h: &'a ClientHandle,
    pub(crate) service: &'a str,
    pub(crate) method: &'a str,
    pub(crate) body: &'a [u8],
}

/// Check a call's arguments.
///
/// # Safety
/// As `meshshm_client_call`: `c` is a live client, `service` and `method`
/// are NUL-terminated strings, `body` points to `body_len` readable bytes
/// (or is NULL with `body_len` 0), all for the life `'a` of the result.
pub(crate) unsafe fn call_args<'a>(
    c: *mut meshshm_client,
    service: *const c_char,
    method: *const c_char,
    body: *const c_void,
    body_len: usize,
) -> Res<CallArgs<'a>> {
    // SAFETY: the caller's promises, passed on (here and below).
    let h = unsafe { handle(c) }?;
    // SAFETY: as above.
    let service = unsafe { str_arg(service, "service") }?;
    // SAFETY: as above.
    let method = unsafe { str_arg(method, "method") }?;
    // SAFETY: as above.
    let body = unsafe { bytes_arg(body, body_len) }?;
    Ok(CallArgs {
        h,
        service,
        method,
        body,
    })
}

/// Connect to the proxy over shared memory.
///
/// `socket_path` is the proxy's control socket; NULL or "" means the default
/// (`$MESHSHM_SOCKET`, else `$XDG_RUNTIME_DIR/meshshm/proxy.sock`, else
/// `/tmp/meshshm-<uid>/proxy.sock`). On success `*out` is a new client, to be
/// released with `meshshm_client_close`.
///
/// Returns `MESHSHM_OK`, or `MESHSHM_ERR_CONNECT` (proxy not running),
/// `MESHSHM_ERR_REJECTED`, `MESHSHM_ERR_INVALID_ARGUMENT`, ...
///
/// # Safety
/// `socket_path` is NULL or a NUL-terminated string; `out` is NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn meshshm_client_connect(
    socket_path: *const c_char,
    out: *mut *mut meshshm_client,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's promises, passed on.
        let out = unsafe { out_arg(out, "out") }?;
        *out = std::ptr::null_mut();
        // SAFETY: as above.
        let path = unsafe { path_arg(socket_path) }?;
        let opts = shim::ClientOptions {
            socket: path.map(PathBuf::from),
            ..shim::ClientOptions::default()
        };
        *out = connect(opts)?;
        Ok(MESHSHM_OK)
    })
}

/// As `meshshm_client_connect`, with `options` (NULL: the defaults): the
/// socket, the service this app is and its token, the ring size, and how
/// long a wait polls the ring before it sleeps (`spin`, `spin_adaptive`;
/// `spin = 0` is doorbells only: least CPU, a wake-up per answer).
///
/// # Safety
/// `options` is NULL or points to a `meshshm_client_options` whose first
/// `struct_size` bytes are readable, its strings NUL-terminated or NULL;
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn meshshm_client_connect_opts(
    options: *const meshshm_client_options,
    out: *mut *mut meshshm_client,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's promises, passed on.
        let out = unsafe { out_arg(out, "out") }?;
        *out = std::ptr::null_mut();
        // SAFETY: as above.
        let opts = unsafe { client_options(options) }?;
        *out = connect(opts)?;
        Ok(MESHSHM_OK)
    })
}

fn connect(opts: shim::ClientOptions) -> Res<*mut meshshm_client> {
    let client = shim::Client::with_options(opts.clone())?;
    let h = Box::new(ClientHandle {
        client,
        opts,
        asynch: OnceLock::new(),
        asynch_init: Mutex::new(()),
    });
    Ok(Box::into_raw(h).cast::<meshshm_client>())
}

/// Call `service`/`method` with `body_len` bytes at `body` (NULL is fine when
/// `body_len` is 0) and wait for the answer, at most `timeout_ms`
/// milliseconds (0: no timeout).
///
/// On `MESHSHM_OK`, `*response` holds the response body: release it with
/// `meshshm_buffer_free`. On an error `*response` is `{ NULL, 0 }`. When the
/// service answers with a non-OK status the result is `MESHSHM_ERR_STATUS`:
/// `meshshm_last_status()` gives the status (e.g. 5, not found) and
/// `meshshm_last_error()` its message. `MESHSHM_ERR_TIMEOUT`: no answer in
/// time (the call was cancelled; if the proxy's deadline ran out first,
/// `meshshm_last_status()` is 4, deadline exceeded).
///
/// # Safety
/// `c` is a live client (or NULL); `service` and `method` are NUL-terminated
/// strings (or NULL); `body` points to `body_len` readable bytes (or is NULL);
/// `response` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn meshshm_client_call(
    c: *mut meshshm_client,
    service: *const c_char,
    method: *const c_char,
    body: *const c_void,
    body_len: usize,
    timeout_ms: u32,
    response: *mut meshshm_buffer,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's promises, passed on (here and below).
        let response = unsafe { out_arg(response, "response") }?;
        *response = meshshm_buffer::EMPTY;
        // SAFETY: as above.
        let a = unsafe { call_args(c, service, method, body, body_len) }?;
        let bytes = invoke(&a, &CallOpts::plain(timeout_ms))?;
        *response = meshshm_buffer::from_vec(bytes);
        Ok(MESHSHM_OK)
    })
}

/// Make one blocking call; the response body if its status is OK.
fn invoke(a: &CallArgs<'_>, opts: &CallOpts) -> Res<Vec<u8>> {
    let headers = opts.header_refs();
    let call = shim::Call {
        service: a.service,
        method: a.method,
        body: a.body,
        headers: &headers,
        timeout: opts.timeout,
        priority: opts.priority,
    };
    response_result(a.h.client.invoke(&call)?).map_err(|(f, _)| f)
}

/// As `meshshm_client_call`, with request headers, a priority and the
/// timeout given in `options` (NULL: no timeout, normal priority, no
/// headers; see `meshshm_call_options`). The options, the headers and their
/// strings are only read during this call.
///
/// `MESHSHM_ERR_INVALID_ARGUMENT` for a bad `options.struct_size`, a NULL or
/// empty header name, or a NULL value with a non-zero length.
///
/// # Safety
/// As `meshshm_client_call`; `options` is NULL or points to a
/// `meshshm_call_options` as documented there.
#[no_mangle]
pub unsafe extern "C" fn meshshm_client_call_opts(
    c: *mut meshshm_client,
    service: *const c_char,
    method: *const c_char,
    body: *const c_void,
    body_len: usize,
    options: *const meshshm_call_options,
    response: *mut meshshm_buffer,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's promises, passed on (here and below).
        let response = unsafe { out_arg(response, "response") }?;
        *response = meshshm_buffer::EMPTY;
        // SAFETY: as above.
        let a = unsafe { call_args(c, service, method, body, body_len) }?;
        // SAFETY: as above.
        let opts = unsafe { call_options(options) }?;
        let bytes = invoke(&a, &opts)?;
        *response = meshshm_buffer::from_vec(bytes);
        Ok(MESHSHM_OK)
    })
}

/// Close the client: calls still in flight on other threads fail, pending
/// asynchronous calls are dropped, and the file descriptor of
/// `meshshm_client_fd` is closed. NULL is fine.
///
/// # Safety
/// `c` is NULL or a live client, not used by any other thread now or after.
#[no_mangle]
pub unsafe extern "C" fn meshshm_client_close(c: *mut meshshm_client) {
    guard_void(|| {
        if c.is_null() {
            return;
        }
        // SAFETY: a live client is a `Box<ClientHandle>` leaked by
        // `meshshm_client_connect`; the caller gives it back exactly once.
        let h = unsafe { Box::from_raw(c.cast::<ClientHandle>()) };
        if let Some(a) = h.asynch.get() {
            a.shutdown();
        }
        drop(h);
    });
}
