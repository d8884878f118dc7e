"""A C handle that many threads may use while one of them closes it.

The C API requires that ``*_close`` runs after every other use of the handle
has returned; this guard makes that true from Python: ``close()`` marks the
handle closed (new uses raise :class:`~meshshm.errors.Closed`) and the last
user out releases it.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from .errors import Closed


class Handle:
    def __init__(self, ptr: int, release: Callable[[int], None], what: str):
        self._ptr: Optional[int] = ptr
        self._release = release
        self._what = what
        self._users = 0
        self._closing = False
        self._lock = threading.Lock()

    def acquire(self) -> int:
        with self._lock:
            if self._closing or self._ptr is None:
                raise Closed(f"the {self._what} is closed")
            self._users += 1
            return self._ptr

    def release(self) -> None:
        ptr = None
        with self._lock:
            self._users -= 1
            if self._closing and self._users == 0:
                ptr, self._ptr = self._ptr, None
        if ptr is not None:
            self._release(ptr)

    def close(self) -> None:
        ptr = None
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if self._users == 0:
                ptr, self._ptr = self._ptr, None
        if ptr is not None:
            self._release(ptr)

    @property
    def closed(self) -> bool:
        return self._closing

    def __enter__(self) -> int:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
