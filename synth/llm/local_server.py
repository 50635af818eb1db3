"""Serve a GGUF model (the embedded SmolLM2 by default) as an OpenAI-compatible server.

    python -m synth.llm.local_server --port 8080
    ALIGNFOUNDRY_LLM_BACKEND=openai ALIGNFOUNDRY_LLM_BASE_URL=http://127.0.0.1:8080/v1 \
    ALIGNFOUNDRY_LLM_MODEL=smollm2 make demo

It is llama.cpp's own server (xllamacpp), bound to 127.0.0.1: a real server for tests,
benchmarks and for sharing one loaded model between processes.
"""

from __future__ import annotations

import argparse
import signal
import threading

from synth.llm.backends import embedded_model_path, start_llama_server


def serve(model: str, port: int, n_parallel: int, n_ctx_per_slot: int, alias: str) -> None:
    path = model or str(embedded_model_path())
    server = start_llama_server(path, port, n_parallel, n_ctx_per_slot, alias)
    print(f"serving {path} at {server.listening_address}/v1", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    del server


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default="", help="GGUF path (default: the embedded SmolLM2-135M-Instruct)"
    )
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--parallel", type=int, default=8, help="concurrent slots")
    ap.add_argument("--ctx-per-slot", type=int, default=2048)
    ap.add_argument("--alias", default="smollm2")
    a = ap.parse_args(argv)
    serve(a.model, a.port, a.parallel, a.ctx_per_slot, a.alias)


if __name__ == "__main__":
    main()
