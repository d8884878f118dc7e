//! Unit tests of the ABI's conventions that need no proxy: NULL and bad
//! arguments, error codes and messages, the panic boundary, buffers. The
//! calls through a real proxy are tested from C (examples/c/test_meshshm.c)
//! and from every binding (ffi/test-bindings.sh).

use std::ffi::{c_int, CStr};
use std::ptr;

use crate::error::{guard, Fail};
use crate::*;

fn last_error_text() -> String {
    // SAFETY: meshshm_last_error never returns NULL, and the text stays
    // valid until the next failure on this thread.
    unsafe { CStr::from_ptr(meshshm_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn null_arguments_are_errors_not_crashes() {
    // SAFETY: every pointer is NULL or valid; NULL is what is being tested.
    unsafe {
        assert_eq!(
            meshshm_client_connect(ptr::null(), ptr::null_mut()),
            MESHSHM_ERR_INVALID_ARGUMENT
        );
        assert!(last_error_text().contains("out is NULL"));
        let mut b = meshshm_buffer::EMPTY;
        let rc = meshshm_client_call(
            ptr::null_mut(),
            c"echo".as_ptr(),
            c"m".as_ptr(),
            ptr::null(),
            0,
            0,
            &mut b,
        );
        assert_eq!(rc, MESHSHM_ERR_INVALID_ARGUMENT);
        assert!(last_error_text().contains("client is NULL"));
        assert_eq!(
            meshshm_server_next(ptr::null_mut(), ptr::null_mut(), 0),
            MESHSHM_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            meshshm_client_fd(ptr::null_mut()),
            MESHSHM_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            meshshm_client_cancel(ptr::null_mut(), 1),
            MESHSHM_ERR_INVALID_ARGUMENT
        );
        meshshm_buffer_free(ptr::null_mut());
        meshshm_request_free(ptr::null_mut());
        meshshm_completion_free(ptr::null_mut());
        meshshm_client_close(ptr::null_mut());
        meshshm_server_close(ptr::null_mut());
    }
}

#[test]
fn connect_error_names_the_socket() {
    let mut c = ptr::null_mut();
    let path = c"/nonexistent-meshshm-dir/proxy.sock";
    // SAFETY: a valid C string and out pointer.
    let rc = unsafe { meshshm_client_connect(path.as_ptr(), &mut c) };
    assert_eq!(rc, MESHSHM_ERR_CONNECT);
    assert!(c.is_null());
    assert!(last_error_text().contains("/nonexistent-meshshm-dir/proxy.sock"));
    let mut s = ptr::null_mut();
    // SAFETY: as above.
    let rc = unsafe { meshshm_server_bind(path.as_ptr(), c"svc".as_ptr(), &mut s) };
    assert_eq!(rc, MESHSHM_ERR_CONNECT);
}

#[test]
fn bad_utf8_is_an_invalid_argument() {
    let mut s = ptr::null_mut();
    // SAFETY: valid NUL-terminated strings and out pointer.
    let rc = unsafe { meshshm_server_bind(ptr::null(), c"\xff\xfe".as_ptr(), &mut s) };
    assert_eq!(rc, MESHSHM_ERR_INVALID_ARGUMENT);
    assert!(last_error_text().contains("UTF-8"));
}

#[test]
fn a_panic_becomes_an_error_code() {
    let rc = guard(|| -> Result<c_int, Fail> { panic!("boom") });
    assert_eq!(rc, MESHSHM_ERR_INTERNAL);
    assert!(last_error_text().contains("boom"));
}

/// A string the library returns as static.
fn static_str(p: *const std::ffi::c_char) -> &'static CStr {
    // SAFETY: meshshm_strerror, meshshm_status_name and meshshm_version
    // return static NUL-terminated strings.
    unsafe { CStr::from_ptr(p) }
}

#[test]
fn every_code_has_a_static_description() {
    for code in 0..=20 {
        assert!(!static_str(meshshm_strerror(-code)).to_bytes().is_empty());
    }
    assert_eq!(static_str(meshshm_strerror(-999)), c"unknown error code");
    assert_eq!(static_str(meshshm_status_name(5)), c"not found");
    assert_eq!(
        static_str(meshshm_version()).to_str(),
        Ok(env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn buffers_free_once_and_reset() {
    let mut b = meshshm_buffer::from_vec(vec![1, 2, 3]);
    assert_eq!(b.len, 3);
    // SAFETY: a buffer of ours, freed twice on purpose (the second is a no-op).
    unsafe {
        meshshm_buffer_free(&mut b);
        assert!(b.data.is_null() && b.len == 0);
        meshshm_buffer_free(&mut b);
    }
    let e = meshshm_buffer::from_vec(Vec::new());
    assert!(e.data.is_null() && e.len == 0);
}

#[test]
fn the_last_error_is_per_thread() {
    let mut c = ptr::null_mut();
    // SAFETY: valid out pointer; NULL-free path string.
    unsafe { meshshm_client_connect(c"/nonexistent-a/proxy.sock".as_ptr(), &mut c) };
    let other = std::thread::spawn(last_error_text).join().unwrap();
    assert_eq!(other, "");
    assert!(last_error_text().contains("nonexistent-a"));
}
