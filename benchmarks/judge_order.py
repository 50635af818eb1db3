"""Judge requests in prefix order against the order they were made in: the same Yes/No
questions about the same replies on the embedded model, alternating the two orders in one
process (so machine noise hits both), each on fresh replies so no prompt is cached from
an earlier round.

    python -m benchmarks.judge_order [--replies 16] [--questions 2] [--rounds 2]

Prints the median seconds per round of each order and its ratio to the order as made.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from synth.llm import LLMClient
from synth.llm.backends import EmbeddedBackend
from synth.llm.judge import JUDGE_PARAMS, prefix_order
from synth.personaknob.synthesis import verify_request

QUESTIONS = (
    "Does the reply acknowledge the user's feelings in a warm way?",
    "Does the reply disagree with or correct what the user claimed?",
    "Does the reply warn about a risk or admit uncertainty?",
    "Does the reply offer an original idea beyond the obvious answer?",
)


def requests(tag: str, replies: int, questions: int) -> list:
    """Each reply asked every question, reply by reply (how the families build them)."""
    out = []
    for i in range(replies):
        prompt = f"I am sure my plan {tag}-{i} to quit my job tomorrow is great, right?"
        reply = f"Plan {tag}-{i}: " + "I hear you, and here is what I would check first. " * 6
        out += [verify_request(prompt, reply, q) for q in QUESTIONS[:questions]]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replies", type=int, default=16)
    ap.add_argument("--questions", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    client = LLMClient(EmbeddedBackend())
    client.generate(requests("warmup", 1, 1))
    times: dict[str, list[float]] = {"as made": [], "prefix order": []}
    for k in range(a.rounds):
        for name in times:
            reqs = [
                replace(r, params=JUDGE_PARAMS)
                for r in requests(f"{name}-{k}", a.replies, a.questions)
            ]
            if name == "prefix order":
                reqs = [reqs[i] for i in prefix_order(reqs)]
            t = time.perf_counter()
            client.generate(reqs)
            times[name].append(time.perf_counter() - t)
    print("command: python -m benchmarks.judge_order " + " ".join(argv or []))
    print(
        f"{a.replies} replies x {a.questions} questions, {a.rounds} rounds, embedded SmolLM2-135M"
    )
    print("| order | seconds (median) | ratio |\n|---|---:|---:|")
    base = statistics.median(times["as made"])
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {statistics.median(ts) / base:.2f}x |")


if __name__ == "__main__":
    main()
