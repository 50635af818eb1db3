"""Generation at 10k and 100k records: time, memory and the cached re-run, with flat memory.

    python -m benchmarks.scale [--sizes 10000,100000] [--concurrencies 64,256] [--curate 10000]

- `InstantServer` is a stand-in for a GPU fleet: an OpenAI-compatible server on 127.0.0.1
  that answers every chat completion at once with a short canned reply, so the numbers
  measure alignfoundry's side (client, cache, writing), not a model.
- Each size runs in a fresh process (so its peak RSS is its own): synthetic instructions
  are generated lazily, streamed through `LLMClient.stream` (a bounded window of requests
  in flight, every response written to the SQLite cache as it arrives) and written to
  Parquet row groups as they come back, one file per partition of 10k records. Then the
  same run again, served from the cache.
- The client's requests/s against the server, at each concurrency, beside a raw
  `openai.AsyncOpenAI` loop in the same process.
- `--curate N`: the curated asset's work (exact dedup, decontamination, MiniLM embeddings
  and LanceDB near-dedup) on N real-size records.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PARTITION = 10_000
REPLY = json.dumps(
    {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "instant",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "A short, complete answer."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
    }
).encode()


class InstantServer:
    """A stand-in for a GPU fleet: answers every chat completion immediately."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(b'{"object":"list","data":[{"id":"instant","owned_by":"vllm"}]}')

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._send(REPLY)

        ThreadingHTTPServer.request_queue_size = 1024
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def instructions(n: int):
    """Real-size synthetic instructions (about 60 words), made one at a time."""
    topics = ("a budget", "a garden", "a bug", "a trip", "a recipe", "a poem", "an essay")
    for i in range(n):
        yield (
            f"Record {i}: help me with {topics[i % len(topics)]}. Explain the main steps, the "
            f"usual mistakes and how to check the result, for someone who has {i % 17} hours "
            "and no special tools, in a friendly tone and with a short example at the end."
        )


def run_size(n: int, base_url: str, work: Path, concurrency: int) -> dict:
    """One size, in this process: stream, write partitions, then the cached re-run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from synth.llm import GenerationParams, LLMClient, LLMRequest, ResponseCache, make_backend

    params = GenerationParams(max_tokens=16, temperature=0.0)
    cache = work / "cache.sqlite"
    schema = pa.schema(
        [("record", pa.int64()), ("instruction", pa.string()), ("response", pa.string())]
    )

    def one_pass() -> tuple[float, int, int]:
        client = LLMClient(
            make_backend("openai", model="instant", base_url=base_url),
            ResponseCache(cache),
            concurrency,
        )
        texts: dict[int, str] = {}

        def requests():
            for i, text in enumerate(instructions(n)):
                texts[i] = text
                yield LLMRequest.chat(text, params=params)

        start, written, writer, part, buf = time.perf_counter(), 0, None, -1, []
        for i, resp in client.stream(requests(), window=4 * concurrency):
            buf.append((i, texts.pop(i), resp.text))
            if len(buf) >= 5_000:
                written += len(buf)
                p = buf[0][0] // PARTITION
                if p != part:  # a new partition file; results arrive almost in order
                    if writer:
                        writer.close()
                    part, writer = p, pq.ParquetWriter(work / f"part-{p:04d}.parquet", schema)
                writer.write_table(pa.table(list(zip(*buf, strict=True)), schema=schema))
                buf = []
        if buf:
            written += len(buf)
            writer = writer or pq.ParquetWriter(work / "part-last.parquet", schema)
            writer.write_table(pa.table(list(zip(*buf, strict=True)), schema=schema))
        if writer:
            writer.close()
        return time.perf_counter() - start, client.stats.calls, written

    first, calls, written = one_pass()
    again, recalls, _ = one_pass()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "records": n,
        "written": written,
        "seconds": round(first, 2),
        "records_per_s": round(n / first, 1),
        "calls": calls,
        "cached_rerun_s": round(again, 2),
        "cached_rerun_calls": recalls,
        "peak_rss_mib": round(rss, 1),
    }


def client_vs_raw(base_url: str, concurrency: int, n: int) -> dict:
    """Requests/s of LLMClient and of a raw openai.AsyncOpenAI loop on the same server."""
    import openai

    from synth.llm import GenerationParams, LLMClient, LLMRequest, make_backend

    reqs = [LLMRequest.chat(t, params=GenerationParams(max_tokens=16)) for t in instructions(n)]
    client = LLMClient(
        make_backend("openai", model="instant", base_url=base_url), None, concurrency
    )
    t = time.perf_counter()
    client.generate(reqs)
    ours = n / (time.perf_counter() - t)

    async def raw() -> None:
        api = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=4)
        sem = asyncio.Semaphore(concurrency)

        async def one(r: LLMRequest) -> None:
            async with sem:
                await api.chat.completions.create(
                    model="instant", messages=r.message_dicts(), max_tokens=16
                )

        await asyncio.gather(*(one(r) for r in reqs))

    t = time.perf_counter()
    asyncio.run(raw())
    theirs = n / (time.perf_counter() - t)
    return {"concurrency": concurrency, "client_rps": round(ours, 1), "raw_rps": round(theirs, 1)}


def curate_at(n: int) -> dict:
    """The curated asset's library call on n records (dedup, decontamination, LanceDB)."""
    import polars as pl

    from quality.curation import CurationSettings, CurationSpec, curate
    from quality.decontam import load_eval_items
    from quality.store import EmbeddingStore

    texts = list(instructions(n))
    df = pl.DataFrame(
        {
            "record_id": [f"r{i}" for i in range(n)],
            "instruction": texts,
            "input": [""] * n,
            "parent_ids": [[f"p{i}"] for i in range(n)],
        }
    )
    spec = CurationSpec("scale", ("instruction", "input"), ("instruction",))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        r = curate(
            df,
            spec,
            CurationSettings(),
            EmbeddingStore(Path(tmp) / "db"),
            load_eval_items(),
            "scale",
            "run",
        )
        dt = time.perf_counter() - t
    return {
        "records": n,
        "seconds": round(dt, 1),
        "records_per_s": round(n / dt, 1),
        "kept": r.kept.height,
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--concurrency", type=int, default=64, help="of the streaming runs")
    ap.add_argument("--concurrencies", default="64,256", help="of the client-vs-raw comparison")
    ap.add_argument("--rps-requests", type=int, default=4000)
    ap.add_argument("--curate", type=int, default=0, help="also curate this many records")
    ap.add_argument("--one-size", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--base-url", default="", help=argparse.SUPPRESS)
    ap.add_argument("--rps-at", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rps_at:  # a child: the client comparison, off the server's interpreter lock
        print(json.dumps(client_vs_raw(a.base_url, a.rps_at, a.rps_requests)))
        return
    if a.one_size:  # a child: one size, its own peak memory
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run_size(a.one_size, a.base_url, Path(tmp), a.concurrency)))
        return
    server = InstantServer()

    def child(args: list) -> dict:
        """A measurement in a fresh process: its own peak memory, and its own interpreter
        lock (the server's threads would otherwise share this one's)."""
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.scale", "--base-url", server.base_url]
            + [str(x) for x in args],
            capture_output=True,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        if out.returncode:
            raise SystemExit(f"benchmarks.scale {' '.join(map(str, args))}:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    try:
        sizes = [int(x) for x in a.sizes.split(",")]
        rows = [child(["--one-size", n, "--concurrency", a.concurrency]) for n in sizes]
        rps = [
            child(["--rps-at", c, "--rps-requests", a.rps_requests])
            for c in (int(x) for x in a.concurrencies.split(","))
        ]
    finally:
        server.close()
    print(f"\n$ python -m benchmarks.scale {' '.join(argv)}".rstrip())
    print(
        f"InstantServer on 127.0.0.1 (a stand-in for a GPU fleet), {os.cpu_count()} cores, window {4 * a.concurrency}\n"
    )
    print("| records | records/s | peak RSS (MiB) | cached re-run (s) | re-run calls |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['records']:,} | {r['records_per_s']} | {r['peak_rss_mib']} | {r['cached_rerun_s']} | {r['cached_rerun_calls']} |"
        )
    if len(rows) >= 2:
        small, big = rows[0], rows[-1]
        print(
            f"\ngrowth {big['records'] // small['records']}x records: time {big['seconds'] / small['seconds']:.2f}x, "
            f"peak memory {big['peak_rss_mib'] / small['peak_rss_mib']:.2f}x"
        )
    print("\n| concurrency | LLMClient req/s | raw openai.AsyncOpenAI req/s | ratio |")
    print("|---:|---:|---:|---:|")
    for r in rps:
        print(
            f"| {r['concurrency']} | {r['client_rps']} | {r['raw_rps']} | {r['client_rps'] / r['raw_rps']:.2f}x |"
        )
    if a.curate:
        c = curate_at(a.curate)
        print(
            f"\ncuration of {c['records']:,} records: {c['seconds']} s ({c['records_per_s']} records/s), {c['kept']} kept"
        )


if __name__ == "__main__":
    main()
