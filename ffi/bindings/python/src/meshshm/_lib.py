"""Loading libmeshshm and declaring its C functions (ctypes).

Where the library is looked for, in order:

1. ``$MESHSHM_LIB``: the path of ``libmeshshm.so`` (any name), or a directory
   holding ``libmeshshm.so.0`` / ``libmeshshm.so``.
2. The dynamic loader's own search: ``libmeshshm.so.0`` then
   ``libmeshshm.so`` (``LD_LIBRARY_PATH``, ``/etc/ld.so.cache``, ``/usr/lib``,
   ``/usr/local/lib`` after ``ldconfig``).
3. ``pkg-config --variable=libdir meshshm``, if pkg-config knows it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from ctypes import (
    POINTER,
    Structure,
    c_char_p,
    c_int,
    c_int32,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)

_SONAMES = ("libmeshshm.so.0", "libmeshshm.so")


class Buffer(Structure):
    """``meshshm_buffer``: ``{ uint8_t *data; size_t len; }``."""

    _fields_ = [("data", POINTER(c_uint8)), ("len", c_size_t)]


class Request(Structure):
    """``meshshm_request``."""

    _fields_ = [
        ("id", c_uint64),
        ("service", c_void_p),
        ("method", c_void_p),
        ("body", Buffer),
        ("timeout_ms", c_uint32),
        ("priority", c_uint8),
    ]


class Completion(Structure):
    """``meshshm_completion``."""

    _fields_ = [
        ("user_data", c_uint64),
        ("call_id", c_uint64),
        ("result", c_int),
        ("status", c_uint32),
        ("body", Buffer),
        ("error", c_void_p),
    ]


class Header(Structure):
    """``meshshm_header``: ``{ const char *name; const uint8_t *value; size_t value_len; }``."""

    _fields_ = [("name", c_char_p), ("value", c_void_p), ("value_len", c_size_t)]


class Headers(Structure):
    """``meshshm_headers``: ``{ meshshm_header *data; size_t len; }`` (owned by the library)."""

    _fields_ = [("data", POINTER(Header)), ("len", c_size_t)]


class CallOptions(Structure):
    """``meshshm_call_options`` (``struct_size`` first: set it to ``ctypes.sizeof(CallOptions)``)."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("timeout_ms", c_uint32),
        ("priority", c_uint8),
        ("headers", POINTER(Header)),
        ("headers_len", c_size_t),
    ]


def _candidates():
    env = os.environ.get("MESHSHM_LIB")
    if env:
        if os.path.isdir(env):
            for name in _SONAMES:
                p = os.path.join(env, name)
                if os.path.exists(p):
                    yield p
        else:
            yield env
        return
    yield from _SONAMES
    if shutil.which("pkg-config"):
        try:
            libdir = subprocess.run(
                ["pkg-config", "--variable=libdir", "meshshm"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            libdir = ""
        if libdir:
            for name in _SONAMES:
                yield os.path.join(libdir, name)


def _load() -> ctypes.CDLL:
    errors = []
    for cand in _candidates():
        try:
            return ctypes.CDLL(cand)
        except OSError as e:
            errors.append(f"{cand}: {e}")
    raise ImportError(
        "cannot load libmeshshm (set MESHSHM_LIB to libmeshshm.so or its directory, "
        "or install it where the dynamic loader finds it): " + "; ".join(errors or ["no candidates"])
    )


lib = _load()


def _fn(name, restype, *argtypes):
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


client_p = c_void_p
server_p = c_void_p

last_error = _fn("meshshm_last_error", c_char_p)
last_status = _fn("meshshm_last_status", c_uint32)
strerror = _fn("meshshm_strerror", c_char_p, c_int)
status_name = _fn("meshshm_status_name", c_char_p, c_uint32)
version = _fn("meshshm_version", c_char_p)
buffer_free = _fn("meshshm_buffer_free", None, POINTER(Buffer))

client_connect = _fn("meshshm_client_connect", c_int, c_char_p, POINTER(client_p))
client_call = _fn(
    "meshshm_client_call", c_int, client_p, c_char_p, c_char_p, c_char_p, c_size_t, c_uint32, POINTER(Buffer)
)
client_close = _fn("meshshm_client_close", None, client_p)
client_send = _fn(
    "meshshm_client_send",
    c_int,
    client_p,
    c_char_p,
    c_char_p,
    c_char_p,
    c_size_t,
    c_uint32,
    c_uint64,
    POINTER(c_uint64),
)
client_call_opts = _fn(
    "meshshm_client_call_opts",
    c_int,
    client_p,
    c_char_p,
    c_char_p,
    c_char_p,
    c_size_t,
    POINTER(CallOptions),
    POINTER(Buffer),
)
client_send_opts = _fn(
    "meshshm_client_send_opts",
    c_int,
    client_p,
    c_char_p,
    c_char_p,
    c_char_p,
    c_size_t,
    POINTER(CallOptions),
    c_uint64,
    POINTER(c_uint64),
)
client_cancel = _fn("meshshm_client_cancel", c_int, client_p, c_uint64)
client_fd = _fn("meshshm_client_fd", c_int, client_p)
client_poll = _fn("meshshm_client_poll", c_int, client_p, POINTER(Completion), c_size_t, c_int32)
completion_free = _fn("meshshm_completion_free", None, POINTER(Completion))

server_bind = _fn("meshshm_server_bind", c_int, c_char_p, c_char_p, POINTER(server_p))
server_next = _fn("meshshm_server_next", c_int, server_p, POINTER(Request), c_int32)
server_next_with_headers = _fn(
    "meshshm_server_next_with_headers", c_int, server_p, POINTER(Request), POINTER(Headers), c_int32
)
server_is_cancelled = _fn("meshshm_server_is_cancelled", c_int, server_p, c_uint64)
headers_free = _fn("meshshm_headers_free", None, POINTER(Headers))
server_reply_message = _fn(
    "meshshm_server_reply_message", c_int, server_p, c_uint64, c_int32, c_char_p, c_char_p, c_size_t
)
request_free = _fn("meshshm_request_free", None, POINTER(Request))
server_close = _fn("meshshm_server_close", None, server_p)


def take_headers(h: Headers) -> tuple:
    """Copy library headers into ``((name, value), ...)`` and free them."""
    try:
        out = []
        for i in range(h.len):
            item = h.data[i]
            value = ctypes.string_at(item.value, item.value_len) if item.value_len else b""
            out.append((item.name.decode("utf-8", "replace"), value))
        return tuple(out)
    finally:
        headers_free(ctypes.byref(h))


def take_buffer(b: Buffer) -> bytes:
    """Copy a library buffer into ``bytes`` and free it."""
    try:
        return ctypes.string_at(b.data, b.len) if b.len else b""
    finally:
        buffer_free(ctypes.byref(b))
