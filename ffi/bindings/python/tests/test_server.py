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
