"""A ``lora-arith serve`` subprocess for tests: 127.0.0.1, a free port, stopped by the test."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class Server:
    """A ``lora-arith serve`` subprocess on 127.0.0.1 and a free port."""

    def __init__(self, *args: str, program: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        """``lora-arith serve ARGS``; or ``program ARGS`` (another server that announces its
        address as ``on http://127.0.0.1:PORT`` on stderr), with ``env`` added to the environment."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {})}
        env["OMP_NUM_THREADS"] = "1"  # the test process computes too: two threads each thrash on 2 cores
        program = program or [sys.executable, "-m", "lora_arith", "serve", "--host", "127.0.0.1", "--port", "0"]
        self.process = subprocess.Popen([*program, *args], env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []

    def wait(self, timeout: float = 120) -> "Server":
        """Wait until the server listens (it announces its port on stderr)."""
        if hasattr(self, "url"):
            return self
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            match = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            if match:
                self.url = f"http://127.0.0.1:{match.group(1)}"
                break
        else:
            self.stop()
        if not hasattr(self, "url"):
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))
        threading.Thread(target=self._drain, daemon=True).start()
        return self

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    def client(self, api_key: str = "unused", **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=300, **kwargs)

    def request(
        self, path: str, body: bytes | dict | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict, dict[str, str]]:
        """(status, JSON body, headers) of a GET (no ``body``) or POST to ``path``."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})} if data is not None else dict(headers or {})
        request = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read()), dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read()), dict(error.headers)

    def post(self, body: bytes | dict, path: str = "/v1/chat/completions") -> tuple[int, dict]:
        status, reply, _ = self.request(path, body)
        return status, reply

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


