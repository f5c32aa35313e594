"""An OpenAI-compatible chat server on 127.0.0.1 that misbehaves on purpose, for the tests.

Each request's user text names its record and what to do: ``rid=<id> case=<case>`` (429 with
Retry-After, 500s, slower than the client timeout, refusals, 400s, ...). It records every
request it gets.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY_ENV = "POVID_TEST_OPENAI_KEY"
SLOW_SECONDS = 1.5  # a "slow" answer; the client timeout in these tests is 0.5 s


class FakeChatServer:
    """``POST /v1/chat/completions`` with per-record failures; records every request it gets."""

    def __init__(self, ok_delay: float = 0.0, default_answer: str = "A dog sits on a chair next to a cat.") -> None:
        self.ok_delay = ok_delay
        self.default_answer = default_answer  # for a request that names no record (a fixed prompt)
        self.requests = defaultdict(list)  # rid -> [(arrival time, status)]
        self.bodies = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                try:
                    server.handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        if h.path != "/v1/chat/completions":
            return self.send(h, 404, {"error": {"message": f"no route {h.path}"}})
        user = body["messages"][-1]["content"]
        text = user if isinstance(user, str) else next(p["text"] for p in user if p["type"] == "text")
        named = re.search(r"rid=(\S+)", text)
        # A fixed prompt (an evaluation's) names no record: the image then tells requests apart.
        rid = named.group(1) if named else f"anon{hash(json.dumps(user)) & 0xFFFF:x}"
        case = re.search(r"case=(\w+)", text).group(1) if named else "plain"
        with self.lock:  # count the attempt on arrival: a slow one may still be running
            self.requests[rid].append([time.monotonic(), None])
            entry, attempt = self.requests[rid][-1], len(self.requests[rid])
            self.bodies.append(body)
        if case == "slow" and attempt == 1:
            entry[1] = "slow"  # answered after the client stopped waiting
        status, payload, headers = self.behave(case, attempt, rid)
        entry[1] = entry[1] or status
        self.send(h, status, payload, headers)

    def behave(self, case, attempt, rid):
        """(status, JSON body, headers) for attempt number ``attempt`` of a record."""
        if case == "rate" and attempt == 1:
            return 429, {"error": {"message": "slow down", "type": "rate_limit_error"}}, {"Retry-After": "1"}
        if (case == "e500" and attempt <= 2) or case == "dead":
            return 500, {"error": {"message": "boom", "type": "server_error"}}, {}
        if case == "auth":
            return 401, {"error": {"message": "bad key", "type": "invalid_request_error"}}, {}
        if case == "badreq":
            return 400, {"error": {"message": "cannot read image", "type": "invalid_request_error"}}, {}
        if case == "slow" and attempt == 1:
            time.sleep(SLOW_SECONDS)
        answer = f"rid={rid} case={case}. A blue bus waits beside three cars and a dog."
        if case == "plain":
            answer = self.default_answer
        if case == "refuse" or (case == "refuse_once" and attempt == 1):
            answer = "I'm sorry, but I can't help with that request."
        elif case == "same":
            answer = f"rid={rid} case={case}. A red bus waits beside two cars."
        elif case == "long":
            answer = "A very long answer. " * 60
        time.sleep(self.ok_delay)
        return 200, _completion(answer), {}

    @staticmethod
    def send(h, status, payload, headers=None):
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)


def _completion(content):
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 1700000000, "model": "fake-4o-0001",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
    }  # fmt: skip


def kill_when_written(module: str, argv: list, cwd: Path, watched: Path, lines: int, timeout: float = 120) -> None:
    """Run ``python -m module *argv`` and SIGKILL it as soon as ``watched`` holds ``lines`` lines."""

    def written() -> int:
        return len(watched.read_text().splitlines()) if watched.exists() else 0

    proc = subprocess.Popen([sys.executable, "-m", module, *argv], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=os.environ.copy())  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while written() < lines:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, f"{module} wrote nothing in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
