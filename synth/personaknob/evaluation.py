"""Rating held-out responses for the IRT evaluation, and the sycophancy rate.

Every response is rated by every judge (a system prompt of its own) on every rubric
criterion of every dimension: Yes/No by logprobs, a rating of 1 when p(Yes) reaches the
threshold. The Rasch fit (quality.rasch) turns the ratings into per-dimension abilities
with the judges' severities, the criteria's and the items' difficulties taken out.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

from synth.llm import LLMClient, judge
from synth.personaknob.spec import KnobSpec, load_spec
from synth.personaknob.synthesis import verify_request
from synth.progress import Progress

RATING_SCHEMA = {
    "model": pl.Utf8,
    "dimension": pl.Utf8,
    "criterion": pl.Utf8,
    "judge": pl.Utf8,
    "item": pl.Utf8,
    "p_yes": pl.Float64,
    "rating": pl.Int64,
}
RATE_ID = "personaknob_rate"
SYCOPHANCY_SCHEMA = {"model": pl.Utf8, "item": pl.Utf8, "p_sycophantic": pl.Float64}


def rate(
    client: LLMClient,
    responses: pl.DataFrame,
    scenarios: pl.DataFrame,
    threshold: float,
    spec: KnobSpec | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(ratings, sycophancy). `responses` has model, prompt_id (the scenario), response; `scenarios`
    has record_id, prompt, sycophancy_probe. Unjudgeable ratings are left out (counted by
    the caller from the difference)."""
    spec = spec or load_spec()
    by_id = {s["record_id"]: s for s in scenarios.to_dicts()}
    keys, requests = [], []
    for r in responses.to_dicts():
        s = by_id[r["prompt_id"]]
        for d in spec.dimensions.values():
            for k, criterion in enumerate(d.criteria):
                for name, system in spec.judges.items():
                    keys.append((r["model"], d.key, f"{d.key}{k + 1}", name, r["prompt_id"]))
                    requests.append(
                        verify_request(s["prompt"], r["response"], criterion, system, RATE_ID)
                    )
        if s["sycophancy_probe"]:
            keys.append((r["model"], "", "sycophancy", "", r["prompt_id"]))
            requests.append(
                verify_request(s["prompt"], r["response"], spec.sycophancy, None, RATE_ID)
            )
    progress = Progress(len(requests), "personaknob ratings", log)
    scores = judge(client, requests, on_done=lambda _: progress.update())
    progress.close()
    ratings, syco = [], []
    for (model, dim, crit, judge_name, item), sc in zip(keys, scores, strict=True):
        if not sc.ok:
            continue
        p = sc.p("Yes")
        if crit == "sycophancy":
            syco.append({"model": model, "item": item, "p_sycophantic": p})
        else:
            ratings.append(
                {
                    "model": model,
                    "dimension": dim,
                    "criterion": crit,
                    "judge": judge_name,
                    "item": item,
                    "p_yes": p,
                    "rating": int(p >= threshold),
                }
            )
    return pl.DataFrame(ratings, schema=RATING_SCHEMA), pl.DataFrame(syco, schema=SYCOPHANCY_SCHEMA)
