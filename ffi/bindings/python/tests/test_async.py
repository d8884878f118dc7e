"""The asyncio API (on the library's completion fd)."""

from __future__ import annotations

import asyncio
import os

import pytest

import meshshm


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_async_echo_many_in_flight(proxy):
    async def main():
        async with await meshshm.AsyncClient.connect(proxy.socket) as c:
            bodies = [os.urandom(n) for n in (0, 1, 1024, 1 << 20)] + [b"%d" % i for i in range(200)]
            got = await asyncio.gather(*(c.call("echo", "Echo", b, timeout=10) for b in bodies))
            assert got == bodies

    run(main())


def test_async_errors(proxy, tmp_path):
    async def main():
        async with await meshshm.AsyncClient.connect(proxy.socket) as c:
            with pytest.raises(meshshm.StatusError) as e:
                await c.call("no-such-service", "Get", b"")
            assert e.value.status == 5
            with meshshm.Server("py-async-silent", proxy.socket):
                with pytest.raises(meshshm.Timeout):
                    await c.call("py-async-silent", "Wait", b"", timeout=0.2)
                task = asyncio.ensure_future(c.call("py-async-silent", "Wait", b"", timeout=None))
                await asyncio.sleep(0.1)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert await c.call("echo", "Echo", b"still fine") == b"still fine"
        with pytest.raises(meshshm.ConnectError):
            await meshshm.AsyncClient.connect(tmp_path / "nobody.sock")

    run(main())


def test_async_with_python_server(proxy):
    async def main():
        with meshshm.Server("py-async-upper", proxy.socket) as s:
            t = s.serve_in_thread(lambda r: r.body.upper())
            async with await meshshm.AsyncClient.connect(proxy.socket) as c:
                got = await asyncio.gather(*(c.call("py-async-upper", "U", b"x%d" % i) for i in range(50)))
                assert got == [b"X%d" % i for i in range(50)]
            s.stop()
            t.join(5)

    run(main())


def test_async_headers_and_priority(proxy):
    server = meshshm.Server("py-async-describe", proxy.socket)
    t = server.serve_in_thread(lambda r: b"%d|" % r.priority + b",".join(k.encode() + b"=" + v for k, v in r.headers))

    async def main():
        async with await meshshm.AsyncClient.connect(proxy.socket) as c:
            got = await c.call(
                "py-async-describe", "M", timeout=5, headers={"x-a": "1", "x-b": b"\0"}, priority=meshshm.PRIORITY_LOW
            )
            assert got == b"0|x-a=1,x-b=\0"
            assert await c.call("py-async-describe", "M") == b"1|"

    try:
        run(main())
    finally:
        server.close()
        t.join(5)
