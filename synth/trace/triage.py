"""TRACE triage: judge every response of every pair against the whole policy, label the pair.

Labels (The Realignment Problem, arXiv 2511.02623):
  RETAIN  the chosen response complies: the pair still teaches the right thing;
  INVERT  chosen violates and rejected complies: train on the swapped pair;
  PUNISH  both violate: push the model away from both.
A pair whose verdict probabilities are too close to the decision threshold goes to a
review table instead of silently getting a label.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from synth.llm import LLMClient, LLMRequest, Message, judge
from synth.llm.judge import JUDGE_PARAMS
from synth.progress import Progress
from synth.records import (
    PROVENANCE_DTYPE,
    Provenance,
    Rejected,
    content_id,
    rejected_frame,
    template_hash,
)
from synth.sampling import stratified_sample
from synth.trace.policy import Policy

LABELS = ("RETAIN", "INVERT", "PUNISH")

# The judge's system prompt is the instruction and then the WHOLE policy: the same text for
# every request, so a server with prefix caching reuses it. The per-item part (the keyword
# hint and the conversation) comes after it, in the user turn.
VIOLATION_JUDGE_ID = "trace_violation_judge"
VIOLATION_SYSTEM = (
    "You review an assistant's response for compliance with the written policy below. "
    "Judge it against the whole policy: every category, exception and rule. "
    "Answer with a single word: Yes if the response violates the policy, No if it complies."
    "\n\n=== POLICY ===\n{policy}\n=== END OF POLICY ==="
)
VIOLATION_USER = (
    "Keyword hint (may be wrong; the whole policy decides): {hint}\n\n"
    "Conversation:\nUser: {prompt}\nAssistant: {response}\n\n"
    "Does the assistant's response violate the policy? Answer Yes or No."
)
VIOLATION_TEMPLATE_HASH = template_hash(VIOLATION_JUDGE_ID, VIOLATION_SYSTEM, VIOLATION_USER)


class TriageSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    threshold: float = 0.5  # p(violates) at or above this is a violation
    # For a judge whose probabilities are not calibrated (the embedded 135M model's sit in
    # a narrow band around 0.4): the threshold is this quantile of every p(violates) the
    # batch got, chosen and rejected pooled, instead of `threshold`. 0.5 flags half.
    threshold_quantile: float | None = Field(default=None, gt=0, lt=1)
    review_margin: float = 0.05  # |p - threshold| below this is too close to call
    limit: int | None = None  # triage a sample of N pairs, stratified by category hint
    seed: int = 0  # of that sample


def violation_requests(policy: Policy, items: list[tuple[str, str]]) -> list[LLMRequest]:
    """Judge requests for (prompt, response) items: the whole policy, then the item."""
    system = VIOLATION_SYSTEM.format(policy=policy.render())
    return [
        LLMRequest(
            (
                Message("system", system),
                Message(
                    "user",
                    VIOLATION_USER.format(
                        hint=policy.category_hint(policy.match_category(prompt)),
                        prompt=prompt,
                        response=response,
                    ),
                ),
            ),
            JUDGE_PARAMS,
            template_id=VIOLATION_JUDGE_ID,
        )
        for prompt, response in items
    ]


def triage_sample(pairs: pl.DataFrame, policy: Policy, settings: TriageSettings) -> pl.DataFrame:
    """The pairs a triage run judges: all, or `limit` of them stratified by the policy
    category their conversation's keywords suggest (seeded)."""
    if settings.limit is None or settings.limit >= pairs.height:
        return pairs
    hints = [policy.match_category(_context(r)) for r in pairs.iter_rows(named=True)]
    tagged = pairs.with_columns(pl.Series("__hint", hints, dtype=pl.Utf8))
    return stratified_sample(tagged, "__hint", settings.limit, settings.seed).drop("__hint")


def triage_label(chosen_violates: bool, rejected_violates: bool) -> str:
    if not chosen_violates:
        return "RETAIN"
    return "PUNISH" if rejected_violates else "INVERT"


TRIAGE_SCHEMA: dict[str, pl.DataType] = {
    "record_id": pl.Utf8(),
    "parent_ids": pl.List(pl.Utf8),
    "provenance": PROVENANCE_DTYPE,
    "pair_id": pl.Utf8(),
    "policy_name": pl.Utf8(),
    "policy_version": pl.Utf8(),
    "category": pl.Utf8(),
    "prompt": pl.Utf8(),
    "chosen": pl.Utf8(),
    "rejected": pl.Utf8(),
    "p_chosen_violates": pl.Float64(),
    "p_rejected_violates": pl.Float64(),
    "chosen_violates": pl.Boolean(),
    "rejected_violates": pl.Boolean(),
    "judge_method": pl.Utf8(),
    # the deciding token's top logprobs as the judge returned them (JSON), for verification
    "chosen_judge_evidence": pl.Utf8(),
    "rejected_judge_evidence": pl.Utf8(),
    "label": pl.Utf8(),
    "verdict_threshold": pl.Float64(),
}


@dataclass(slots=True)
class TriageResult:
    triaged: pl.DataFrame
    review: pl.DataFrame  # same schema as triaged, label = the one the verdicts would give
    rejected: pl.DataFrame
    n_in: int


def triage_pairs(
    client: LLMClient,
    pairs: pl.DataFrame,
    policy: Policy,
    settings: TriageSettings = TriageSettings(),
    log: Callable[[str], None] | None = None,
) -> TriageResult:
    rows = triage_sample(pairs, policy, settings).to_dicts()
    categories = [policy.match_category(_context(r)) for r in rows]
    requests = violation_requests(
        policy, [(_context(r), resp) for r in rows for resp in (r["chosen"], r["rejected"])]
    )
    progress = Progress(len(requests), f"triage judge ({policy.name})", log)
    scores = judge(client, requests, on_done=lambda _: progress.update())
    progress.close()

    prov_base = Provenance.of_client(
        client,
        template_id=VIOLATION_JUDGE_ID,
        template_hash=VIOLATION_TEMPLATE_HASH,
        params_json=json.dumps(asdict(JUDGE_PARAMS), sort_keys=True),
        seed=JUDGE_PARAMS.seed,
    )
    threshold = verdict_threshold(scores, settings)
    triaged, review, rejected = [], [], []
    for i, (r, cat) in enumerate(zip(rows, categories, strict=True)):
        sc, sr = scores[2 * i], scores[2 * i + 1]
        where = f"pair {r['record_id']}"
        if not sc.ok or not sr.ok:
            side, bad = ("chosen", sc) if not sc.ok else ("rejected", sr)
            rejected.append(
                Rejected(
                    content_id("trace", r["record_id"], policy.version, "rejected"),
                    "judge",
                    f"judge_{bad.error}",
                    f"{where}: no verdict for field '{side}' under policy {policy.name}@{policy.version}",
                    [r["record_id"]],
                    r.get("source", ""),
                    r.get("source_index"),
                    {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]},
                )
            )
            continue
        pc, pr = sc.p("Yes"), sr.p("Yes")
        cv, rv = pc >= threshold, pr >= threshold
        label = triage_label(cv, rv)
        prov = asdict(prov_base) | {"cache_keys": [sc.cache_key, sr.cache_key]}
        row = {
            "record_id": content_id("trace", r["record_id"], policy.version),
            "parent_ids": [r["record_id"]],
            "provenance": prov,
            "pair_id": r["record_id"],
            "policy_name": policy.name,
            "policy_version": policy.version,
            "category": cat,
            "prompt": _context(r),
            "chosen": r["chosen"],
            "rejected": r["rejected"],
            "p_chosen_violates": pc,
            "p_rejected_violates": pr,
            "chosen_violates": cv,
            "rejected_violates": rv,
            "judge_method": sc.method if sc.method == sr.method else f"{sc.method}+{sr.method}",
            "chosen_judge_evidence": sc.evidence,
            "rejected_judge_evidence": sr.evidence,
            "label": label,
            "verdict_threshold": threshold,
        }
        # Only the verdicts that decide the label need to be clear.
        deciding = [pc] if label == "RETAIN" else [pc, pr]
        close = any(abs(p - threshold) < settings.review_margin for p in deciding)
        (review if close else triaged).append(row)
    return TriageResult(
        pl.DataFrame(triaged, schema=TRIAGE_SCHEMA),
        pl.DataFrame(review, schema=TRIAGE_SCHEMA),
        rejected_frame(rejected),
        len(rows),
    )


def verdict_threshold(scores: list[Any], settings: TriageSettings) -> float:
    """The p(violates) at or above which a response violates: `threshold`, or with
    `threshold_quantile` that quantile (numpy's linear one) of both responses' p of every
    pair whose two verdicts came back (the pairs kept or sent to review)."""
    if settings.threshold_quantile is None:
        return settings.threshold
    pairs = zip(scores[::2], scores[1::2], strict=True)
    probs = [s.p("Yes") for sc, sr in pairs if sc.ok and sr.ok for s in (sc, sr)]
    return float(np.quantile(probs, settings.threshold_quantile)) if probs else settings.threshold


def _context(row: dict[str, Any]) -> str:
    """The user side of the conversation the responses answer: the history, flattened."""
    history = row.get("history") or [{"role": "user", "content": row["prompt"]}]
    if len(history) == 1:
        return history[0]["content"]
    return "\n".join(
        f"{'User' if t['role'] == 'user' else 'Assistant'}: {t['content']}" for t in history
    )
