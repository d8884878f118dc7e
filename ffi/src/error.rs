//! Error codes, the thread-local last error, and the panic boundary that
//! every exported function runs inside.

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Success.
pub const MESHSHM_OK: c_int = 0;
/// An argument was NULL, not UTF-8, out of range, or otherwise refused.
pub const MESHSHM_ERR_INVALID_ARGUMENT: c_int = -1;
/// The proxy could not be reached (no socket, connection refused, ...).
pub const MESHSHM_ERR_CONNECT: c_int = -2;
/// The proxy refused the handshake (access rules, bad token).
pub const MESHSHM_ERR_REJECTED: c_int = -3;
/// The proxy went away while the call was in flight (a later call reconnects).
pub const MESHSHM_ERR_PROXY_GONE: c_int = -4;
/// The timeout passed first (for a call: it was cancelled, or the proxy
/// answered DEADLINE_EXCEEDED; for `meshshm_server_next`: no request came).
pub const MESHSHM_ERR_TIMEOUT: c_int = -5;
/// The service answered with a non-OK status: `meshshm_last_status()` gives
/// it, `meshshm_last_error()` its message.
pub const MESHSHM_ERR_STATUS: c_int = -6;
/// The proxy broke the protocol; the connection was closed.
pub const MESHSHM_ERR_PROTOCOL: c_int = -7;
/// The handle is closed.
pub const MESHSHM_ERR_CLOSED: c_int = -8;
/// A bug inside libmeshshm (a caught Rust panic); the message says where.
pub const MESHSHM_ERR_INTERNAL: c_int = -9;
/// The asynchronous call was cancelled with `meshshm_client_cancel`.
pub const MESHSHM_ERR_CANCELLED: c_int = -10;
/// The call id is not (or no longer) in flight.
pub const MESHSHM_ERR_NOT_FOUND: c_int = -11;
/// An operating-system call failed (eventfd, poll, thread creation).
pub const MESHSHM_ERR_SYSTEM: c_int = -12;

/// The static text of an error code.
pub(crate) fn describe(code: c_int) -> &'static CStr {
    match code {
        MESHSHM_OK => c"ok",
        MESHSHM_ERR_INVALID_ARGUMENT => c"invalid argument",
        MESHSHM_ERR_CONNECT => c"cannot connect to the proxy",
        MESHSHM_ERR_REJECTED => c"the proxy rejected the connection",
        MESHSHM_ERR_PROXY_GONE => c"the proxy is gone",
        MESHSHM_ERR_TIMEOUT => c"timed out",
        MESHSHM_ERR_STATUS => c"the service answered with an error status",
        MESHSHM_ERR_PROTOCOL => c"protocol error",
        MESHSHM_ERR_CLOSED => c"closed",
        MESHSHM_ERR_INTERNAL => c"internal error in libmeshshm",
        MESHSHM_ERR_CANCELLED => c"cancelled",
        MESHSHM_ERR_NOT_FOUND => c"no such call in flight",
        MESHSHM_ERR_SYSTEM => c"operating system error",
        _ => c"unknown error code",
    }
}

/// A failure on its way to the C caller: a code, a message, and for
/// [`MESHSHM_ERR_STATUS`] the service's status.
#[derive(Debug)]
pub(crate) struct Fail {
    pub(crate) code: c_int,
    pub(crate) status: u32,
    pub(crate) msg: String,
}

impl Fail {
    pub(crate) fn new(code: c_int, msg: impl Into<String>) -> Fail {
        Fail {
            code,
            status: 0,
            msg: msg.into(),
        }
    }

    pub(crate) fn arg(msg: impl Into<String>) -> Fail {
        Fail::new(MESHSHM_ERR_INVALID_ARGUMENT, msg)
    }

    pub(crate) fn sys(what: &str, e: impl std::fmt::Display) -> Fail {
        Fail::new(MESHSHM_ERR_SYSTEM, format!("{what}: {e}"))
    }
}

impl From<shim::Error> for Fail {
    fn from(e: shim::Error) -> Fail {
        let code = match &e {
            shim::Error::Connect { .. } => MESHSHM_ERR_CONNECT,
            shim::Error::Rejected(_) => MESHSHM_ERR_REJECTED,
            shim::Error::ProxyGone(_) => MESHSHM_ERR_PROXY_GONE,
            shim::Error::Timeout(_) => MESHSHM_ERR_TIMEOUT,
            shim::Error::Status { .. } => MESHSHM_ERR_STATUS,
            shim::Error::Protocol(_) => MESHSHM_ERR_PROTOCOL,
            shim::Error::InvalidArgument(_) => MESHSHM_ERR_INVALID_ARGUMENT,
            shim::Error::Closed => MESHSHM_ERR_CLOSED,
        };
        let status = match &e {
            shim::Error::Status { code, .. } => *code,
            _ => 0,
        };
        Fail {
            code,
            status,
            msg: e.to_string(),
        }
    }
}

/// A response as the C API reports it: the body for status OK; else
/// `MESHSHM_ERR_STATUS` with the status — except DEADLINE_EXCEEDED (the
/// proxy's timer ran out before the client's), which is
/// `MESHSHM_ERR_TIMEOUT` like the client's own timeout (status 4 is still
/// in `meshshm_last_status()`), so callers see one kind of timeout whichever
/// side noticed first.
pub(crate) fn response_result(r: shim::Response) -> Result<Vec<u8>, (Fail, Vec<u8>)> {
    if r.status == shim::status::OK {
        return Ok(r.body);
    }
    let status = r.status;
    let mut fail = Fail::from(shim::Error::Status {
        code: status,
        message: r.message,
    });
    if status == shim::status::DEADLINE_EXCEEDED {
        fail.code = MESHSHM_ERR_TIMEOUT;
    }
    Err((fail, r.body))
}

pub(crate) type Res<T = ()> = Result<T, Fail>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
    static LAST_STATUS: Cell<u32> = const { Cell::new(0) };
}

/// A C string of `s` (interior NULs replaced, so it never fails).
pub(crate) fn c_string(s: &str) -> CString {
    CString::new(s.replace('\0', "\u{fffd}")).unwrap_or_default()
}

fn record(f: &Fail) {
    LAST_STATUS.with(|s| s.set(f.status));
    let text = c_string(&f.msg);
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// The thread's last error message (pointer valid until the next failing
/// call on this thread).
pub(crate) fn last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

pub(crate) fn last_status() -> u32 {
    LAST_STATUS.with(|s| s.get())
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    format!("libmeshshm panicked (a bug; please report it): {what}")
}

/// Run `f` inside the panic boundary; a failure (or a panic) is recorded as
/// the thread's last error and returned as its negative code. A
/// non-negative `Ok` value passes through.
pub(crate) fn guard(f: impl FnOnce() -> Res<c_int>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(fail)) => {
            record(&fail);
            fail.code
        }
        Err(p) => {
            let fail = Fail::new(MESHSHM_ERR_INTERNAL, panic_message(p.as_ref()));
            record(&fail);
            fail.code
        }
    }
}

/// The panic boundary for functions that return nothing (free, close).
pub(crate) fn guard_void(f: impl FnOnce()) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(f)) {
        record(&Fail::new(MESHSHM_ERR_INTERNAL, panic_message(p.as_ref())));
    }
}
