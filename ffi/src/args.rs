//! Turning C arguments into Rust values, checking each one.

use std::ffi::{c_char, CStr};
use std::path::Path;
use std::time::Duration;

use crate::error::{Fail, Res};

/// A required NUL-terminated UTF-8 string.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid and
/// unmodified for `'a`.
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, name: &str) -> Res<&'a str> {
    if p.is_null() {
        return Err(Fail::arg(format!("{name} is NULL")));
    }
    // SAFETY: not NULL, and the caller promises a NUL-terminated string alive for 'a.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|_| Fail::arg(format!("{name} is not valid UTF-8")))
}

/// An optional socket path: NULL (or "") means the default.
///
/// # Safety
/// As [`str_arg`].
pub(crate) unsafe fn path_arg<'a>(p: *const c_char) -> Res<Option<&'a Path>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller's promise is passed on.
    let s = unsafe { str_arg(p, "socket_path") }?;
    Ok((!s.is_empty()).then(|| Path::new(s)))
}

/// A byte range: `(NULL, 0)` is the empty body.
///
/// # Safety
/// `p` is NULL or points to `len` readable bytes that stay valid and
/// unmodified for `'a`.
pub(crate) unsafe fn bytes_arg<'a>(p: *const std::ffi::c_void, len: usize) -> Res<&'a [u8]> {
    // SAFETY: the caller's promise, passed on.
    unsafe { named_bytes_arg(p.cast::<u8>(), len, "body") }
}

/// A byte range named `name` in error messages (`name_len` is its length):
/// `(NULL, 0)` is empty.
///
/// # Safety
/// As [`bytes_arg`].
pub(crate) unsafe fn named_bytes_arg<'a>(p: *const u8, len: usize, name: &str) -> Res<&'a [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Fail::arg(format!("{name} is NULL but {name}_len is {len}")));
    }
    if len > isize::MAX as usize {
        return Err(Fail::arg(format!("{name}_len is too large")));
    }
    // SAFETY: not NULL, len bounded by isize::MAX, and the caller promises
    // `len` readable bytes alive for 'a.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// A pointer the library writes through.
///
/// # Safety
/// `p` is NULL or points to a valid `T` that nothing else reads or writes
/// for `'a`.
pub(crate) unsafe fn out_arg<'a, T>(p: *mut T, name: &str) -> Res<&'a mut T> {
    // SAFETY: NULL is refused by `as_mut`; otherwise the caller promises a
    // valid, exclusively-owned `T`.
    unsafe { p.as_mut() }.ok_or_else(|| Fail::arg(format!("{name} is NULL")))
}

/// `timeout_ms` of a call: 0 means none.
pub(crate) fn call_timeout(ms: u32) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(u64::from(ms)))
}

/// `timeout_ms` of a wait: negative waits forever, 0 polls.
pub(crate) fn wait_timeout(ms: i32) -> Option<Duration> {
    u64::try_from(ms).ok().map(Duration::from_millis)
}
