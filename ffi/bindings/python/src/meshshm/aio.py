"""The asyncio API, on libmeshshm's completion file descriptor.

Calls are sent without blocking the event loop (``meshshm_client_send``);
the loop watches the client's eventfd (``loop.add_reader``) and, when it
becomes readable, takes the finished calls (``meshshm_client_poll``) and
resolves their futures. Cancelling a call's task cancels the call.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import os
from typing import Dict, Optional, Union

from . import _lib
from .client import DEFAULT_TIMEOUT, BytesLike, Client, HeadersLike, _bytes, _options
from .errors import Closed, check, error_from

_BATCH = 64


class AsyncClient:
    """An asyncio client; one per event loop.

    >>> async with await AsyncClient.connect() as c:      # doctest: +SKIP
    ...     await c.call("echo", "Echo", b"hi", timeout=1.0)
    b'hi'
    """

    def __init__(self, client: Client):
        self._client = client
        self._pending: Dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        with client._h as ptr:
            self._fd = check(_lib.client_fd(ptr))

    @classmethod
    async def connect(cls, socket_path: Union[str, "os.PathLike[str]", None] = None) -> "AsyncClient":
        """Connect without blocking the loop (the handshakes run in the default executor).

        :raises ConnectError: the proxy is not running.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: cls(Client(socket_path)))

    def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self._fd, self._drain)
        elif self._loop is not loop:
            raise RuntimeError("an AsyncClient is bound to the event loop that first used it")

    def _drain(self) -> None:
        done = (_lib.Completion * _BATCH)()
        try:
            ptr = self._client._h.acquire()
        except Closed:
            return
        try:
            while True:
                n = _lib.client_poll(ptr, done, _BATCH, 0)
                if n <= 0:
                    break
                for i in range(n):
                    c = done[i]
                    fut = self._pending.pop(c.user_data, None)
                    try:
                        if fut is None or fut.done():
                            continue
                        body = ctypes.string_at(c.body.data, c.body.len) if c.body.len else b""
                        if c.result == 0:
                            fut.set_result(body)
                        else:
                            msg = ctypes.string_at(c.error).decode("utf-8", "replace") if c.error else ""
                            fut.set_exception(error_from(c.result, msg, c.status, body))
                    finally:
                        _lib.completion_free(ctypes.byref(c))
                if n < _BATCH:
                    break
        finally:
            self._client._h.release()

    async def call(
        self,
        service: str,
        method: str,
        body: BytesLike = b"",
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        *,
        headers: Optional[HeadersLike] = None,
        priority: Optional[int] = None,
    ) -> bytes:
        """As :meth:`meshshm.Client.call` (``headers``, ``priority`` too),
        awaitable; cancelling the task cancels the call."""
        self._watch()
        data = _bytes(body)
        opts, _keep = _options(timeout, headers, priority)
        uid = next(self._ids)
        fut = self._loop.create_future()
        call_id = ctypes.c_uint64()
        self._pending[uid] = fut
        try:
            with self._client._h as ptr:
                check(
                    _lib.client_send_opts(
                        ptr,
                        service.encode(),
                        method.encode(),
                        data,
                        len(data),
                        ctypes.byref(opts),
                        uid,
                        ctypes.byref(call_id),
                    )
                )
        except BaseException:
            self._pending.pop(uid, None)
            raise
        try:
            return await fut
        except asyncio.CancelledError:
            self._pending.pop(uid, None)
            try:
                with self._client._h as ptr:
                    _lib.client_cancel(ptr, call_id.value)  # NOT_FOUND if it finished meanwhile
            except Closed:
                pass
            raise

    def close(self) -> None:
        """Close; calls still pending fail with :class:`~meshshm.errors.Closed`."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(Closed("the client is closed"))
        self._client.close()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()
