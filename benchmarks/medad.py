"""MedAD generation throughput on this machine: base loading, case synthesis (lesions,
center transform, CNR gate, PNG encoding) and VQA items (facts from the mask, options,
reasoning), at several image sizes and center severities.

    python -m benchmarks.medad [--repeats 3] [--sizes 96 128 192]

Baseline: the default configuration (128 px, severity 1.0) run in the same process;
every other row is a ratio against it. Pure numpy/scipy/scikit-image on the CPU; no LLM
(the optional paraphrase is an LLM call per item and is measured by llm_overhead).
"""

import argparse
import time

from synth.medad.bases import load_allowlist, load_bases
from synth.medad.cases import CaseSettings, build_cases
from synth.medad.vqa import build_items


def run(entries, size: int, severity: float, repeats: int) -> dict:
    bases, _ = load_bases(entries, size)
    s = CaseSettings(image_size=size, shift_severity=severity, heldout_severity=1.5 * severity)
    best_cases = best_items = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        cases, rejected, n = build_cases(bases, s)
        best_cases = min(best_cases, time.perf_counter() - t)
        t = time.perf_counter()
        items, _, _ = build_items(cases, s.seed)
        best_items = min(best_items, time.perf_counter() - t)
    return {
        "planned": n,
        "kept": cases.height,
        "rejected": rejected.height,
        "cases_per_s": n / best_cases,
        "items": items.height,
        "items_per_s": items.height / best_items,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 192])
    a = ap.parse_args(argv)
    entries = load_allowlist()
    t = time.perf_counter()
    bases, _ = load_bases(entries, 128)
    load_s = time.perf_counter() - t
    print(f"bases: {len(bases)} images from {len(entries)} allow-list entries in {load_s:.2f} s")
    run(entries, 96, 1.0, 1)  # warm-up: first-call imports and caches stay out of the baseline
    base = run(entries, 128, 1.0, a.repeats)
    configs = [(s, 1.0) for s in a.sizes if s != 128] + [(128, 0.5), (128, 2.0)]
    rows = [("128 px, severity 1.0 (baseline)", base)]
    rows += [
        (f"{size} px, severity {sev}", run(entries, size, sev, a.repeats)) for size, sev in configs
    ]
    print(
        f"\ncommand: python -m benchmarks.medad --repeats {a.repeats} --sizes {' '.join(map(str, a.sizes))}"
    )
    print(
        "| configuration | planned | kept | rejected | cases/s | ratio | VQA items | items/s | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['planned']} | {r['kept']} | {r['rejected']} | {r['cases_per_s']:.1f} | "
            f"{r['cases_per_s'] / base['cases_per_s']:.2f}x | {r['items']} | {r['items_per_s']:.0f} | "
            f"{r['items_per_s'] / base['items_per_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
