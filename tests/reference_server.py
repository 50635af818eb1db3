"""ReferenceJudgeServer: a TEST DOUBLE that plays a capable model for known items.

The embedded 135M model judges at chance, so it cannot show that a family's logic
produces its paper's effect when the model is good. This server stands in for a capable
judge, reward model or user simulator, from a table of known answers written for this
project (the ground truth comes from the fixture's author reading the policy or the
rubric, never from the code under test):

- POST /v1/chat/completions: the entry whose `when` strings all occur in the request's
  messages answers. `choices` ({"Yes": 0.9, "No": 0.1}) answers with the likeliest one as
  text and, when asked, those probabilities as the first token's logprobs, so the
  families' judges take their normal logprob path; `reply` is plain text; `json` is a
  structured reply.
- POST /pooling: a reward model's scalar (`reward`), vLLM's pooling reply shape.
- GET /v1/models: one model, owned by `reference`.

An unknown request gets HTTP 404 with a message that names it, never a guess; two
entries that match equally well get 422. Both are counted in `unknown`.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

FIXTURES = Path(__file__).parent / "fixtures" / "reference"


@dataclass(frozen=True)
class Entry:
    when: tuple[str, ...]
    choices: dict[str, float] | None = None
    reply: str | None = None
    json: Any = None
    reward: float | None = None

    @property
    def kind(self) -> str:
        return "pooling" if self.reward is not None else "chat"

    @staticmethod
    def of(d: dict[str, Any]) -> Entry:
        when = d["when"]
        return Entry(
            tuple([when] if isinstance(when, str) else when),
            d.get("choices"),
            d.get("reply"),
            d.get("json"),
            d.get("reward"),
        )


def load_entries(name: str) -> list[Entry]:
    """The entries of tests/fixtures/reference/<name>.yaml (a list under `entries`)."""
    doc = yaml.safe_load((FIXTURES / f"{name}.yaml").read_text(encoding="utf-8"))
    return [Entry.of(e) for e in doc["entries"]]


def chat_completion(text: str, logprobs: list[dict] | None) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": "stop",
    }
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {
        "id": "chatcmpl-reference",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "reference",
        "choices": [choice],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


@dataclass
class ReferenceJudgeServer:
    entries: list[Entry]
    model: str = "reference-judge"
    requests: dict[str, int] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send(
                    200, {"object": "list", "data": [{"id": outer.model, "owned_by": "reference"}]}
                )

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                kind = "pooling" if self.path.rstrip("/").endswith("/pooling") else "chat"
                with outer._lock:
                    outer.requests[kind] = outer.requests.get(kind, 0) + 1
                status, reply = outer.answer(kind, body)
                self._send(status, reply)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def match(self, kind: str, text: str) -> tuple[Entry | None, str]:
        hits = [e for e in self.entries if e.kind == kind and all(w in text for w in e.when)]
        if not hits:
            return None, "no fixture for this request"
        # The most specific entry wins: most `when` strings, then the longest.
        rank = max((len(e.when), sum(map(len, e.when))) for e in hits)
        best = [e for e in hits if (len(e.when), sum(map(len, e.when))) == rank]
        if len(best) > 1:
            return None, f"{len(best)} fixtures match this request equally well"
        return best[0], ""

    def answer(self, kind: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        text = "\n".join(str(m.get("content", "")) for m in body.get("messages") or [])
        entry, why = self.match(kind, text)
        if entry is None:
            with self._lock:
                self.unknown.append(text)
            status = 422 if "equally" in why else 404
            return status, {"error": {"message": f"reference judge: {why}: {text[-200:]!r}"}}
        if kind == "pooling":
            return 200, {"object": "list", "data": [{"index": 0, "data": [entry.reward]}]}
        if entry.choices is not None:
            probs = entry.choices
            top = max(probs, key=probs.__getitem__)
            lps = None
            if body.get("logprobs"):
                k = int(body.get("top_logprobs") or len(probs))
                tops = sorted(probs.items(), key=lambda kv: -kv[1])[:k]
                lps = [
                    {
                        "token": top,
                        "logprob": math.log(probs[top]),
                        "top_logprobs": [
                            {"token": c, "logprob": math.log(max(p, 1e-9))} for c, p in tops
                        ],
                    }
                ]
            return 200, chat_completion(top, lps)
        if entry.json is not None:
            return 200, chat_completion(json.dumps(entry.json), None)
        return 200, chat_completion(entry.reply or "", None)

    def __enter__(self) -> ReferenceJudgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
