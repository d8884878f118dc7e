"""The blocking client."""

from __future__ import annotations

import ctypes
import math
import os
from typing import Optional, Union

from . import _lib
from ._handle import Handle
from .errors import check

BytesLike = Union[bytes, bytearray, memoryview]

#: The timeout of :meth:`Client.call` when none is given, in seconds.
DEFAULT_TIMEOUT = 30.0


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
    ) -> bytes:
        """Call ``service``/``method`` with ``body``; return the response body.

        :param timeout: seconds to wait (``None``: no limit).
        :raises StatusError: the service answered with an error status
            (``e.status``, e.g. 5 for an unknown service).
        :raises Timeout: no answer in time (the call is cancelled).
        :raises ProxyGone, ConnectError: the proxy is gone or unreachable.
        """
        data = _bytes(body)
        resp = _lib.Buffer()
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
