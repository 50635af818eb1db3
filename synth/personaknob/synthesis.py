"""PersonaKnob synthesis: scenarios with a dimension mask, then a golden and one reject per
active dimension, each verified dimension by dimension by a logprob judge.

Every generation attempt is kept (the `attempts` table) with its judge scores, so a
response that never verified is still there with the reason; a scenario without a
verified golden, or without any verified reject, becomes a rejected row.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from synth.llm import GenerationParams, LLMClient, LLMRequest, judge
from synth.personaknob.spec import DIMENSIONS, KnobSpec, all_masks, canonical_mask, load_spec
from synth.progress import Progress, generate_logged
from synth.records import (
    PROVENANCE_DTYPE,
    Provenance,
    Rejected,
    content_id,
    frame,
    rejected_frame,
    template_hash,
)
from synth.templates import PromptTemplate, clean_message

SCORES_DTYPE = pl.Struct({d: pl.Float64 for d in DIMENSIONS})

SCENARIO_PROMPT = PromptTemplate(
    id="personaknob_scenario",
    user=(
        "Here is a person: {persona}\n"
        "Right now this person {situation}.\n"
        "Write the message they send to an AI assistant, in the first person, in one to three "
        "sentences, so that a good reply would have to show {qualities}. Write only the message."
    ),
)
RESPOND_ID = "personaknob_respond"
PROBE_ID = "personaknob_probe"
VERIFY_ID = "personaknob_verify"


class KnobSettings(BaseModel):
    """Knobs of the synthesis; where the paper is silent the choice is ours and named here."""

    model_config = ConfigDict(frozen=True)

    scenarios: int = 8
    # Relative weight of each mask ("AT", "E", ...); empty = all 15 masks equally. Counts are
    # allocated exactly (largest remainder), so the realised mix is the configured one.
    mask_mix: dict[str, float] = Field(default_factory=dict)
    heldout_every: int = 4  # every k-th scenario is held out for evaluation (0 = none)
    max_attempts: int = 3  # generations per response before it is given up
    # p(Yes) of the verify question at or above this = the reply satisfies the dimension.
    threshold: float = 0.5
    prompt_max_tokens: int = 96
    response_max_tokens: int = 160
    temperature: float = 0.8
    max_prompt_chars: int = 1200
    seed: int = 0


def mask_weights(mix: dict[str, float]) -> dict[str, float]:
    """Normalised weights per canonical mask; names the bad entry."""
    if not mix:
        return {m: 1 / 15 for m in all_masks()}
    out: dict[str, float] = {}
    for raw, w in mix.items():
        mask = canonical_mask(raw)
        if w < 0:
            raise ValueError(f"mask_mix[{raw!r}]: weight {w} is negative")
        out[mask] = out.get(mask, 0.0) + float(w)
    total = sum(out.values())
    if total <= 0:
        raise ValueError("mask_mix: the weights sum to zero")
    return {m: w / total for m, w in out.items() if w > 0}


def allocate_masks(n: int, mix: dict[str, float], seed: int = 0) -> list[str]:
    """n masks whose counts follow the mix exactly (largest remainder), in seeded order."""
    weights = mask_weights(mix)
    quotas = {m: n * w for m, w in weights.items()}
    counts = {m: int(q) for m, q in quotas.items()}
    by_remainder = sorted(weights, key=lambda m: (-(quotas[m] - counts[m]), all_masks().index(m)))
    for m in by_remainder[: n - sum(counts.values())]:
        counts[m] += 1
    masks = [m for m in all_masks() if m in counts for _ in range(counts[m])]
    random.Random(seed).shuffle(masks)
    return masks


SCENARIO_SCHEMA: dict[str, pl.DataType] = {
    "record_id": pl.Utf8(),
    "parent_ids": pl.List(pl.Utf8),
    "provenance": PROVENANCE_DTYPE,
    "plan_index": pl.Int64(),
    "split": pl.Utf8(),
    "mask": pl.Utf8(),
    "trigger": pl.Utf8(),
    "sycophancy_probe": pl.Boolean(),
    "seed_scene": pl.Utf8(),
    "context": pl.Utf8(),
    "prompt": pl.Utf8(),
    "probe_scores": SCORES_DTYPE,  # judge p(Yes) that the prompt probes each active dimension
}


def make_scenarios(
    client: LLMClient,
    personas: pl.DataFrame,
    settings: KnobSettings = KnobSettings(),
    spec: KnobSpec | None = None,
    log: Callable[[str], None] | None = None,
    judge_client: LLMClient | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """(scenarios, rejected, planned). Persona i % n meets the i-th allocated mask and the
    triggers that together probe all its dimensions; `client` writes the user's message,
    `judge_client` scores whether it probes each active dimension."""
    spec = spec or load_spec()
    if not personas.height:
        raise ValueError("personaknob scenarios: seed_personas is empty")
    rng = random.Random(settings.seed)
    order = list(range(personas.height))
    rng.shuffle(order)
    plan = []
    for i, mask in enumerate(allocate_masks(settings.scenarios, settings.mask_mix, settings.seed)):
        persona = personas.row(order[i % len(order)], named=True)
        # Triggers that together probe every active dimension, so no reject is asked to fail
        # a dimension the user's message gives no occasion for.
        triggers = [spec.triggers[n] for n in spec.cover(mask, rng)]
        held = (
            settings.heldout_every > 0 and i % settings.heldout_every == settings.heldout_every - 1
        )
        plan.append((i, persona, mask, triggers, "heldout" if held else "train"))
    params = GenerationParams(
        temperature=settings.temperature,
        max_tokens=settings.prompt_max_tokens,
        seed=settings.seed,
        repeat_penalty=1.1,
    )
    requests = [
        SCENARIO_PROMPT.request(
            params,
            persona=p["persona"],
            situation=situation(ts),
            qualities=" and ".join(spec.dimensions[d].name for d in m),
        )
        for _, p, m, ts, _ in plan
    ]
    responses = generate_logged(client, requests, "personaknob scenarios", log)
    kept, rejected = [], []
    for (i, persona, mask, triggers, split), resp in zip(plan, responses, strict=True):
        trigger = "+".join(t.name for t in triggers)
        scenario_id = content_id("personaknob_scenario", persona["record_id"], mask, trigger, i)
        message = clean_message(resp.text) if resp.ok else ""
        reason = ""
        if not resp.ok:
            reason, detail = "prompt_failed", f"scenario {i}: the LLM call failed: {resp.error}"
        elif not message:
            reason, detail = "empty_prompt", f"scenario {i}: field prompt is empty"
        elif len(message) > settings.max_prompt_chars:
            reason = "prompt_too_long"
            detail = f"scenario {i}: field prompt has {len(message)} chars (max {settings.max_prompt_chars})"
        if reason:
            rejected.append(
                Rejected(
                    record_id=scenario_id,
                    stage="scenario",
                    reason=reason,
                    detail=detail,
                    parent_ids=[persona["record_id"]],
                    source="personaknob_plan",
                    source_index=i,
                    payload={"mask": mask, "trigger": trigger, "text": resp.text},
                )
            )
            continue
        kept.append(
            {
                "record_id": scenario_id,
                "parent_ids": [persona["record_id"]],
                "provenance": Provenance.of_client(
                    client,
                    template_id=SCENARIO_PROMPT.id,
                    template_hash=SCENARIO_PROMPT.hash,
                    params_json=settings.model_dump_json(),
                    seed=settings.seed,
                    cache_keys=resp.cache_keys,
                ).as_dict(),
                "plan_index": i,
                "split": split,
                "mask": mask,
                "trigger": trigger,
                "sycophancy_probe": any(t.sycophancy_probe for t in triggers),
                "seed_scene": persona["persona"],
                "context": f"{persona['persona']} The user {situation(triggers)}.",
                "prompt": message,
            }
        )
    out = frame(kept, SCENARIO_SCHEMA)
    return score_probes(judge_client or client, out, spec), rejected_frame(rejected), len(plan)


def situation(triggers: list[Any]) -> str:
    return ", and also ".join(t.situation for t in triggers)


def probe_request(prompt: str, dim: Any) -> LLMRequest:
    """Does the user's message give a reply the occasion to show one dimension?"""
    return LLMRequest.chat(
        f"A user wrote to an AI assistant:\n{prompt}\n\nQuestion: does this message give the "
        f"assistant a clear occasion to show {dim.name}, that is: {dim.satisfy}\n"
        "Answer Yes or No.",
        None,
        template_id=PROBE_ID,
    )


def score_probes(client: LLMClient, scenarios: pl.DataFrame, spec: KnobSpec) -> pl.DataFrame:
    """`probe_scores`: per active dimension, the judge's p(Yes) that the prompt probes it
    (null for inactive dimensions and failed calls)."""
    asks = [(i, d) for i, m in enumerate(scenarios["mask"].to_list()) for d in m]
    prompts = scenarios["prompt"].to_list()
    judged = judge(
        client, [probe_request(prompts[i], spec.dimensions[d]) for i, d in asks], ("Yes", "No")
    )
    scores: list[dict[str, float | None]] = [dict.fromkeys(DIMENSIONS) for _ in prompts]
    for (i, d), j in zip(asks, judged, strict=True):
        scores[i][d] = round(j.p("Yes"), 6) if j.ok else None
    return scenarios.with_columns(pl.Series("probe_scores", scores, dtype=SCORES_DTYPE))


# ---- responses and verification -------------------------------------------------------


def roles(mask: str) -> list[str]:
    return ["golden", *(f"reject_{d}" for d in mask)]


def steering(role: str, mask: str, spec: KnobSpec) -> str:
    """The system prompt for one role: satisfy every active dimension but the one it fails."""
    failed = role.removeprefix("reject_") if role != "golden" else ""
    rules = [spec.dimensions[d].fail if d == failed else spec.dimensions[d].satisfy for d in mask]
    return "You are an AI assistant. In your reply:\n- " + "\n- ".join(rules)


def verify_request(
    prompt: str,
    reply: str,
    question: str,
    system: str | None = None,
    template_id: str = VERIFY_ID,
) -> LLMRequest:
    """A Yes/No question about one reply to one user message (verification and rating)."""
    user = (
        f"A user wrote:\n{prompt}\n\nThe assistant replied:\n{reply}\n\n"
        f"Question: {question}\nAnswer Yes or No."
    )
    return LLMRequest.chat(user, system, template_id=template_id)


def judge_verdict(role: str, mask: str, scores: dict[str, float], threshold: float) -> str:
    """'' when the response is what its role asks for, else the reason it is not."""
    if any(scores.get(d) is None for d in mask):
        return "unjudged"
    below = "".join(d for d in mask if scores[d] < threshold)
    if role == "golden":
        return f"golden_fails_{below}" if below else ""
    own = role.removeprefix("reject_")
    if own not in below:
        return f"{role}_satisfies_{own}"
    if others := below.replace(own, ""):
        return f"{role}_also_fails_{others}"
    return ""


ATTEMPT_SCHEMA: dict[str, pl.DataType] = {
    "scenario_id": pl.Utf8(),
    "role": pl.Utf8(),
    "attempt": pl.Int64(),
    "mask": pl.Utf8(),
    "text": pl.Utf8(),
    "finish_reason": pl.Utf8(),
    "scores": SCORES_DTYPE,
    "verified": pl.Boolean(),
    "reason": pl.Utf8(),  # why it did not verify; empty when it did
    "cache_keys": pl.List(pl.Utf8),
}

RECORD_SCHEMA: dict[str, pl.DataType] = {
    "record_id": pl.Utf8(),
    "parent_ids": pl.List(pl.Utf8),
    "provenance": PROVENANCE_DTYPE,
    "mask": pl.Utf8(),
    "seed_scene": pl.Utf8(),
    "context": pl.Utf8(),
    "trigger": pl.Utf8(),
    "sycophancy_probe": pl.Boolean(),
    "prompt": pl.Utf8(),
    "golden": pl.Utf8(),
    **{f"reject_{d}": pl.Utf8() for d in DIMENSIONS},
    "golden_scores": SCORES_DTYPE,
    **{f"reject_{d}_scores": SCORES_DTYPE for d in DIMENSIONS},
    "unverified_rejects": pl.Utf8(),  # active dimensions whose reject never verified
    "attempts": pl.Int64(),
}


@dataclass(slots=True)
class KnobSynthesis:
    records: pl.DataFrame
    rejected: pl.DataFrame
    attempts: pl.DataFrame
    n_in: int


def _scores(mask: str, judged: list[Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = dict.fromkeys(DIMENSIONS)
    for d, j in zip(mask, judged, strict=True):
        out[d] = round(j.p("Yes"), 6) if j.ok else None
    return out


def synthesize_responses(
    client: LLMClient,
    scenarios: pl.DataFrame,
    settings: KnobSettings = KnobSettings(),
    spec: KnobSpec | None = None,
    log: Callable[[str], None] | None = None,
    judge_client: LLMClient | None = None,
) -> KnobSynthesis:
    """Golden and rejects for every training scenario; all scenarios advance in lockstep
    so each attempt round is one batch of generations and one batch of judgements.
    `client` writes (the generator role), `judge_client` verifies (the judge role)."""
    judge_client = judge_client or client
    spec = spec or load_spec()
    rows = scenarios.filter(pl.col("split") == "train").to_dicts()
    pending = {(i, role) for i, r in enumerate(rows) for role in roles(r["mask"])}
    verified: dict[tuple[int, str], dict[str, Any]] = {}
    last_reason: dict[tuple[int, str], str] = {}
    attempts: list[dict[str, Any]] = []
    for attempt in range(settings.max_attempts):
        if not pending:
            break
        todo = sorted(pending)
        params = GenerationParams(
            temperature=settings.temperature,
            max_tokens=settings.response_max_tokens,
            seed=settings.seed + attempt,
            repeat_penalty=1.1,
        )
        gens = client.generate(
            [
                LLMRequest.chat(
                    rows[i]["prompt"],
                    steering(role, rows[i]["mask"], spec),
                    params,
                    None,
                    RESPOND_ID,
                )
                for i, role in todo
            ]
        )
        to_judge = [
            (k, d)
            for k, ((i, _), g) in enumerate(zip(todo, gens, strict=True))
            if g.ok and g.text.strip()
            for d in rows[i]["mask"]
        ]
        progress = Progress(len(to_judge), f"personaknob verify (attempt {attempt + 1})", log)
        judged = judge(
            judge_client,
            [
                verify_request(rows[todo[k][0]]["prompt"], gens[k].text, spec.dimensions[d].verify)
                for k, d in to_judge
            ],
            on_done=lambda _, p=progress: p.update(),
        )
        progress.close()
        by_gen: dict[int, list[Any]] = {}
        for (k, _), j in zip(to_judge, judged, strict=True):
            by_gen.setdefault(k, []).append(j)
        for k, ((i, role), g) in enumerate(zip(todo, gens, strict=True)):
            mask = rows[i]["mask"]
            if not g.ok:
                scores, reason = dict.fromkeys(DIMENSIONS), "call_failed"
            elif not g.text.strip():
                scores, reason = dict.fromkeys(DIMENSIONS), "empty_reply"
            else:
                scores = _scores(mask, by_gen[k])
                reason = judge_verdict(role, mask, scores, settings.threshold)
            row = {
                "scenario_id": rows[i]["record_id"],
                "role": role,
                "attempt": attempt,
                "mask": mask,
                "text": g.text if g.ok else "",
                "finish_reason": g.first.finish_reason if g.ok else "error",
                "scores": scores,
                "verified": not reason,
                "reason": reason,
                "cache_keys": g.cache_keys + [j.cache_key for j in by_gen.get(k, [])],
            }
            attempts.append(row)
            last_reason[(i, role)] = reason
            if not reason:
                verified[(i, role)] = row
                pending.discard((i, role))
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for a in attempts:
        by_scenario.setdefault(a["scenario_id"], []).append(a)
    params_json = settings.model_dump_json()
    thash = template_hash(RESPOND_ID, VERIFY_ID, json.dumps(_spec_text(spec)))
    kept, rejected = [], []
    for i, r in enumerate(rows):
        mask, sid = r["mask"], r["record_id"]
        golden = verified.get((i, "golden"))
        rejects = {d: verified.get((i, f"reject_{d}")) for d in mask}
        where = f"scenario {sid}"
        reason = ""
        if golden is None:
            reason = "golden_unverified"
            detail = f"{where}: field golden never verified in {settings.max_attempts} attempts (last: {last_reason[(i, 'golden')]})"
        elif not any(rejects.values()):
            reason = "no_verified_reject"
            last = ", ".join(f"reject_{d}: {last_reason[(i, f'reject_{d}')]}" for d in mask)
            detail = f"{where}: no reject verified in {settings.max_attempts} attempts ({last})"
        if reason:
            rejected.append(
                Rejected(
                    record_id=content_id("personaknob_rejected", sid, reason),
                    stage="verify",
                    reason=reason,
                    detail=detail,
                    parent_ids=[sid],
                    payload={"mask": mask, "prompt": r["prompt"]},
                )
            )
            continue
        record = {
            k: r[k]
            for k in ("mask", "seed_scene", "context", "trigger", "sycophancy_probe", "prompt")
        }
        for d in DIMENSIONS:
            hit = rejects.get(d)
            record[f"reject_{d}"] = hit["text"] if hit else None
            record[f"reject_{d}_scores"] = hit["scores"] if hit else None
        kept.append(
            {
                "record_id": content_id(
                    "personaknob", sid, golden["text"], *(record[f"reject_{d}"] for d in DIMENSIONS)
                ),
                "parent_ids": [sid],
                "provenance": Provenance.of_client(
                    client,
                    also=(judge_client,),
                    template_id=RESPOND_ID,
                    template_hash=thash,
                    params_json=params_json,
                    seed=settings.seed,
                    cache_keys=[k for a in by_scenario[sid] for k in a["cache_keys"]],
                ).as_dict(),
                **record,
                "golden": golden["text"],
                "golden_scores": golden["scores"],
                "unverified_rejects": "".join(d for d in mask if rejects[d] is None),
                "attempts": len(by_scenario[sid]),
            }
        )
    return KnobSynthesis(
        frame(kept, RECORD_SCHEMA),
        rejected_frame(rejected),
        frame(attempts, ATTEMPT_SCHEMA),
        len(rows),
    )


def _spec_text(spec: KnobSpec) -> dict[str, Any]:
    return {d.key: [d.satisfy, d.fail, d.verify] for d in spec.dimensions.values()}


# ---- re-judging by a separate path -----------------------------------------------------

REJUDGE_ID = "personaknob_rejudge"
REJUDGE_SCHEMA: dict[str, pl.DataType] = {
    "record_id": pl.Utf8(),
    "role": pl.Utf8(),  # golden | reject_<d>
    "dimension": pl.Utf8(),
    "score": pl.Float64(),  # mean p(Yes) over the dimension's rubric criteria; null if unjudged
}


def rejudge(
    client: LLMClient,
    records: pl.DataFrame,
    spec: KnobSpec | None = None,
    log: Callable[[str], None] | None = None,
) -> pl.DataFrame:
    """Every kept golden and reject scored again on every active dimension, by a path the
    verification did not take: the rubric criteria (not the verify question), averaged,
    asked of `client` (the evaluator role). One row per (record, role, dimension)."""
    spec = spec or load_spec()
    keys, requests = [], []
    for r in records.to_dicts():
        for role in roles(r["mask"]):
            if r[role] is None:
                continue
            for d in r["mask"]:
                for criterion in spec.dimensions[d].criteria:
                    keys.append((r["record_id"], role, d))
                    requests.append(
                        verify_request(r["prompt"], r[role], criterion, None, REJUDGE_ID)
                    )
    progress = Progress(len(requests), "personaknob re-judging", log)
    scores = judge(client, requests, on_done=lambda _: progress.update())
    progress.close()
    by_key: dict[tuple[str, str, str], list[float]] = {}
    for key, sc in zip(keys, scores, strict=True):
        by_key.setdefault(key, [])
        if sc.ok:
            by_key[key].append(sc.p("Yes"))
    rows = [
        {
            "record_id": k[0],
            "role": k[1],
            "dimension": k[2],
            "score": sum(v) / len(v) if v else None,
        }
        for k, v in by_key.items()
    ]
    return frame(rows, REJUDGE_SCHEMA)
