"""`dovetail serve` in a child process on a free loopback port — for benchmarks and tests."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class LocalServer:
    base_url: str  # http://127.0.0.1:PORT
    api_key: str | None
    process: subprocess.Popen

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @classmethod
    def start(cls, *args: str, api_key: str | None = None, log_path: Path | None = None,
              ready_timeout: float = 120) -> LocalServer:
        """Start the server with these CLI flags; return once /health answers 200."""
        port = free_port()
        command = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), *args]
        if api_key:
            command += ["--api-key", api_key]
        if log_path is None:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.STDOUT)
        else:
            with open(log_path, "wb") as log:  # the child keeps its own handle
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + ready_timeout
        # One client for the polling: a new httpx client per poll loads its CA certificates,
        # CPU time that would disturb the server's start-up measurement of its costs.
        with httpx.Client(timeout=1) as client:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RuntimeError(f"server exited with {process.returncode}: {command}")
                try:
                    if client.get(base_url + "/health").status_code == 200:
                        return cls(base_url, api_key, process)
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        process.kill()
        raise RuntimeError("server did not become ready")

    def stop(self, timeout: float = 20) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
