//! Byte buffers handed to the caller, and their free function.

use std::ffi::{c_char, CString};

use crate::error::guard_void;

/// Bytes owned by libmeshshm and lent to the caller until
/// `meshshm_buffer_free`. An empty buffer is `{ NULL, 0 }`.
///
/// Other languages declare this struct themselves: its layout (pointer,
/// then length) is part of the ABI and never changes within a major version.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug)]
pub struct meshshm_buffer {
    /// the first byte (NULL when `len` is 0)
    pub data: *mut u8,
    /// the number of bytes
    pub len: usize,
}

impl meshshm_buffer {
    pub(crate) const EMPTY: meshshm_buffer = meshshm_buffer {
        data: std::ptr::null_mut(),
        len: 0,
    };

    /// Hand `v` over to the caller.
    pub(crate) fn from_vec(v: Vec<u8>) -> meshshm_buffer {
        if v.is_empty() {
            return meshshm_buffer::EMPTY;
        }
        let b: Box<[u8]> = v.into_boxed_slice();
        let len = b.len();
        meshshm_buffer {
            data: Box::into_raw(b).cast::<u8>(),
            len,
        }
    }

    /// Take the bytes back (and leave the buffer empty).
    pub(crate) fn release(&mut self) {
        let (data, len) = (self.data, self.len);
        *self = meshshm_buffer::EMPTY;
        if data.is_null() || len == 0 {
            return;
        }
        let slice = std::ptr::slice_from_raw_parts_mut(data, len);
        // SAFETY: a non-empty buffer only comes from `from_vec`, which leaked
        // a `Box<[u8]>` of exactly `len` bytes at `data`; the buffer was reset
        // above, so it is not freed twice through this struct.
        drop(unsafe { Box::from_raw(slice) });
    }
}

/// A C string handed to the caller (freed with [`free_c_string`]).
pub(crate) fn give_c_string(s: &str) -> *mut c_char {
    crate::error::c_string(s).into_raw()
}

/// Free a string made by [`give_c_string`] and set the pointer to NULL.
pub(crate) fn free_c_string(p: &mut *mut c_char) {
    let raw = std::mem::replace(p, std::ptr::null_mut());
    if !raw.is_null() {
        // SAFETY: non-NULL pointers stored in our structs only come from
        // `CString::into_raw` in `give_c_string`; the field was reset above.
        drop(unsafe { CString::from_raw(raw) });
    }
}

/// Free the bytes of a buffer returned by libmeshshm and reset it to
/// `{ NULL, 0 }`. NULL, or an already-empty buffer, is fine (nothing happens),
/// so freeing twice is harmless.
///
/// # Safety
/// `b` is NULL or points to a `meshshm_buffer` that libmeshshm filled in
/// (or that is `{ NULL, 0 }`), not modified since.
#[no_mangle]
pub unsafe extern "C" fn meshshm_buffer_free(b: *mut meshshm_buffer) {
    guard_void(|| {
        // SAFETY: the caller promises NULL or a valid buffer of ours.
        if let Some(b) = unsafe { b.as_mut() } {
            b.release();
        }
    });
}
