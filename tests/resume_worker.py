"""Worker for the kill-and-resume test: generate a fixed batch into a cache, slowly."""

import sys

from synth.llm import EmbeddedBackend, GenerationParams, LLMClient, LLMRequest, ResponseCache

TOPICS = [f"topic number {i}" for i in range(16)]


def requests() -> list[LLMRequest]:
    return [
        LLMRequest.chat(
            f"Write two sentences about {t}.", params=GenerationParams(max_tokens=48, seed=11)
        )
        for t in TOPICS
    ]


if __name__ == "__main__":
    client = LLMClient(EmbeddedBackend(n_parallel=2), ResponseCache(sys.argv[1]), max_concurrency=2)
    client.generate(requests())
