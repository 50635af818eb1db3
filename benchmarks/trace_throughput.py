"""TRACE costs: triage throughput (pairs/s) with the embedded judge and through a local
OpenAI-compatible server, and the impact-score cost per conflict pair.

    python -m benchmarks.trace_throughput [--pairs 32] [--impact-pairs 12] [--max-length 128]

Triage is timed for two prompt layouts on the same pairs, alternating, in one process:
- per-category (the layout before): the user turn opens with the policy rendered for the
  matched category only, so consecutive requests share little prefix;
- whole policy first (the layout now): the system prompt is the whole policy, the same for
  every request, so llama.cpp's per-slot prompt cache (and vLLM's prefix caching) reuse it.
The whole policy is longer, so what the cache saves shows as the ratio of the two.
Impact cost is also given as a ratio to a forward pass over the same pairs (reference
log-probs, no gradient), measured in the same process.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

from benchmarks.llm_overhead import start_server
from synth.llm import LLMClient, LLMRequest, Message, ResponseCache, make_backend
from synth.llm.judge import JUDGE_PARAMS
from synth.loaders import SHIPPED_SEEDS, load_preference_pairs
from synth.trace import triage
from synth.trace.policy import SHIPPED_POLICIES, load_policy
from synth.trace.triage import triage_pairs
from train.trace import (
    TraceConfig,
    _pair_batch,
    add_lora,
    impact_scores,
    sequence_logps,
    training_pair,
)

HH = (
    Path(__file__).resolve().parent.parent.parent
    / "shared"
    / "data"
    / "hh-rlhf-harmless-base-test.jsonl.gz"
)


def per_category_requests(policy, items: list[tuple[str, str]]) -> list[LLMRequest]:
    """The layout before: a short system prompt, then the policy for the matched category
    only (its description, exceptions and the rules) at the start of the user turn."""
    out = []
    for prompt, response in items:
        cat = policy.category(policy.match_category(prompt))
        lines = [f"{policy.title} (version {policy.version})", policy.description.strip()]
        if cat is not None:
            lines.append(f"Relevant category: {cat.name} (tier {cat.tier}): {cat.description}")
            lines += [
                f"Exception ({e.id}): {e.text.strip()}"
                for e in policy.exceptions
                if cat.id in e.applies_to
            ]
        lines += ["Rules:", *(f"- {t}" for _, t in policy.requirements)]
        user = (
            "Policy:\n" + "\n".join(lines) + f"\n\nConversation:\nUser: {prompt}\n"
            f"Assistant: {response}\n\nDoes the assistant's response violate the policy? Answer Yes or No."
        )
        system = (
            "You review assistant responses for compliance with a written policy. Answer Yes or No."
        )
        out.append(
            LLMRequest(
                (Message("system", system), Message("user", user)),
                JUDGE_PARAMS,
                template_id="legacy",
            )
        )
    return out


def timed_triage(backend, pairs, policy, layout: str) -> tuple[float, int, int]:
    """(seconds, pairs, judge calls) of one cold-cache triage with the given prompt layout."""
    original = triage.violation_requests
    if layout == "per-category":
        triage.violation_requests = per_category_requests
    try:
        with tempfile.TemporaryDirectory() as tmp:
            client = LLMClient(backend, ResponseCache(Path(tmp) / "c.sqlite"), 8)
            t = time.perf_counter()
            out = triage_pairs(client, pairs, policy)
            dt = time.perf_counter() - t
    finally:
        triage.violation_requests = original
    return dt, out.triaged.height + out.review.height + out.rejected.height, client.stats.calls


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--impact-pairs", type=int, default=12)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--port", type=int, default=18766)
    ap.add_argument("--policy", default="tiered_2026.yaml", help="a shipped policy file")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    source = str(HH if HH.exists() else SHIPPED_SEEDS / "preference_pairs.jsonl")
    pairs = load_preference_pairs(source, limit=a.pairs).kept
    policy = load_policy(SHIPPED_POLICIES / a.policy)
    rows = []
    server = start_server(a.port, 8)
    try:
        for name, kwargs in (
            ("embedded", {}),
            ("openai", {"base_url": f"http://127.0.0.1:{a.port}/v1", "model": "smollm2"}),
        ):
            backend = make_backend(name, **kwargs)
            seconds: dict[str, list[float]] = {"per-category": [], "whole policy first": []}
            for _ in range(a.rounds):
                for layout in seconds:
                    dt, n, calls = timed_triage(backend, pairs, policy, layout)
                    seconds[layout].append(dt)
            for layout, times in seconds.items():
                best = min(times)
                rows.append(
                    (
                        f"triage, {name} judge, {layout}",
                        n / best,
                        f"{n} pairs, {calls} judge calls, best of {a.rounds}: {best:.1f}s",
                    )
                )
            ratio = min(seconds["per-category"]) / min(seconds["whole policy first"])
            rows.append(
                (
                    f"triage, {name} judge, whole policy / per-category",
                    ratio,
                    "throughput ratio (>1: faster)",
                )
            )
    finally:
        server.terminate()

    from train.models import load_causal_lm

    cfg = TraceConfig(
        output_dir=tempfile.mkdtemp(),
        max_length=a.max_length,
        gold_batch_size=6,
        use_cpu=True,
        report_to=[],
    )
    base, tok = load_causal_lm()
    model = add_lora(base, cfg)
    labelled = [
        dict(r, label=("RETAIN", "INVERT", "PUNISH")[i % 3])
        for i, r in enumerate(pairs.head(a.impact_pairs).to_dicts())
    ]
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.no_grad():
        for r in labelled:
            sequence_logps(model, _pair_batch(tok, [training_pair(r)], a.max_length, model.device))
    forward = (time.perf_counter() - t) / len(labelled)
    t = time.perf_counter()
    weights, _ = impact_scores(model, tok, labelled, cfg)
    impact_total = time.perf_counter() - t
    n_conflict = sum(r["label"] != "RETAIN" for r in labelled)
    per_pair = impact_total / n_conflict
    assert abs(sum(weights) - 1.0) < 1e-6 or sum(weights) == 0.0

    print(
        f"\n$ python -m benchmarks.trace_throughput {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    )
    print(
        f"source {Path(source).name}, policy {policy.name}@{policy.version}, {os.cpu_count()} cores, max_length {a.max_length}\n"
    )
    print("| measurement | value | detail |")
    print("|---|---:|---|")
    for label, value, detail in rows:
        unit = "x" if "/" in label else " pairs/s"
        print(f"| {label} | {value:.2f}{unit} | {detail} |")
    print(
        f"| impact score, per conflict pair | {per_pair:.2f} s | {n_conflict} conflict pairs + gold batch of {cfg.gold_batch_size}, {impact_total:.1f}s total |"
    )
    print(
        f"| impact score / reference forward pass | {per_pair / forward:.1f}x | forward {forward:.2f} s per pair |"
    )
    by_label = (
        pl.DataFrame({"label": [r["label"] for r in labelled], "impact_weight": weights})
        .group_by("label")
        .agg(pl.col("impact_weight").sum())
        .sort("label")
    )
    shares = ", ".join(f"{lab} {w:.2f}" for lab, w in by_label.iter_rows())
    print(f"\nimpact weight by label (sums to 1 over conflict pairs): {shares}")


if __name__ == "__main__":
    main()
