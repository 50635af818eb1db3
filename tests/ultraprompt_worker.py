"""Worker for the UltraPrompt kill-and-resume test: search fixed seeds into a cache."""

import sys

import polars as pl

from synth.llm import EmbeddedBackend, LLMClient, ResponseCache
from synth.ultraprompt.dataset import synthesize
from synth.ultraprompt.search import SearchSettings

SEEDS = pl.DataFrame(
    {
        "record_id": ["k1", "k2", "k3"],
        "instruction": [
            "Write a python function that checks whether a number is prime.",
            "What is the history of the printing press?",
            "Suggest three ideas for a rainy weekend.",
        ],
        "category": ["coding", "honesty", "helpfulness"],
        "split": ["search"] * 3,
    }
)
SETTINGS = SearchSettings(iterations=3, samples=1, response_max_tokens=40, rewrite_max_tokens=60)


def client(cache_path: str) -> LLMClient:
    return LLMClient(EmbeddedBackend(n_parallel=2), ResponseCache(cache_path), max_concurrency=2)


if __name__ == "__main__":
    synthesize(client(sys.argv[1]), SEEDS, SETTINGS)
