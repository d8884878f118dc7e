"""meshshm: call services through the meshshm sidecar proxy over shared memory.

A thin ctypes binding of ``libmeshshm`` (see the package README for where
the library is looked for)::

    import meshshm

    with meshshm.Client() as client:
        assert client.call("echo", "Echo", b"hi", timeout=1.0) == b"hi"

    with meshshm.Server("greeter") as server:
        server.serve(lambda req: b"hello, " + req.body)

    async with await meshshm.AsyncClient.connect() as client:
        await client.call("echo", "Echo", b"hi")
"""

from . import _lib
from .aio import AsyncClient
from .client import DEFAULT_TIMEOUT, PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL, Client
from .errors import (
    Cancelled,
    Closed,
    ConnectError,
    InternalError,
    InvalidArgument,
    MeshshmError,
    NotInFlight,
    ProtocolError,
    ProxyGone,
    Rejected,
    StatusError,
    Timeout,
)
from .server import Request, Server

#: status codes a service answers with
STATUS_OK = 0
STATUS_CANCELLED = 1
STATUS_UNKNOWN = 2
STATUS_INVALID_ARGUMENT = 3
STATUS_DEADLINE_EXCEEDED = 4
STATUS_NOT_FOUND = 5
STATUS_PERMISSION_DENIED = 7
STATUS_RESOURCE_EXHAUSTED = 8
STATUS_INTERNAL = 13
STATUS_UNAVAILABLE = 14


def library_version() -> str:
    """The version of the loaded libmeshshm."""
    return _lib.version().decode()


__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Cancelled",
    "Client",
    "Closed",
    "ConnectError",
    "DEFAULT_TIMEOUT",
    "InternalError",
    "InvalidArgument",
    "MeshshmError",
    "NotInFlight",
    "PRIORITY_HIGH",
    "PRIORITY_LOW",
    "PRIORITY_NORMAL",
    "ProtocolError",
    "ProxyGone",
    "Rejected",
    "Request",
    "Server",
    "StatusError",
    "Timeout",
    "library_version",
]
