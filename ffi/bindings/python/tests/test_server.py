"""Python servers, called from Python and from the C example client."""

from __future__ import annotations

import subprocess

import pytest

import meshshm


def handler(req: meshshm.Request):
    if req.method == "fail":
        return (meshshm.STATUS_PERMISSION_DENIED, b"", "not you")
    if req.method == "boom":
        raise RuntimeError("handler exploded")
    return b"py:" + req.body.upper()


@pytest.fixture
def py_server(proxy):
    with meshshm.Server("py-upper", proxy.socket) as s:
        t = s.serve_in_thread(handler)
        yield s
        s.stop()
        t.join(5)


def test_python_server_python_client(py_server, client):
    assert client.call("py-upper", "Up", b"hello") == b"py:HELLO"
    big = b"a" * (3 << 20)
    assert client.call("py-upper", "Up", big, timeout=20) == b"py:" + b"A" * (3 << 20)
    with pytest.raises(meshshm.StatusError) as e:
        client.call("py-upper", "fail")
    assert e.value.status == meshshm.STATUS_PERMISSION_DENIED
    assert "not you" in str(e.value)
    with pytest.raises(meshshm.StatusError) as e:
        client.call("py-upper", "boom")
    assert e.value.status == meshshm.STATUS_INTERNAL
    assert "handler exploded" in str(e.value)


def test_python_server_c_client(py_server, proxy, c_client):
    """Cross-language: the C example client calls a Python server."""
    r = subprocess.run(
        [c_client, "-s", proxy.socket, "py-upper", "Up", "from c"], capture_output=True, timeout=30
    )
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b"py:FROM C"
    r = subprocess.run([c_client, "-s", proxy.socket, "py-upper", "fail"], capture_output=True, timeout=30)
    assert r.returncode == 2
    assert b"status 7" in r.stderr and b"not you" in r.stderr


def test_next_times_out_and_request_fields(proxy, client):
    with meshshm.Server("py-manual", proxy.socket) as s:
        assert s.next(timeout=0.05) is None
        import threading

        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", client.call("py-manual", "M", b"q", timeout=5)))
        t.start()
        req = s.next(timeout=5)
        assert req is not None
        assert (req.service, req.method, req.body) == ("py-manual", "M", b"q")
        assert req.timeout is not None and 0 < req.timeout <= 5
        s.reply(req, b"answer")
        t.join(5)
        assert out["r"] == b"answer"


def test_server_close_stops_serving(proxy):
    s = meshshm.Server("py-closing", proxy.socket)
    t = s.serve_in_thread(lambda r: r.body)
    s.close()
    t.join(5)
    assert not t.is_alive()


def describe(req: meshshm.Request) -> bytes:
    """What reached the server: b"<priority>|name=value|..."."""
    return b"|".join([b"%d" % req.priority] + [k.encode() + b"=" + v for k, v in req.headers])


@pytest.fixture
def describe_server(proxy):
    with meshshm.Server("py-describe", proxy.socket) as s:
        t = s.serve_in_thread(describe)
        yield s
        s.stop()
        t.join(5)


def test_headers_and_priority_reach_the_server(describe_server, client):
    got = client.call(
        "py-describe",
        "M",
        b"x",
        timeout=5,
        headers=[("x-trace", "abc"), ("x-bin", b"a\0b"), ("x-trace", bytearray(b"2"))],
        priority=meshshm.PRIORITY_HIGH,
    )
    assert got == b"2|x-trace=abc|x-bin=a\0b|x-trace=2"
    assert client.call("py-describe", "M", headers={"k": b""}, priority=meshshm.PRIORITY_LOW) == b"0|k="
    assert client.call("py-describe", "M") == b"1"  # the plain call: normal priority, no headers
    with pytest.raises(meshshm.InvalidArgument):
        client.call("py-describe", "M", headers={"": b"v"})
    with pytest.raises(ValueError):
        client.call("py-describe", "M", priority=256)
    with pytest.raises(ValueError):
        client.call("py-describe", "M", headers={"a\0b": b""})


def test_request_header_accessor(proxy, client):
    import threading

    with meshshm.Server("py-hdr", proxy.socket) as s:
        out = {}
        t = threading.Thread(
            target=lambda: out.setdefault("r", client.call("py-hdr", "M", headers=[("a", "1"), ("a", "2")]))
        )
        t.start()
        req = s.next(timeout=5)
        assert req is not None
        assert req.headers == (("a", b"1"), ("a", b"2"))
        assert req.header("a") == b"1" and req.header("b") is None
        assert req.priority == meshshm.PRIORITY_NORMAL
        s.reply(req, b"ok")
        t.join(5)
        assert out["r"] == b"ok"


def test_is_cancelled_after_the_caller_times_out(proxy, client):
    import threading
    import time

    with meshshm.Server("py-hold", proxy.socket) as s:
        assert s.is_cancelled(987654321)  # never handed out
        errors = []

        def call():
            try:
                client.call("py-hold", "Slow", timeout=1.0)
            except meshshm.Timeout as e:
                errors.append(e)

        t = threading.Thread(target=call)
        t.start()
        req = s.next(timeout=5)
        assert req is not None
        assert not s.is_cancelled(req)  # the caller still waits
        deadline = time.monotonic() + 10
        while not s.is_cancelled(req) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.is_cancelled(req.id)
        t.join(10)
        assert len(errors) == 1  # the caller timed out
        s.reply(req, b"late")  # dropped, not an error

        t = threading.Thread(target=lambda: errors.append(client.call("py-hold", "Fast", timeout=5)))
        t.start()
        req = s.next(timeout=5)
        assert req is not None and not s.is_cancelled(req)
        s.reply(req, b"ok")
        assert s.is_cancelled(req)  # answered
        t.join(5)
        assert errors[-1] == b"ok"
