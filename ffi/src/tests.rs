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

fn default_options() -> meshshm_call_options {
    meshshm_call_options {
        struct_size: std::mem::size_of::<meshshm_call_options>(),
        timeout_ms: 0,
        priority: 1,
        headers: ptr::null(),
        headers_len: 0,
    }
}

#[test]
fn call_options_are_read_and_checked() {
    use crate::options::call_options;
    // SAFETY: NULL is allowed.
    let d = unsafe { call_options(ptr::null()) }.unwrap();
    assert_eq!((d.timeout, d.priority, d.headers.len()), (None, 1, 0));

    let hs = [
        meshshm_header {
            name: c"x-trace".as_ptr(),
            value: b"abc\0def".as_ptr(),
            value_len: 7,
        },
        meshshm_header {
            name: c"x-empty".as_ptr(),
            value: ptr::null(),
            value_len: 0,
        },
    ];
    let o = meshshm_call_options {
        timeout_ms: 250,
        priority: 2,
        headers: hs.as_ptr(),
        headers_len: hs.len(),
        ..default_options()
    };
    // SAFETY: valid options, headers and strings.
    let r = unsafe { call_options(&o) }.unwrap();
    assert_eq!(r.timeout, Some(std::time::Duration::from_millis(250)));
    assert_eq!(r.priority, 2);
    assert_eq!(
        r.headers,
        vec![
            ("x-trace".to_owned(), b"abc\0def".to_vec()),
            ("x-empty".to_owned(), Vec::new())
        ]
    );

    let bad = |o: &meshshm_call_options, what: &str| {
        // SAFETY: the struct is readable; its pointers are valid or NULL.
        let rc = guard(|| unsafe { call_options(o) }.map(|_| 0));
        assert_eq!(rc, MESHSHM_ERR_INVALID_ARGUMENT, "{what}");
        assert!(
            last_error_text().contains(what),
            "{what}: {}",
            last_error_text()
        );
    };
    bad(
        &meshshm_call_options {
            struct_size: 8,
            ..default_options()
        },
        "struct_size is 8",
    );
    bad(
        &meshshm_call_options {
            struct_size: 1 << 40,
            ..default_options()
        },
        "not a size",
    );
    bad(
        &meshshm_call_options {
            headers_len: 3,
            ..default_options()
        },
        "options.headers is NULL",
    );
    let null_name = [meshshm_header {
        name: ptr::null(),
        value: ptr::null(),
        value_len: 0,
    }];
    bad(
        &meshshm_call_options {
            headers: null_name.as_ptr(),
            headers_len: 1,
            ..default_options()
        },
        "options.headers[0].name is NULL",
    );
    let empty_name = [meshshm_header {
        name: c"".as_ptr(),
        value: ptr::null(),
        value_len: 0,
    }];
    bad(
        &meshshm_call_options {
            headers: empty_name.as_ptr(),
            headers_len: 1,
            ..default_options()
        },
        "options.headers[0].name is empty",
    );
    let null_value = [
        meshshm_header { ..hs[0] },
        meshshm_header {
            name: c"k".as_ptr(),
            value: ptr::null(),
            value_len: 4,
        },
    ];
    bad(
        &meshshm_call_options {
            headers: null_value.as_ptr(),
            headers_len: 2,
            ..default_options()
        },
        "options.headers[1].value is NULL but options.headers[1].value_len is 4",
    );
}

#[test]
fn call_options_from_a_newer_caller() {
    use crate::options::call_options;
    // A caller compiled with a larger struct: unknown bytes must be zero.
    #[repr(C)]
    struct Newer {
        o: meshshm_call_options,
        extra: u64,
    }
    let mut n = Newer {
        o: meshshm_call_options {
            struct_size: std::mem::size_of::<Newer>(),
            priority: 0,
            ..default_options()
        },
        extra: 0,
    };
    // SAFETY: `struct_size` readable bytes at the pointer.
    let r = unsafe { call_options(&n.o) }.unwrap();
    assert_eq!(r.priority, 0);
    n.extra = 7;
    // SAFETY: as above.
    let rc = guard(|| unsafe { call_options(&n.o) }.map(|_| 0));
    assert_eq!(rc, MESHSHM_ERR_INVALID_ARGUMENT);
    assert!(last_error_text().contains("newer"));
}

#[test]
fn headers_are_handed_out_and_freed_once() {
    let mut h = crate::options::meshshm_headers::from_vec(vec![
        ("a".to_owned(), b"1".to_vec()),
        ("b".to_owned(), Vec::new()),
    ]);
    assert_eq!(h.len, 2);
    // SAFETY: a list of ours with two headers.
    let items = unsafe { std::slice::from_raw_parts(h.data, h.len) };
    // SAFETY: names are NUL-terminated strings of ours.
    assert_eq!(unsafe { CStr::from_ptr(items[0].name) }, c"a");
    assert_eq!(items[0].value_len, 1);
    assert!(items[1].value.is_null() && items[1].value_len == 0);
    // SAFETY: freed twice on purpose (the second is a no-op); NULL is fine.
    unsafe {
        meshshm_headers_free(&mut h);
        assert!(h.data.is_null() && h.len == 0);
        meshshm_headers_free(&mut h);
        meshshm_headers_free(ptr::null_mut());
    }
}

#[test]
fn new_functions_refuse_null_handles() {
    let mut b = meshshm_buffer::EMPTY;
    let o = default_options();
    // SAFETY: every pointer is NULL or valid; NULL is what is being tested.
    unsafe {
        let rc = meshshm_client_call_opts(
            ptr::null_mut(),
            c"echo".as_ptr(),
            c"m".as_ptr(),
            ptr::null(),
            0,
            &o,
            &mut b,
        );
        assert_eq!(rc, MESHSHM_ERR_INVALID_ARGUMENT);
        assert!(last_error_text().contains("client is NULL"));
        let rc = meshshm_client_send_opts(
            ptr::null_mut(),
            c"echo".as_ptr(),
            c"m".as_ptr(),
            ptr::null(),
            0,
            &o,
            0,
            ptr::null_mut(),
        );
        assert_eq!(rc, MESHSHM_ERR_INVALID_ARGUMENT);
        assert_eq!(
            meshshm_server_is_cancelled(ptr::null_mut(), 1),
            MESHSHM_ERR_INVALID_ARGUMENT
        );
        assert!(last_error_text().contains("server is NULL"));
        let mut hs = crate::options::meshshm_headers::EMPTY;
        assert_eq!(
            meshshm_server_next_with_headers(ptr::null_mut(), ptr::null_mut(), &mut hs, 0),
            MESHSHM_ERR_INVALID_ARGUMENT
        );
        let mut req = std::mem::zeroed::<meshshm_request>();
        assert_eq!(
            meshshm_server_next_with_headers(ptr::null_mut(), &mut req, &mut hs, 0),
            MESHSHM_ERR_INVALID_ARGUMENT
        );
        assert!(hs.data.is_null() && hs.len == 0);
    }
}

#[test]
fn client_options_default_as_connect_does_and_bad_ones_are_refused() {
    assert_eq!(
        MESHSHM_SPIN_DEFAULT,
        shim::ClientOptions::default().spin,
        "MESHSHM_CLIENT_OPTIONS_INIT must poll as meshshm_client_connect"
    );
    let o = meshshm_client_options {
        struct_size: std::mem::size_of::<meshshm_client_options>(),
        socket_path: ptr::null(),
        service: ptr::null(),
        token: ptr::null(),
        ring_size: 0,
        spin: 0,
        spin_adaptive: 3,
        connect_timeout_ms: 0,
    };
    let mut c: *mut meshshm_client = ptr::null_mut();
    // SAFETY: `o` is a whole, valid options struct; `c` is writable.
    unsafe {
        assert_eq!(
            meshshm_client_connect_opts(&o, &mut c),
            MESHSHM_ERR_INVALID_ARGUMENT
        );
        assert!(c.is_null());
        assert!(last_error_text().contains("spin_adaptive is 3"));
        assert_eq!(
            meshshm_client_connect_opts(ptr::null(), ptr::null_mut()),
            MESHSHM_ERR_INVALID_ARGUMENT
        );
    }
}
