"""The blocking client against the real proxy."""

from __future__ import annotations

import os
import threading

import pytest

import meshshm


@pytest.mark.parametrize("size", [0, 1, 1024, 64 * 1024, 1 << 20, 5 << 20])
def test_echo_round_trip(client, size):
    body = os.urandom(size)
    assert client.call("echo", "Echo", body, timeout=10) == body


def test_bytes_like_bodies(client):
    assert client.call("echo", "Echo", bytearray(b"abc")) == b"abc"
    assert client.call("echo", "Echo", memoryview(b"xyz")) == b"xyz"
    with pytest.raises(TypeError):
        client.call("echo", "Echo", "not bytes")


def test_unknown_service_is_a_status_error(client):
    with pytest.raises(meshshm.StatusError) as e:
        client.call("no-such-service", "Get", b"x", timeout=2)
    assert e.value.status == meshshm.STATUS_NOT_FOUND
    assert e.value.status_name == "not found"
    assert e.value.code == -6


def test_timeout(proxy, client):
    with meshshm.Server("py-silent", proxy.socket):  # registered, never answers
        with pytest.raises(meshshm.Timeout) as e:
            client.call("py-silent", "Wait", b"x", timeout=0.2)
        assert isinstance(e.value, TimeoutError)


def test_proxy_not_running(tmp_path):
    with pytest.raises(meshshm.ConnectError) as e:
        meshshm.Client(tmp_path / "nobody.sock")
    assert isinstance(e.value, ConnectionError)
    assert "nobody.sock" in str(e.value)
    with pytest.raises(meshshm.ConnectError):
        meshshm.Server("svc", tmp_path / "nobody.sock")


def test_concurrent_calls_from_threads(client):
    errors = []

    def work(t):
        try:
            for i in range(100):
                body = f"thread {t} call {i}".encode()
                assert client.call("echo", "Echo", body) == body
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert not any(t.is_alive() for t in threads)


def test_closed_client(proxy):
    c = meshshm.Client(proxy.socket)
    with c:
        assert c.call("echo", "Echo", b"1") == b"1"
    assert c.closed
    with pytest.raises(meshshm.Closed):
        c.call("echo", "Echo", b"2")
    c.close()  # twice is fine


def test_bad_timeout(client):
    with pytest.raises(ValueError):
        client.call("echo", "Echo", b"", timeout=-1)
    assert client.call("echo", "Echo", b"none", timeout=None) == b"none"


def test_library_version():
    assert meshshm.library_version() == "0.1.0"
