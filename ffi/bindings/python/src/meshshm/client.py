"""The blocking client."""

from __future__ import annotations

import ctypes
import math
import os
from typing import Iterable, Mapping, Optional, Tuple, Union

from . import _lib
from ._handle import Handle
from .errors import check

BytesLike = Union[bytes, bytearray, memoryview]

#: Request headers: a mapping or (name, value) pairs; a value is bytes-like or str (UTF-8).
HeadersLike = Union[Mapping[str, Union[BytesLike, str]], Iterable[Tuple[str, Union[BytesLike, str]]]]

#: The timeout of :meth:`Client.call` when none is given, in seconds.
DEFAULT_TIMEOUT = 30.0

#: Call priorities (``priority=``): low is shed first under overload.
PRIORITY_LOW = 0
PRIORITY_NORMAL = 1
PRIORITY_HIGH = 2


def _path(socket_path: Union[str, "os.PathLike[str]", None]) -> Optional[bytes]:
    return None if socket_path is None else os.fsencode(socket_path)


def _timeout_ms(timeout: Optional[float]) -> int:
    """Seconds to the C API's milliseconds (0 = no timeout)."""
    if timeout is None:
        return 0
    if timeout <= 0:
        raise ValueError("timeout must be positive (or None for no timeout)")
    return min(max(1, math.ceil(timeout * 1000)), 0xFFFFFFFF)


def _bytes(body: BytesLike) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body)
    raise TypeError(f"body must be bytes-like, not {type(body).__name__}")


def _options(
    timeout: Optional[float], headers: Optional[HeadersLike], priority: Optional[int]
) -> Tuple["_lib.CallOptions", object]:
    """A ``meshshm_call_options`` and what must stay alive while the C side reads it."""
    pairs = list(headers.items() if isinstance(headers, Mapping) else headers or ())
    prio = PRIORITY_NORMAL if priority is None else int(priority)
    if not 0 <= prio <= 255:
        raise ValueError(f"priority must be 0..255, not {prio}")
    arr = (_lib.Header * max(1, len(pairs)))()
    keep = [arr]
    for i, (name, value) in enumerate(pairs):
        if not isinstance(name, str):
            raise TypeError(f"a header name must be str, not {type(name).__name__}")
        v = value.encode() if isinstance(value, str) else _bytes(value)
        n = name.encode()
        if b"\0" in n:
            raise ValueError(f"header name {name!r} contains a NUL character")
        keep += [n, v]
        arr[i].name = n
        arr[i].value = ctypes.cast(ctypes.c_char_p(v), ctypes.c_void_p) if v else None
        arr[i].value_len = len(v)
    opts = _lib.CallOptions(
        struct_size=ctypes.sizeof(_lib.CallOptions),
        timeout_ms=_timeout_ms(timeout),
        priority=prio,
        headers=arr if pairs else None,
        headers_len=len(pairs),
    )
    return opts, keep


class Client:
    """A connection to the sidecar proxy for outbound calls.

    One client may be shared by any number of threads; their calls are in
    flight together on one shared-memory connection (the GIL is released
    while a call waits).

    >>> with Client() as c:                      # doctest: +SKIP
    ...     c.call("echo", "Echo", b"hi", timeout=1.0)
    b'hi'

    :param socket_path: the proxy's control socket; ``None`` for the default
        (``$MESHSHM_SOCKET``, ``$XDG_RUNTIME_DIR/meshshm/proxy.sock`` or
        ``/tmp/meshshm-<uid>/proxy.sock``).
    :raises ConnectError: the proxy is not running.
    """

    def __init__(self, socket_path: Union[str, "os.PathLike[str]", None] = None):
        ptr = _lib.client_p()
        check(_lib.client_connect(_path(socket_path), ctypes.byref(ptr)))
        self._h = Handle(ptr.value, _lib.client_close, "client")

    def call(
        self,
        service: str,
        method: str,
        body: BytesLike = b"",
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        *,
        headers: Optional[HeadersLike] = None,
        priority: Optional[int] = None,
    ) -> bytes:
        """Call ``service``/``method`` with ``body``; return the response body.

        :param timeout: seconds to wait (``None``: no limit).
        :param headers: request headers, a mapping or ``(name, value)`` pairs
            (values bytes-like or str).
        :param priority: :data:`PRIORITY_LOW` (0), :data:`PRIORITY_NORMAL`
            (1, the default) or :data:`PRIORITY_HIGH` (2 and up).
        :raises StatusError: the service answered with an error status
            (``e.status``, e.g. 5 for an unknown service).
        :raises Timeout: no answer in time (the call is cancelled).
        :raises ProxyGone, ConnectError: the proxy is gone or unreachable.
        """
        data = _bytes(body)
        resp = _lib.Buffer()
        if headers is not None or priority is not None:
            opts, _keep = _options(timeout, headers, priority)
            with self._h as ptr:
                check(
                    _lib.client_call_opts(
                        ptr, service.encode(), method.encode(), data, len(data), ctypes.byref(opts), ctypes.byref(resp)
                    )
                )
            return _lib.take_buffer(resp)
        with self._h as ptr:
            rc = _lib.client_call(
                ptr,
                service.encode(),
                method.encode(),
                data,
                len(data),
                _timeout_ms(timeout),
                ctypes.byref(resp),
            )
            check(rc)
        return _lib.take_buffer(resp)

    def close(self) -> None:
        """Close the client (waits for calls in flight on other threads)."""
        self._h.close()

    @property
    def closed(self) -> bool:
        return self._h.closed

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        h = getattr(self, "_h", None)
        if h is not None:
            h.close()
