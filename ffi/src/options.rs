//! Headers and call options: `meshshm_header`, `meshshm_headers` (headers
//! the library hands out) and `meshshm_call_options` (what a call carries
//! besides its body).

use std::ffi::{c_char, CString};
use std::mem::size_of;
use std::time::Duration;

use crate::args::{call_timeout, named_bytes_arg, str_arg};
use crate::error::{guard_void, Fail, Res};

/// One header: a name and a value of bytes.
///
/// As input (`meshshm_call_options.headers`) the caller owns the memory; as
/// output (`meshshm_headers`, from `meshshm_server_next_with_headers`)
/// libmeshshm owns it until `meshshm_headers_free`.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug)]
pub struct meshshm_header {
    /// the name (NUL-terminated UTF-8, not empty, at most 65535 bytes)
    pub name: *const c_char,
    /// the value's first byte (NULL is fine when `value_len` is 0)
    pub value: *const u8,
    /// the value's length in bytes
    pub value_len: usize,
}

/// Headers owned by libmeshshm until `meshshm_headers_free`; `{ NULL, 0 }`
/// when there are none.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug)]
pub struct meshshm_headers {
    /// the first header (NULL when `len` is 0)
    pub data: *mut meshshm_header,
    /// the number of headers
    pub len: usize,
}

/// What a call carries besides service, method and body, for
/// `meshshm_client_call_opts` and `meshshm_client_send_opts`.
///
/// Set `struct_size` to `sizeof(meshshm_call_options)`: fields added later
/// go at the end, and the library reads only the first `struct_size` bytes
/// (any bytes it does not know must be 0). In C, start from
/// `MESHSHM_CALL_OPTIONS_INIT` (no timeout, normal priority, no headers).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug)]
pub struct meshshm_call_options {
    /// `sizeof(meshshm_call_options)` as the caller was compiled with
    pub struct_size: usize,
    /// give up (and cancel the call) after this many milliseconds; 0: no timeout
    pub timeout_ms: u32,
    /// 0 = low (shed first under overload), 1 = normal, 2 and up = high
    pub priority: u8,
    /// `headers_len` request headers (NULL is fine when `headers_len` is 0);
    /// only read during the call that takes the options
    pub headers: *const meshshm_header,
    /// the number of headers (at most 65535)
    pub headers_len: usize,
}

/// The largest `struct_size` accepted: far above any real version of the
/// struct, low enough that a garbage size is refused rather than read.
const MAX_STRUCT_SIZE: usize = 4096;

/// The options of a call, copied out of the caller's memory.
#[derive(Debug)]
pub(crate) struct CallOpts {
    pub(crate) timeout: Option<Duration>,
    pub(crate) priority: u8,
    pub(crate) headers: Vec<(String, Vec<u8>)>,
}

impl CallOpts {
    /// What the plain functions (without options) send.
    pub(crate) fn plain(timeout_ms: u32) -> CallOpts {
        CallOpts {
            timeout: call_timeout(timeout_ms),
            priority: 1,
            headers: Vec::new(),
        }
    }

    /// The headers as `shim::Call` takes them.
    pub(crate) fn header_refs(&self) -> Vec<(&str, &[u8])> {
        self.headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect()
    }
}

/// Read and check a `meshshm_call_options` (NULL: the defaults, no timeout).
///
/// # Safety
/// `p` is NULL or points to a `meshshm_call_options` whose first
/// `struct_size` bytes are readable, and whose headers array and strings
/// are valid as documented on the struct, for the duration of this call.
pub(crate) unsafe fn call_options(p: *const meshshm_call_options) -> Res<CallOpts> {
    if p.is_null() {
        return Ok(CallOpts::plain(0));
    }
    // SAFETY: the caller's promise, passed on.
    let o = unsafe { versioned(p, "meshshm_call_options") }?;
    // SAFETY: the caller's promise about the headers, passed on.
    let headers = unsafe { headers_arg(o.headers, o.headers_len) }?;
    Ok(CallOpts {
        timeout: call_timeout(o.timeout_ms),
        priority: o.priority,
        headers,
    })
}

/// A versioned struct whose first field is its `struct_size`: checked
/// (not smaller than ours, not absurd, any bytes past ours 0) and borrowed.
///
/// # Safety
/// `p` is not NULL and points to a `T` whose first field is a `usize` and
/// whose first `struct_size` bytes are readable and not modified while the
/// borrow lives.
unsafe fn versioned<'a, T>(p: *const T, name: &str) -> Res<&'a T> {
    // SAFETY: not NULL, and the caller promises at least the struct's
    // first field (`struct_size`) readable.
    let size = unsafe { p.cast::<usize>().read_unaligned() };
    let ours = size_of::<T>();
    if size < ours {
        return Err(Fail::arg(format!(
            "options.struct_size is {size}, expected sizeof({name}) = {ours}"
        )));
    }
    if size > MAX_STRUCT_SIZE {
        return Err(Fail::arg(format!(
            "options.struct_size is {size}: not a size of {name}"
        )));
    }
    if size > ours {
        // SAFETY: the caller promises `struct_size` readable bytes at `p`;
        // `ours < size <= MAX_STRUCT_SIZE`, so the range is in bounds.
        let extra = unsafe { std::slice::from_raw_parts(p.cast::<u8>().add(ours), size - ours) };
        if extra.iter().any(|&b| b != 0) {
            return Err(Fail::arg(
                "options set fields this libmeshshm does not know (a newer version's)",
            ));
        }
    }
    // SAFETY: `struct_size` >= our size, so the whole struct is readable
    // (the caller's promise), and it is not modified meanwhile.
    Ok(unsafe { &*p })
}

/// Polls of the ring before a wait sleeps, by default (`spin` of
/// `meshshm_client_options`).
pub const MESHSHM_SPIN_DEFAULT: u32 = 2000;

/// How a client connects, for `meshshm_client_connect_opts`.
///
/// Set `struct_size` to `sizeof(meshshm_client_options)` as for
/// `meshshm_call_options`. In C, start from `MESHSHM_CLIENT_OPTIONS_INIT`
/// (the defaults of `meshshm_client_connect`).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug)]
pub struct meshshm_client_options {
    /// `sizeof(meshshm_client_options)` as the caller was compiled with
    pub struct_size: usize,
    /// the proxy's control socket; NULL or "": the default
    pub socket_path: *const c_char,
    /// the service this app is, for the proxy's access rules; NULL: none
    pub service: *const c_char,
    /// a token presented at the handshake; NULL: none
    pub token: *const c_char,
    /// ring size per direction in bytes; 0: the proxy's default
    pub ring_size: u64,
    /// polls of the ring before a wait sleeps on the doorbell (default
    /// `MESHSHM_SPIN_DEFAULT`; 0: never poll, every wait a doorbell)
    pub spin: u32,
    /// 1 (default): the polling follows the load (none once answers take
    /// longer than the poll); 0: every wait polls all of `spin` first
    pub spin_adaptive: u8,
    /// limit for connecting and the handshake, in ms; 0: the default (5 s)
    pub connect_timeout_ms: u32,
}

/// The shim's options from a `meshshm_client_options` (NULL: the defaults).
///
/// # Safety
/// `p` is NULL or points to a `meshshm_client_options` whose first
/// `struct_size` bytes are readable, with NUL-terminated strings (or NULL),
/// for the duration of this call.
pub(crate) unsafe fn client_options(p: *const meshshm_client_options) -> Res<shim::ClientOptions> {
    let mut opts = shim::ClientOptions::default();
    if p.is_null() {
        return Ok(opts);
    }
    // SAFETY: the caller's promise, passed on.
    let o = unsafe { versioned(p, "meshshm_client_options") }?;
    // SAFETY: the caller's promise about the strings, passed on (below too).
    opts.socket = unsafe { crate::args::path_arg(o.socket_path) }?.map(Into::into);
    if !o.service.is_null() {
        // SAFETY: as above.
        opts.service = unsafe { str_arg(o.service, "options.service") }?.to_owned();
    }
    if !o.token.is_null() {
        // SAFETY: as above.
        opts.token = unsafe { str_arg(o.token, "options.token") }?.to_owned();
    }
    opts.ring_size = o.ring_size;
    opts.spin = o.spin;
    opts.spin_adaptive = match o.spin_adaptive {
        0 => false,
        1 => true,
        x => return Err(Fail::arg(format!("options.spin_adaptive is {x}: 0 or 1"))),
    };
    if o.connect_timeout_ms > 0 {
        opts.connect_timeout = Duration::from_millis(o.connect_timeout_ms.into());
    }
    Ok(opts)
}

/// Copy `len` headers at `p`, checking each.
///
/// # Safety
/// `p` is NULL or points to `len` readable `meshshm_header`s, each with a
/// NUL-terminated `name` (or NULL) and `value_len` readable bytes at `value`
/// (or NULL), all valid for the duration of this call.
unsafe fn headers_arg(p: *const meshshm_header, len: usize) -> Res<Vec<(String, Vec<u8>)>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err(Fail::arg(format!(
            "options.headers is NULL but options.headers_len is {len}"
        )));
    }
    if len > usize::from(u16::MAX) {
        return Err(Fail::arg(format!(
            "options.headers_len is {len}: at most 65535 headers"
        )));
    }
    // SAFETY: not NULL, at most 65535 elements, and the caller promises
    // `len` readable headers.
    let hs = unsafe { std::slice::from_raw_parts(p, len) };
    let mut out = Vec::with_capacity(len);
    for (i, h) in hs.iter().enumerate() {
        let what = format!("options.headers[{i}].name");
        // SAFETY: the caller's promise about `name`, passed on.
        let name = unsafe { str_arg(h.name, &what) }?;
        if name.is_empty() {
            return Err(Fail::arg(format!("{what} is empty")));
        }
        if name.len() > usize::from(u16::MAX) {
            return Err(Fail::arg(format!("{what} is longer than 65535 bytes")));
        }
        // SAFETY: the caller's promise about `value`, passed on.
        let value = unsafe {
            named_bytes_arg(h.value, h.value_len, &format!("options.headers[{i}].value"))
        }?;
        if u32::try_from(value.len()).is_err() {
            return Err(Fail::arg(format!(
                "options.headers[{i}].value is longer than 4 GiB - 1"
            )));
        }
        out.push((name.to_owned(), value.to_vec()));
    }
    Ok(out)
}

impl meshshm_headers {
    pub(crate) const EMPTY: meshshm_headers = meshshm_headers {
        data: std::ptr::null_mut(),
        len: 0,
    };

    /// Hand `hs` over to the caller.
    pub(crate) fn from_vec(hs: Vec<(String, Vec<u8>)>) -> meshshm_headers {
        if hs.is_empty() {
            return meshshm_headers::EMPTY;
        }
        let items: Box<[meshshm_header]> = hs
            .into_iter()
            .map(|(k, v)| {
                let name = crate::error::c_string(&k).into_raw().cast_const();
                let (value, value_len) = if v.is_empty() {
                    (std::ptr::null(), 0)
                } else {
                    let b: Box<[u8]> = v.into_boxed_slice();
                    let n = b.len();
                    (Box::into_raw(b).cast::<u8>().cast_const(), n)
                };
                meshshm_header {
                    name,
                    value,
                    value_len,
                }
            })
            .collect();
        let len = items.len();
        meshshm_headers {
            data: Box::into_raw(items).cast::<meshshm_header>(),
            len,
        }
    }

    /// Take the memory back (and leave the list empty).
    fn release(&mut self) {
        let (data, len) = (self.data, self.len);
        *self = meshshm_headers::EMPTY;
        if data.is_null() || len == 0 {
            return;
        }
        // SAFETY: a non-empty list only comes from `from_vec`, which leaked
        // a `Box<[meshshm_header]>` of exactly `len` items at `data`; the
        // list was reset above, so it is not freed twice through this struct.
        let items = unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(data, len)) };
        for h in items.iter() {
            if !h.name.is_null() {
                // SAFETY: names come from `CString::into_raw` in `from_vec`,
                // each freed once (the boxed slice is dropped right after).
                drop(unsafe { CString::from_raw(h.name.cast_mut()) });
            }
            if !h.value.is_null() && h.value_len > 0 {
                let v = std::ptr::slice_from_raw_parts_mut(h.value.cast_mut(), h.value_len);
                // SAFETY: non-empty values come from a leaked `Box<[u8]>` of
                // `value_len` bytes in `from_vec`, each freed once.
                drop(unsafe { Box::from_raw(v) });
            }
        }
    }
}

/// Free headers filled in by libmeshshm and reset the list to `{ NULL, 0 }`.
/// NULL, or an empty list, is fine; freeing twice is harmless.
///
/// # Safety
/// `h` is NULL or points to a `meshshm_headers` that libmeshshm filled in
/// (or that is `{ NULL, 0 }`), not modified since.
#[no_mangle]
pub unsafe extern "C" fn meshshm_headers_free(h: *mut meshshm_headers) {
    guard_void(|| {
        // SAFETY: the caller promises NULL or a list of ours.
        if let Some(h) = unsafe { h.as_mut() } {
            h.release();
        }
    });
}
