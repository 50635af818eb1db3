"""UltraPrompt: MCTS against best-of-N rewriting at an equal budget of LLM calls per seed.

    python -m benchmarks.ultraprompt_search [--seeds 24] [--iterations 16] [--samples 2]
    python -m benchmarks.ultraprompt_search --llm [--backend embedded|openai --base-url URL --model NAME]

Both methods get the same seeds, rewriter, responder and reward, and the same budget:
MCTS runs `iterations` successful expansions; best-of-N rewrites the original N =
iterations times with random allowed principles and keeps the best. Each costs 1 rewrite
+ k responses + k rewards per expansion, so the table's calls per seed match.

- The synthetic landscape (default): a simulated rewriter appends one clause per
  principle, the responder echoes which principles the request carries, and the reward
  depends on the SET of principles on the path: each seed has a hidden target of three
  distinct principles that compose; a node scores 0.3 + 0.15 per target principle - 0.1
  per other principle, +0.25 when all three are there (the optimum, 1.0, needs depth >= 3),
  with per-response noise. Its known optimum makes "did the search find it" measurable.
- `--llm`: real seeds (Self-Instruct and HH-RLHF from ../shared/data) with the configured
  model as rewriter, responder and reward judge.

Gain = reward of the best node - reward of the original; "optimum" = share of seeds whose
best node is the landscape's optimum.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from synth.llm import LLMClient, LLMRequest, Sample, Usage, make_backend
from synth.ultraprompt.principles import allowed_principles, load_principles
from synth.ultraprompt.search import SearchSettings, SeedTask, Tree, best_of_n, search

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CATEGORIES = ("helpfulness", "harmlessness", "honesty", "coding", "math")
TARGET_SIZE = 3


class SyntheticLandscape:
    """An in-process backend that plays rewriter, responder and reward model for seeds it
    was built with. Deterministic: the same request always gets the same answer."""

    kind, model, identity, supports_response_format = "pooling", "landscape", "landscape", False

    def __init__(self, seeds: Sequence[SeedTask], noise: float = 0.05, seed: int = 0) -> None:
        principles = load_principles()
        self.clause = {
            name: f"Also, {p.how.split(',')[0].strip().rstrip('.')}."
            for name, p in principles.items()
        }
        rng = random.Random(seed)
        self.targets = {
            s.instruction: frozenset(rng.sample(allowed_principles(s.category), TARGET_SIZE))
            for s in seeds
        }
        self.noise = noise

    def applied(self, text: str) -> set[str]:
        return {name for name, c in self.clause.items() if c in text}

    def reward(self, original: str, principles: set[str]) -> float:
        target = self.targets[original]
        hit, miss = len(principles & target), len(principles - target)
        return 0.3 + 0.15 * hit - 0.1 * miss + (0.25 if target <= principles else 0.0)

    def optimum(self, original: str) -> float:
        return self.reward(original, set(self.targets[original]))

    async def complete(self, request: LLMRequest, sample_index: int) -> Sample:
        user = request.messages[-1].content if request.messages[-1].role == "user" else ""
        if request.template_id == "ultraprompt_rewrite":
            node = user.split('"""\n', 1)[1].split('\n"""', 1)[0]
            how = user.split("Rewrite this request to ", 1)[1].split(". Keep the user's")[0]
            name = next(n for n, p in load_principles().items() if p.how == how)
            text = f"{node} {self.clause[name]}"
        elif request.template_id == "ultraprompt_respond":
            text = "An answer that covers: " + ", ".join(sorted(self.applied(user))) + "."
        else:  # the reward model: [original request, response]
            original, response = request.messages[0].content, request.messages[-1].content
            got = set(response.split(": ", 1)[1].rstrip(".").split(", ")) - {""}
            h = hashlib.sha256(f"{response}|{sample_index}|{request.params.seed}".encode())
            jitter = random.Random(h.hexdigest()).gauss(0, self.noise)
            score = self.reward(original, got) + jitter
            return Sample(text=repr(score), finish_reason="stop", parsed=score, usage=Usage())
        return Sample(text=text, finish_reason="stop", usage=Usage())


def unit_embedder(texts: Sequence[str]) -> np.ndarray:
    """Every text the same unit vector: the landscape does not test intent drift."""
    return np.ones((len(texts), 1))


def landscape_seeds(n: int) -> list[SeedTask]:
    subjects = ("a budget", "a poem", "a proof", "a bug report", "a recipe", "a history essay")
    return [
        SeedTask(
            f"seed{i}",
            f"Help me write {subjects[i % len(subjects)]} about topic {i}.",
            CATEGORIES[i % len(CATEGORIES)],
        )
        for i in range(n)
    ]


def summary(trees: list[Tree], optimum: dict[str, float] | None = None) -> dict[str, float]:
    ok = [t for t in trees if not t.failure]
    gains = [t.best().reward - t.root.reward for t in ok]
    out = {
        "seeds": len(ok),
        "calls_per_seed": statistics.mean(t.calls for t in ok),
        "mean_gain": statistics.mean(gains),
        "improved": sum(g > 0 for g in gains) / len(gains),
        "mean_best": statistics.mean(t.best().reward for t in ok),
        "max_depth": max(n.depth for t in ok for n in t.simulated()),
        "optimum": float("nan"),
    }
    if optimum is not None:
        # the best node's principle set is the target (its noisy reward is not compared)
        found = [t for t in ok if _path_set(t, t.best()) == _target(t, optimum)]
        out["optimum"] = len(found) / len(ok)
    return out


def _path_set(tree: Tree, node) -> frozenset[str]:
    return frozenset(tree.path_actions(node))


def _target(tree: Tree, optimum) -> frozenset[str]:
    return optimum[tree.root.instruction]


def compare_on_landscape(
    n_seeds: int, iterations: int, samples: int, noise: float = 0.05, seed: int = 0
) -> list[dict[str, float]]:
    """MCTS and best-of-N on the synthetic landscape: one summary row each."""
    tasks = landscape_seeds(n_seeds)
    world = SyntheticLandscape(tasks, noise, seed)
    settings = SearchSettings(iterations=iterations, samples=samples, seed=seed, retries=0)
    rows = []
    for method in ("mcts", "best_of_n"):
        client = LLMClient(world, cache=None, max_concurrency=64, role="generator")
        start = time.perf_counter()
        if method == "mcts":
            trees = search(client, tasks, settings, embedder=unit_embedder, reward_client=client)
        else:
            trees = best_of_n(
                client, tasks, iterations, settings, embedder=unit_embedder, reward_client=client
            )
        wall = time.perf_counter() - start
        row = {"method": method, **summary(trees, world.targets)}
        row["calls_per_s"], row["wall_s"] = client.stats.calls / wall, wall
        rows.append(row)
    return rows


def compare_on_llm(a: argparse.Namespace) -> list[dict[str, float]]:
    from synth.loaders import load_instructions, load_preference_pairs
    from synth.ultraprompt.seeds import SeedSelection, select_seeds

    backend = make_backend(a.backend, model=a.model, base_url=a.base_url)
    judge_client = LLMClient(backend, cache=None, max_concurrency=8, role="judge")
    instructions = load_instructions(str(DATA / "self-instruct-seed-tasks.jsonl")).kept
    pairs = load_preference_pairs(str(DATA / "hh-rlhf-harmless-base-test.jsonl.gz"), limit=40).kept
    seeds, _, _ = select_seeds(
        instructions,
        pairs,
        SeedSelection(per_category=-(-a.seeds // 5), heldout_every=0),
        client=judge_client,
    )
    tasks = [
        SeedTask(r["record_id"], r["instruction"], r["category"])
        for r in seeds.head(a.seeds).iter_rows(named=True)
    ]
    settings = SearchSettings(iterations=a.iterations, samples=a.samples)
    rows = []
    for method in ("mcts", "best_of_n"):
        client = LLMClient(backend, cache=None, max_concurrency=8)
        start = time.perf_counter()
        if method == "mcts":
            trees = search(client, tasks, settings)
        else:
            trees = best_of_n(client, tasks, a.iterations, settings)
        wall = time.perf_counter() - start
        row = {"method": method, **summary(trees)}
        row["calls_per_s"], row["wall_s"] = client.stats.calls / wall, wall
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, float]], title: str) -> None:
    print(title + "\n")
    print(
        "| method | seeds | calls/seed | mean gain | improved | optimum found | mean best | max depth | calls/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        opt = "—" if r["optimum"] != r["optimum"] else f"{r['optimum']:.2f}"
        print(
            f"| {r['method']} | {r['seeds']} | {r['calls_per_seed']:.1f} | {r['mean_gain']:.4f} | "
            f"{r['improved']:.2f} | {opt} | {r['mean_best']:.4f} | {r['max_depth']} | {r['calls_per_s']:.1f} |"
        )
    m, b = rows
    ratio = m["mean_gain"] / b["mean_gain"] if b["mean_gain"] else float("inf")
    print(f"\nMCTS gain / best-of-N gain = {ratio:.2f}")


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=24)
    ap.add_argument("--iterations", type=int, default=16)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--llm", action="store_true", help="real seeds and the configured model")
    ap.add_argument("--backend", default="embedded")
    ap.add_argument("--base-url", default="")
    ap.add_argument("--model", default="")
    a = ap.parse_args(argv)
    print(f"\n$ python -m benchmarks.ultraprompt_search {' '.join(argv)}".rstrip() + "\n")
    if a.llm:
        rows = compare_on_llm(a)
        print_table(rows, f"{a.backend} model, {a.seeds} real seeds, budget N = {a.iterations}")
    else:
        rows = compare_on_landscape(a.seeds, a.iterations, a.samples, a.noise)
        print_table(
            rows,
            f"synthetic landscape: {a.seeds} seeds, optimum at depth {TARGET_SIZE}, noise {a.noise}, budget N = {a.iterations}",
        )


if __name__ == "__main__":
    main()
