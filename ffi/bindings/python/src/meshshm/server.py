"""The server side: an app that serves one service through the proxy."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import threading
import time
from typing import Callable, Optional, Tuple, Union

from . import _lib
from ._handle import Handle
from .client import BytesLike, _bytes, _path
from .errors import ERR_TIMEOUT, check

#: A handler returns a body (status 0) or ``(status, body)`` or ``(status, body, message)``.
HandlerResult = Union[bytes, Tuple[int, bytes], Tuple[int, bytes, str]]

#: How often a waiting ``next``/``serve`` looks whether it should stop.
_SLICE_MS = 200


@dataclasses.dataclass(frozen=True)
class Request:
    """A request delivered to a :class:`Server`."""

    id: int
    service: str
    method: str
    body: bytes
    #: seconds left for the answer when the request was delivered (None: no deadline)
    timeout: Optional[float]
    #: 0 low, 1 normal, 2+ high, as the caller set it
    priority: int
    #: the request headers in order, as ``(name, value)`` pairs (values are bytes)
    headers: Tuple[Tuple[str, bytes], ...] = ()

    def header(self, name: str) -> Optional[bytes]:
        """The value of the first header called ``name`` (case-sensitive), or ``None``."""
        return next((v for k, v in self.headers if k == name), None)


class Server:
    """Registered with the proxy as the handler of ``service``.

    ``next`` is for one thread at a time; ``reply`` may be called from any
    thread.

    >>> with Server("greeter") as s:            # doctest: +SKIP
    ...     s.serve(lambda req: b"hello, " + req.body)
    """

    def __init__(self, service: str, socket_path: Union[str, "os.PathLike[str]", None] = None):
        ptr = _lib.server_p()
        check(_lib.server_bind(_path(socket_path), service.encode(), ctypes.byref(ptr)))
        self.service = service
        self._h = Handle(ptr.value, _lib.server_close, "server")
        self._stop = threading.Event()

    def next(self, timeout: Optional[float] = None) -> Optional[Request]:
        """The next request; ``None`` if ``timeout`` seconds pass first, or
        the server was closed or stopped meanwhile.

        :raises ProxyGone: the proxy went away.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        req = _lib.Request()
        hdrs = _lib.Headers()
        while not self._stop.is_set():
            slice_ms = _SLICE_MS
            if deadline is not None:
                left = deadline - time.monotonic()
                slice_ms = max(0, min(slice_ms, int(left * 1000)))
            try:
                ptr = self._h.acquire()
            except Exception:
                return None
            try:
                rc = _lib.server_next_with_headers(ptr, ctypes.byref(req), ctypes.byref(hdrs), slice_ms)
                if rc == ERR_TIMEOUT:
                    if deadline is not None and time.monotonic() >= deadline:
                        return None
                    continue
                check(rc)
            finally:
                self._h.release()
            try:
                return Request(
                    id=req.id,
                    service=ctypes.string_at(req.service).decode(),
                    method=ctypes.string_at(req.method).decode(),
                    body=ctypes.string_at(req.body.data, req.body.len) if req.body.len else b"",
                    timeout=req.timeout_ms / 1000 if req.timeout_ms else None,
                    priority=req.priority,
                    headers=_lib.take_headers(hdrs),
                )
            finally:
                _lib.request_free(ctypes.byref(req))
                _lib.headers_free(ctypes.byref(hdrs))
        return None

    def reply(
        self,
        request: Union[Request, int],
        body: BytesLike = b"",
        status: int = 0,
        message: Optional[str] = None,
    ) -> None:
        """Answer ``request`` (or a request id) with ``status`` (0 = OK) and ``body``."""
        rid = request.id if isinstance(request, Request) else int(request)
        data = _bytes(body)
        with self._h as ptr:
            check(
                _lib.server_reply_message(
                    ptr, rid, status, None if message is None else message.encode(), data, len(data)
                )
            )

    def is_cancelled(self, request: Union[Request, int]) -> bool:
        """Whether no one waits for the answer to ``request`` (or a request id)
        any more: its caller timed out or went away, or it was answered
        already. A long handler can check now and then and give up; a reply
        to such a request is dropped. Never waits."""
        rid = request.id if isinstance(request, Request) else int(request)
        with self._h as ptr:
            return check(_lib.server_is_cancelled(ptr, rid)) == 1

    def serve(self, handler: Callable[[Request], HandlerResult]) -> None:
        """Answer requests with ``handler`` until :meth:`stop` or :meth:`close`.

        An exception in the handler answers status 13 (internal) with its text.
        """
        while not self._stop.is_set():
            req = self.next()
            if req is None:
                continue
            try:
                out = handler(req)
            except Exception as e:  # the caller gets an error status, the server goes on
                self.reply(req, b"", 13, f"{type(e).__name__}: {e}")
                continue
            if isinstance(out, tuple):
                self.reply(req, out[1], out[0], out[2] if len(out) > 2 else None)
            else:
                self.reply(req, out)

    def serve_in_thread(self, handler: Callable[[Request], HandlerResult]) -> threading.Thread:
        """Run :meth:`serve` on a daemon thread; :meth:`stop` or :meth:`close` ends it."""
        t = threading.Thread(target=self.serve, args=(handler,), name=f"meshshm-server-{self.service}", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        """Make :meth:`serve` and waiting :meth:`next` calls return (within 0.2 s)."""
        self._stop.set()

    def close(self) -> None:
        """Stop serving and unregister (waits for a ``next`` in progress)."""
        self._stop.set()
        self._h.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        h = getattr(self, "_h", None)
        if h is not None:
            h.close()
