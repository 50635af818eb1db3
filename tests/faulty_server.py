"""FaultyOpenAIServer: a deliberately faulty OpenAI-compatible endpoint for fault injection.

It is a fake by design, used only to inject faults the real server never produces on
demand: 429 with Retry-After, 500, malformed JSON, a truncated body, a hang. Each fault
plays for the first `times` requests, then it answers with a valid chat completion.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = (
    "ok",
    "slow",
    "rate_limit",
    "server_error",
    "malformed_json",
    "truncated",
    "hang",
    "no_choices",
)


def completion(text: str = "fault-free answer") -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-faulty",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "faulty",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
        }
    ).encode()


class FaultyOpenAIServer:
    def __init__(
        self, fault: str, times: int = 10**9, retry_after: float = 1.0, hang_s: float = 30.0
    ):
        assert fault in FAULTS, fault
        self.fault, self.times, self.retry_after, self.hang_s = fault, times, retry_after, hang_s
        self.requests = 0
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(
                self,
                status: int,
                body: bytes,
                headers: dict | None = None,
                length: int | None = None,
            ):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if length is None else length))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def do_GET(self):
                self._send(200, json.dumps({"object": "list", "data": [{"id": "faulty"}]}).encode())

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer._lock:
                    outer.requests += 1
                    faulty = outer.requests <= outer.times
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    self._answer(outer.fault if faulty else "ok")
                finally:
                    with outer._lock:
                        outer.in_flight -= 1

            def _answer(self, fault: str):
                if fault == "ok":
                    self._send(200, completion())
                elif fault == "rate_limit":
                    self._send(
                        429,
                        b'{"error": {"message": "slow down"}}',
                        {"Retry-After": str(outer.retry_after)},
                    )
                elif fault == "server_error":
                    self._send(500, b'{"error": {"message": "boom"}}')
                elif fault == "malformed_json":
                    self._send(200, b'{"choices": [{"message": {"content": "unterminated')
                elif fault == "no_choices":
                    self._send(200, b'{"object": "chat.completion", "choices": []}')
                elif fault == "truncated":
                    body = completion()
                    self._send(200, body[: len(body) // 2], length=len(body))
                    self.close_connection = True
                elif fault == "slow":
                    time.sleep(0.3)
                    self._send(200, completion())
                elif fault == "hang":
                    time.sleep(outer.hang_s)
                    self._send(200, completion())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FaultyOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
