"""Pipeline overhead of the LLM layer: the same N requests sent (a) straight to the
backend and (b) through the pipeline asset path (a Dagster asset using the `llm`
resource: cache writes, statistics, IO manager), in one process, alternating a/b.

    python -m benchmarks.llm_overhead [--n 96] [--max-tokens 32] [--concurrency 8] [--rounds 4]

Throughput is completion tokens per second. For the asset path the table reports two
numbers: the asset body (the LLM path as an asset sees it), and the whole
`materialize()` call, which adds Dagster's run bookkeeping and the Parquet write.
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

import httpx  # noqa: E402
import polars as pl  # noqa: E402
from dagster import AssetExecutionContext, Config, DagsterInstance, Output, asset, materialize  # noqa: E402

from assets.resources import LLMResource, ParquetIOManager  # noqa: E402
from synth.llm import GenerationParams, LLMRequest, make_backend  # noqa: E402


def bench_requests(n: int, max_tokens: int) -> list[LLMRequest]:
    params = GenerationParams(temperature=0.0, max_tokens=max_tokens, seed=0)
    return [
        LLMRequest.chat(f"Write a short note about item {i} on a shopping list.", params=params)
        for i in range(n)
    ]


class BenchConfig(Config):
    n: int = 96
    max_tokens: int = 32


@asset
def bench_responses(
    context: AssetExecutionContext, config: BenchConfig, llm: LLMResource
) -> Output[pl.DataFrame]:
    start = time.perf_counter()
    client = llm.client()
    out = client.generate(bench_requests(config.n, config.max_tokens))
    df = pl.DataFrame(
        {
            "text": [r.text for r in out],
            "tokens": [r.first.usage.completion_tokens for r in out],
            "ok": [r.ok for r in out],
        }
    )
    body_s = time.perf_counter() - start
    return Output(df, metadata={"body_s": body_s, **client.stats.as_metadata()})


def run_direct(backend, reqs: list[LLMRequest], concurrency: int) -> tuple[float, int]:
    async def go():
        sem = asyncio.Semaphore(concurrency)

        async def one(r):
            async with sem:
                return await backend.complete(r, 0)

        return await asyncio.gather(*(one(r) for r in reqs))

    start = time.perf_counter()
    samples = asyncio.run(go())
    return time.perf_counter() - start, sum(s.usage.completion_tokens for s in samples)


def run_asset(llm: LLMResource, home: Path, n: int, max_tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    result = materialize(
        [bench_responses],
        resources={"llm": llm, "io_manager": ParquetIOManager(base_dir=str(home / "storage"))},
        run_config={"ops": {"bench_responses": {"config": {"n": n, "max_tokens": max_tokens}}}},
        instance=DagsterInstance.ephemeral(),
    )
    whole = time.perf_counter() - start
    md = result.asset_materializations_for_node("bench_responses")[0].metadata
    assert md["llm_cache_hits"].value == 0, "the asset path must not be served from the cache"
    return md["body_s"].value, whole, md["llm_completion_tokens"].value


def start_server(port: int, parallel: int) -> subprocess.Popen:
    from assets.resources import _die_with_parent

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "synth.llm.local_server",
            "--port",
            str(port),
            "--parallel",
            str(parallel),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,  # a benchmark stopped any way takes its server with it
    )
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("local server did not start")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--port", type=int, default=18765)
    ap.add_argument("--backends", default="embedded,openai")
    a = ap.parse_args(argv)
    reqs = bench_requests(a.n, a.max_tokens)
    rows = []
    server = None
    try:
        for name in a.backends.split(","):
            if name == "openai":
                server = start_server(a.port, a.concurrency)
                kwargs = dict(base_url=f"http://127.0.0.1:{a.port}/v1", model="smollm2")
            else:
                kwargs = dict(n_parallel=a.concurrency)
            backend = make_backend(name, **kwargs)
            run_direct(backend, reqs[: a.concurrency], a.concurrency)  # warm-up
            direct, body, whole = [], [], []
            for r in range(a.rounds):
                with tempfile.TemporaryDirectory() as tmp:
                    home = Path(tmp)
                    llm = LLMResource(
                        backend=name,
                        max_concurrency=a.concurrency,
                        embedded_n_parallel=a.concurrency,
                        cache_path=str(home / f"cache{r}.sqlite"),
                        base_url=kwargs.get("base_url", ""),
                        model=kwargs.get("model", ""),
                    )
                    # ABBA order: whichever runs second may find llama.cpp's prompt cache warm.
                    if r % 2 == 0:
                        s, tok = run_direct(backend, reqs, a.concurrency)
                        b, w, tok2 = run_asset(llm, home, a.n, a.max_tokens)
                    else:
                        b, w, tok2 = run_asset(llm, home, a.n, a.max_tokens)
                        s, tok = run_direct(backend, reqs, a.concurrency)
                    direct.append(tok / s)
                    body.append(tok2 / b)
                    whole.append(tok2 / w)
                    print(
                        f"  {name} round {r}: direct {tok / s:.1f} tok/s ({tok} tok), asset body {tok2 / b:.1f}, "
                        f"materialize {tok2 / w:.1f} tok/s ({tok2} tok)",
                        file=sys.stderr,
                    )
            d, b, w = statistics.median(direct), statistics.median(body), statistics.median(whole)
            rows.append((name, d, b, w))
            if server is not None:
                server.terminate()
                server.wait(10)
                server = None
    finally:
        if server is not None:
            server.kill()

    cmd = "python -m benchmarks.llm_overhead " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    print(f"\n$ {cmd.strip()}")
    print(
        f"{a.n} requests, max_tokens {a.max_tokens}, temperature 0, concurrency {a.concurrency}, "
        f"median of {a.rounds} rounds in ABBA order, {os.cpu_count()} cores\n"
    )
    print("| backend | direct tok/s | asset body tok/s | ratio | materialize tok/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, d, b, w in rows:
        print(f"| {name} | {d:.1f} | {b:.1f} | {b / d:.3f} | {w:.1f} | {w / d:.3f} |")


if __name__ == "__main__":
    main()
