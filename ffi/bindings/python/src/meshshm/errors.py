"""Exceptions: one per libmeshshm error code, all under :class:`MeshshmError`."""

from __future__ import annotations

from typing import Dict, Optional, Type

from . import _lib

OK = 0
ERR_INVALID_ARGUMENT = -1
ERR_CONNECT = -2
ERR_REJECTED = -3
ERR_PROXY_GONE = -4
ERR_TIMEOUT = -5
ERR_STATUS = -6
ERR_PROTOCOL = -7
ERR_CLOSED = -8
ERR_INTERNAL = -9
ERR_CANCELLED = -10
ERR_NOT_FOUND = -11
ERR_SYSTEM = -12


class MeshshmError(Exception):
    """A libmeshshm call failed. ``code`` is the negative C error code."""

    code = 0

    def __init__(self, message: str, code: Optional[int] = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message


class InvalidArgument(MeshshmError, ValueError):
    code = ERR_INVALID_ARGUMENT


class ConnectError(MeshshmError, ConnectionError):
    """The proxy is not running or cannot be reached."""

    code = ERR_CONNECT


class Rejected(MeshshmError, ConnectionError):
    """The proxy refused the handshake."""

    code = ERR_REJECTED


class ProxyGone(MeshshmError, ConnectionError):
    """The proxy went away during the call (a later call reconnects)."""

    code = ERR_PROXY_GONE


class Timeout(MeshshmError, TimeoutError):
    """The timeout passed before the answer came; the call was cancelled."""

    code = ERR_TIMEOUT


class StatusError(MeshshmError):
    """The service answered with a non-OK status (``status``; e.g. 5 = not found)."""

    code = ERR_STATUS

    def __init__(self, message: str, status: int, body: bytes = b""):
        super().__init__(message)
        self.status = status
        self.status_name = _lib.status_name(status).decode()
        self.body = body


class ProtocolError(MeshshmError):
    code = ERR_PROTOCOL


class Closed(MeshshmError):
    code = ERR_CLOSED


class InternalError(MeshshmError):
    code = ERR_INTERNAL


class Cancelled(MeshshmError):
    code = ERR_CANCELLED


class NotInFlight(MeshshmError, LookupError):
    code = ERR_NOT_FOUND


class SystemError_(MeshshmError, OSError):
    code = ERR_SYSTEM


_BY_CODE: Dict[int, Type[MeshshmError]] = {
    c.code: c
    for c in (
        InvalidArgument,
        ConnectError,
        Rejected,
        ProxyGone,
        Timeout,
        ProtocolError,
        Closed,
        InternalError,
        Cancelled,
        NotInFlight,
        SystemError_,
    )
}


def error_from(code: int, message: Optional[str] = None, status: int = 0, body: bytes = b"") -> MeshshmError:
    """The exception for ``code``; the message defaults to this thread's last error."""
    if message is None:
        message = _lib.last_error().decode("utf-8", "replace")
    if code == ERR_STATUS:
        return StatusError(message, status, body)
    cls = _BY_CODE.get(code)
    if cls is None:
        return MeshshmError(f"{_lib.strerror(code).decode()}: {message}", code)
    return cls(message)


def check(code: int) -> int:
    """Raise for a negative code; return a non-negative one."""
    if code < 0:
        raise error_from(code, status=_lib.last_status() if code == ERR_STATUS else 0)
    return code
