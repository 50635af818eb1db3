"""PersonaAtlas trajectory throughput: the same planned conversations (sampled personas,
real Self-Instruct queries) through the embedded backend in process (the baseline) and
through llama.cpp's OpenAI-compatible server on 127.0.0.1 at concurrency 1 and 8.

    python -m benchmarks.personaatlas [--personas 4] [--queries 2] [--max-turns 3]

The cache is off, so every call is made. Trajectories per minute count kept
conversations; LLM calls per second count every call (style, distractor, assistant,
user simulator).
"""

import argparse
import time
from pathlib import Path

from benchmarks.llm_overhead import start_server
from synth.llm import LLMClient, make_backend
from synth.loaders import load_instructions
from synth.personaatlas.personas import PERSONA_SCHEMA, sample_personas
from synth.personaatlas.trajectories import AtlasSettings, synthesize_trajectories
from synth.records import frame

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def personas_frame(s: AtlasSettings, n: int):
    import json

    rows = [
        {
            "record_id": f"bench-persona-{i}",
            "parent_ids": [],
            "provenance": None,
            "source": "sampled",
            "persona_index": i,
            "split": "train",
            "description": "",
            "features": json.dumps(full),
            "observed": json.dumps(observed),
            "observed_dims": len(observed),
            "observed_constraints": 0,
        }
        for i, (full, observed) in enumerate(sample_personas(s.schema(), n, seed=s.seed))
    ]
    return frame(rows, PERSONA_SCHEMA)


def run(client: LLMClient, personas, queries, s: AtlasSettings) -> tuple[int, float, int]:
    t0 = time.perf_counter()
    kept, _, _ = synthesize_trajectories(client, personas, queries, s)
    return kept.height, time.perf_counter() - t0, client.stats.calls


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--personas", type=int, default=4)
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--max-turns", type=int, default=3)
    ap.add_argument("--port", type=int, default=8391)
    a = ap.parse_args(argv)
    s = AtlasSettings(
        queries_per_persona=a.queries,
        max_turns=a.max_turns,
        turns_mean=min(3.0, a.max_turns),
        assistant_max_tokens=64,
        user_max_tokens=64,
    )
    personas = personas_frame(s, a.personas)
    queries = load_instructions(str(DATA / "self-instruct-seed-tasks.jsonl"), limit=60).kept
    rows = []
    n, dt, calls = run(LLMClient(make_backend("embedded"), None, 8), personas, queries, s)
    rows.append(("embedded, in process (baseline)", 8, n, dt, calls))
    server = start_server(a.port, 8)
    try:
        for concurrency in (1, 8):
            backend = make_backend(
                "openai", model="smollm2", base_url=f"http://127.0.0.1:{a.port}/v1"
            )
            n, dt, calls = run(LLMClient(backend, None, concurrency), personas, queries, s)
            rows.append(("local OpenAI-compatible server", concurrency, n, dt, calls))
    finally:
        server.terminate()
        server.wait(10)
    base = rows[0][2] / rows[0][3]
    print(
        f"python -m benchmarks.personaatlas --personas {a.personas} --queries {a.queries} --max-turns {a.max_turns}"
    )
    print(
        "| backend | concurrency | trajectories | seconds | trajectories/min | LLM calls/s | ratio to baseline |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, c, n, dt, calls in rows:
        print(
            f"| {name} | {c} | {n} | {dt:.1f} | {60 * n / dt:.2f} | {calls / dt:.2f} | {n / dt / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
