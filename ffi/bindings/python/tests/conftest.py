"""Fixtures: the real meshshm-proxy on a temporary socket, and the C example client."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

import meshshm

HERE = pathlib.Path(__file__).resolve().parent
FFI = HERE.parents[2]  # tests -> python -> bindings -> ffi
REPO = FFI.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """A meshshm-proxy process serving on a socket in a fresh temporary directory."""

    def __init__(self) -> None:
        binary = os.environ.get("MESHSHM_PROXY") or str(REPO / "target" / "debug" / "meshshm-proxy")
        if not os.path.exists(binary):
            pytest.fail(f"no proxy binary at {binary}: build it (cargo build -p meshshm-proxy) or set MESHSHM_PROXY")
        self.dir = tempfile.mkdtemp(prefix="meshshm-py-")
        self.socket = os.path.join(self.dir, "proxy.sock")
        self.proc = subprocess.Popen(
            [binary, "--socket", self.socket, "--tcp", f"127.0.0.1:{_free_port()}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                meshshm.Client(self.socket).close()
                return
            except meshshm.ConnectError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
                    self.stop()
                    pytest.fail(f"the proxy did not come up: {err}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def proxy():
    p = Proxy()
    yield p
    p.stop()


@pytest.fixture
def client(proxy):
    with meshshm.Client(proxy.socket) as c:
        yield c


def _lib_dir():
    env = os.environ.get("MESHSHM_LIB")
    if env:
        return env if os.path.isdir(env) else os.path.dirname(env)
    if shutil.which("pkg-config"):
        out = subprocess.run(["pkg-config", "--variable=libdir", "meshshm"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return str(REPO / "target" / "debug")


@pytest.fixture(scope="session")
def c_client(tmp_path_factory):
    """The C example client (ffi/examples/c/client.c): $MESHSHM_C_CLIENT, or built here with cc."""
    path = os.environ.get("MESHSHM_C_CLIENT")
    if path:
        return path
    out = tmp_path_factory.mktemp("c") / "meshshm-client"
    libdir = _lib_dir()
    cmd = [
        os.environ.get("CC", "cc"),
        "-o",
        str(out),
        str(FFI / "examples" / "c" / "client.c"),
        f"-I{FFI / 'include'}",
        f"-L{libdir}",
        "-lmeshshm",
        f"-Wl,-rpath,{libdir}",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot build the C client: {' '.join(cmd)}\n{r.stderr}")
    return str(out)
