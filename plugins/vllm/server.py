"""Start a real `vllm serve` subprocess on 127.0.0.1 and stop it by its own PID (tests, demo, benchmarks)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

VLLM = str(Path(sys.executable).with_name("vllm"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(model: Path, port: int, *extra: str, max_model_len: int = 512) -> list[str]:
    return [VLLM, "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--enforce-eager", "--max-model-len", str(max_model_len), *extra]


def post(port: int, path: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def vllm_server(model: Path, *extra: str, env: dict | None = None, log: Path, startup_timeout: float = 300,
                max_model_len: int = 512):
    """Yields (process, port) once /health answers; on exit SIGTERM by PID and wait for the exit."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen(serve_command(model, port, *extra, max_model_len=max_model_len), stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
    try:
        deadline = time.time() + startup_timeout
        while not _healthy(port):
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            if time.time() > deadline:
                raise TimeoutError(f"vllm serve not healthy after {startup_timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield process, port
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
