"""UltraPrompt: MCTS against best-of-N rewriting at an equal budget of LLM calls per seed.

    python -m benchmarks.ultraprompt_search [--seeds 10] [--iterations 6] [--samples 2]
        [--backend embedded|openai --base-url URL --model NAME]

Both methods see the same seeds (taken for diversity from the real Self-Instruct seed
tasks and HH-RLHF first turns in ../shared/data), the same target model, the same judge
and the same reward (mean judged score of k responses against the ORIGINAL intent). MCTS
runs `iterations` expansions; best-of-N draws N = iterations random allowed principles,
rewrites the original with each and keeps the best. Both pay 2k calls for the root and
1 + 2k per surviving rewrite, so N = iterations is the same budget; the table reports the
calls each actually made. Gain = reward of the best node - reward of the original.
Throughput is LLM calls per second through the search, cache off.
"""

import argparse
import statistics
import time
from pathlib import Path

from synth.llm import LLMClient, make_backend
from synth.loaders import load_instructions, load_preference_pairs
from synth.ultraprompt.search import SearchSettings, SeedTask, Tree, best_of_n, search
from synth.ultraprompt.seeds import SeedSelection, select_seeds

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _summary(trees: list[Tree]) -> dict[str, float]:
    ok = [t for t in trees if not t.failure]
    gains = [t.best().reward - t.root.reward for t in ok]
    return {
        "seeds": len(ok),
        "calls_per_seed": statistics.mean(t.calls for t in ok),
        "mean_gain": statistics.mean(gains),
        "improved": sum(g > 0 for g in gains) / len(gains),
        "mean_best": statistics.mean(t.best().reward for t in ok),
        "max_depth": max(n.depth for t in ok for n in t.nodes),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--backend", default="embedded")
    ap.add_argument("--base-url", default="")
    ap.add_argument("--model", default="")
    a = ap.parse_args(argv)

    instructions = load_instructions(str(DATA / "self-instruct-seed-tasks.jsonl")).kept
    pairs = load_preference_pairs(str(DATA / "hh-rlhf-harmless-base-test.jsonl.gz"), limit=200).kept
    per_cat = -(-a.seeds // 5)
    seeds, _, _ = select_seeds(
        instructions, pairs, SeedSelection(per_category=per_cat, heldout_every=0)
    )
    tasks = [
        SeedTask(r["record_id"], r["instruction"], r["category"])
        for r in seeds.head(a.seeds).iter_rows(named=True)
    ]
    settings = SearchSettings(iterations=a.iterations, samples=a.samples)
    backend = make_backend(a.backend, model=a.model, base_url=a.base_url)

    rows = []
    for name in ("mcts", "best_of_n"):
        client = LLMClient(backend, cache=None, max_concurrency=8)
        start = time.perf_counter()
        if name == "mcts":
            trees = search(client, tasks, settings)
        else:
            trees = best_of_n(client, tasks, a.iterations, settings)
        wall = time.perf_counter() - start
        rows.append(
            {
                "method": name,
                **_summary(trees),
                "calls_per_s": client.stats.calls / wall,
                "wall_s": wall,
            }
        )

    print(
        f"\n$ python -m benchmarks.ultraprompt_search --seeds {a.seeds} --iterations {a.iterations} --samples {a.samples} --backend {a.backend}"
    )
    print(
        f"model: {backend.model}   seeds: {len(tasks)} from Self-Instruct + HH-RLHF   budget: N = iterations = {a.iterations}\n"
    )
    head = f"{'method':<10} {'seeds':>5} {'calls/seed':>10} {'mean gain':>9} {'improved':>8} {'mean best':>9} {'max depth':>9} {'calls/s':>7} {'wall s':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['method']:<10} {r['seeds']:>5} {r['calls_per_seed']:>10.1f} {r['mean_gain']:>9.4f} "
            f"{r['improved']:>8.2f} {r['mean_best']:>9.4f} {r['max_depth']:>9} {r['calls_per_s']:>7.2f} {r['wall_s']:>7.1f}"
        )
    m, b = rows
    ratio = m["mean_gain"] / b["mean_gain"] if b["mean_gain"] else float("inf")
    print(
        f"\nMCTS gain / best-of-N gain = {ratio:.2f}   MCTS throughput / best-of-N = {m['calls_per_s'] / b['calls_per_s']:.2f}"
    )


if __name__ == "__main__":
    main()
