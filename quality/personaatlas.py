"""PersonaAtlas rules, recomputed from the stored tables: persona distinctness and
constraints, turn bounds and empty assistant turns, the realised noise rate and layer mix
against the configuration (a binomial tolerance: sampling noise is not a failure), and
PPOpt histories played from the persona the judges grade against."""

from __future__ import annotations

import json
import math
import re
from itertools import combinations
from typing import Any

import polars as pl

from quality.stats import wilson_interval
from synth.personaatlas.personas import PersonaSchema, hamming


def persona_problems(
    personas: pl.DataFrame, schema: PersonaSchema, min_distance: int, min_constraints: int
) -> list[dict[str, Any]]:
    """Pairs of observed personas closer than `min_distance`, personas exposing too few
    constraints, and observed values that are not the drawn ones."""
    rows = personas.select("record_id", "features", "observed").to_dicts()
    seen = [(r["record_id"], json.loads(r["observed"])) for r in rows]
    out: list[dict[str, Any]] = []
    for (a, fa), (b, fb) in combinations(seen, 2):
        if (d := hamming(fa, fb)) < min_distance:
            out.append({"record_id": a, "problem": f"differs from {b} on {d} dimensions"})
    for r in rows:
        n = sum(d in json.loads(r["observed"]) for d in schema.constraints)
        if n < min_constraints:
            out.append({"record_id": r["record_id"], "problem": f"exposes {n} hard constraints"})
        full, observed = json.loads(r["features"]), json.loads(r["observed"])
        if off := sorted(d for d, v in observed.items() if full.get(d) != v):
            out.append({"record_id": r["record_id"], "problem": f"observed {off} not as drawn"})
        unknown = set(full) - set(schema.dimensions)
        if unknown:
            out.append(
                {"record_id": r["record_id"], "problem": f"unknown dimensions {sorted(unknown)}"}
            )
    return out


def turn_problems(
    trajectories: pl.DataFrame, min_turns: int, max_turns: int
) -> list[dict[str, Any]]:
    """Empty assistant turns, targets outside the bounds, and dialogues that did not stop
    where the protocol says: at the first satisfied verdict, else at the target."""
    out = []
    for r in trajectories.select("record_id", "target_turns", "num_turns", "turns").to_dicts():
        rid = r["record_id"]
        problems = []
        turns, n, target = r["turns"], r["num_turns"], r["target_turns"]
        for t in turns:
            if not (t["assistant"] or "").strip():
                problems.append(f"turn {t['turn']}: empty assistant turn")
        if not min_turns <= target <= max_turns:
            problems.append(f"target {target} turns, outside [{min_turns}, {max_turns}]")
        if len(turns) != n or not 1 <= n <= target:
            problems.append(f"{len(turns)} turns stored, num_turns {n}, target {target}")
        if early := [t["turn"] for t in turns[:-1] if t["satisfied"]]:
            problems.append(f"satisfied at turn {early[0]} but the dialogue went on")
        if turns and n < target and not turns[-1]["satisfied"]:
            problems.append(f"stopped at turn {n} of {target} without a satisfied verdict")
        out += [{"record_id": rid, "problem": p} for p in problems]
    return out


def _tolerance(p: float, n: int, floor: float) -> float:
    """Three binomial standard errors, and never below `floor`."""
    return max(floor, 3 * math.sqrt(p * (1 - p) / n)) if n else math.inf


def noise_report(
    trajectories: pl.DataFrame, rate: float, layer_shares: dict[str, float], floor: float = 0.05
) -> dict[str, Any]:
    """Realised noise rate over user messages and layer mix over noised ones, each with
    the configured value and its tolerance; `passed` when all are within tolerance."""
    turns = [t for ts in trajectories["turns"].to_list() for t in ts]
    n = len(turns)
    noised = [t for t in turns if t["noise_layer"]]
    # A distractor that failed still drew the message for noise: count it in the rate.
    drawn = len(noised) + sum(bool(t["noise_error"]) for t in turns)
    observed = drawn / n if n else 0.0
    report: dict[str, Any] = {
        "user_messages": n,
        "noised": len(noised),
        "distractor_failed": drawn - len(noised),
        "rate": {
            "observed": round(observed, 4),
            "expected": rate,
            "tolerance": round(_tolerance(rate, n, floor), 4),
        },
        "layers": {},
    }
    ok = abs(observed - rate) <= _tolerance(rate, n, floor)
    for layer, share in layer_shares.items():
        got = sum(t["noise_layer"] == layer for t in noised) / len(noised) if noised else 0.0
        tol = _tolerance(share, len(noised), floor)
        report["layers"][layer] = {
            "observed": round(got, 4),
            "expected": round(share, 4),
            "tolerance": round(tol, 4),
        }
        ok = ok and abs(got - share) <= tol
    report["passed"] = ok
    return report


WORD = re.compile(r"[a-z0-9']+")
NUMBER = re.compile(r"\d+(?:[.:,]\d+)?")
# Words a slot shares with any phrasing, so losing one says nothing.
SLOT_STOPWORDS = frozenset(
    ["a", "an", "and", "at", "by", "for", "from", "in", "of", "on", "or", "the", "to", "with"]
)


def _slot_words(slot: str) -> set[str]:
    return {w for w in WORD.findall(slot.lower()) if w not in SLOT_STOPWORDS}


def _effects(turn: dict[str, Any]) -> dict[str, bool]:
    """For each drawn strategy whose effect the text can show, whether it shows: read from
    the clean and noised messages by rules of our own, not by the model that noised them."""
    clean, noised = turn["user_clean"], turn["user_text"]
    clean_words, words = set(WORD.findall(clean.lower())), set(WORD.findall(noised.lower()))
    out: dict[str, bool] = {}
    for strategy in turn["noise_strategies"]:
        if strategy == "missing_slots":
            # A slot the intent step found in the clean message that lost a content word.
            slots = [w for s in turn["noise_slots"] if (w := _slot_words(s))]
            if present := [w for w in slots if w <= clean_words]:
                out[strategy] = any(not w <= words for w in present)
        elif strategy == "vague_values":
            if numbers := set(NUMBER.findall(clean)):
                out[strategy] = not numbers <= set(NUMBER.findall(noised))
        elif strategy == "punctuation":
            out[strategy] = not noised.rstrip().endswith((".", "!", "?"))
    return out


def noise_effects(
    trajectories: pl.DataFrame, min_changed: float = 0.8, min_effect: float = 0.5
) -> dict[str, Any]:
    """Whether the noise did what was drawn: the share of noised messages that differ from
    the clean one, and per strategy with a visible effect (a dropped slot, a dropped number,
    no final punctuation) the share of messages where it shows; `passed` when at least
    `min_changed` changed and every such strategy shows in at least `min_effect`."""
    noised = [t for ts in trajectories["turns"].to_list() for t in ts if t["noise_layer"]]
    changed = sum(t["user_text"].strip() != t["user_clean"].strip() for t in noised)
    per: dict[str, list[bool]] = {}
    for t in noised:
        for strategy, shown in _effects(t).items():
            per.setdefault(strategy, []).append(shown)
    report: dict[str, Any] = {
        "noised": len(noised),
        "changed": changed,
        "changed_share": round(changed / len(noised), 4) if noised else None,
        "strategies": {
            s: {"checked": len(v), "shown": sum(v), "share": round(sum(v) / len(v), 4)}
            for s, v in sorted(per.items())
        },
    }
    report["passed"] = (not noised or changed / len(noised) >= min_changed) and all(
        v["share"] >= min_effect for v in report["strategies"].values()
    )
    return report


def coverage(personas: pl.DataFrame, schema: PersonaSchema) -> dict[str, float]:
    """Per dimension, the share of personas that expose it (partial observability)."""
    observed = [json.loads(o) for o in personas["observed"].to_list()]
    n = len(observed) or 1
    return {d: round(sum(d in o for o in observed) / n, 4) for d in schema.dimensions}


# One line of PersonaSchema.describe: "- what it means (dimension): value [hard constraint]".
PERSONA_LINE = re.compile(r"^- .*\((\w+)\): (.+?)(?: \[hard constraint\])?$", re.M)


def ppopt_history_problems(rows: pl.DataFrame, curated: pl.DataFrame) -> list[dict[str, Any]]:
    """PPOpt rows whose history cannot show the persona the judges grade against: no
    history, a session that is not one of the persona's own curated ones (or is the
    target), or a session the simulator played from other features than those the row's
    `persona` text states (read back from the text, not from the code that wrote it)."""
    sessions = {
        r["record_id"]: r for r in curated.select("record_id", "persona_id", "observed").to_dicts()
    }
    out = []
    for r in rows.select(
        "record_id", "persona_id", "parent_ids", "persona", "history_ids"
    ).to_dicts():
        judged = dict(PERSONA_LINE.findall(r["persona"]))
        problems = [] if r["history_ids"] else ["no history sessions"]
        for h in r["history_ids"]:
            s = sessions.get(h)
            if s is None or s["persona_id"] != r["persona_id"]:
                problems.append(f"history session {h} is not one of the persona's curated sessions")
            elif h == r["parent_ids"][0]:
                problems.append(f"history session {h} is the target")
            elif (played := json.loads(s["observed"])) != judged:
                diff = sorted(
                    d for d in set(played) | set(judged) if played.get(d) != judged.get(d)
                )
                problems.append(
                    f"history session {h} was played from other features ({', '.join(diff[:5])}) than the persona judged"
                )
        out += [{"record_id": r["record_id"], "problem": p} for p in problems]
    return out


def win_rates(table: pl.DataFrame) -> pl.DataFrame:
    """Per (model, history): the win rate over judged outputs (an output without a rewrite
    loses; one the judge failed on is left out and counted) with its 95% Wilson interval."""
    rows = []
    for (model, history), g in sorted(table.group_by("model", "history"), key=lambda kv: kv[0]):
        judged = g.filter(~pl.col("judge_failed"))
        wins = int(judged["win"].sum())
        low, high = wilson_interval(wins, judged.height)
        rows.append(
            {
                "model": model,
                "history": history,
                "n": judged.height,
                "judge_failed": g.height - judged.height,
                "win_rate": round(wins / judged.height, 4) if judged.height else None,
                "ci_low": round(low, 4),
                "ci_high": round(high, 4),
                "format_ok": round(float(g["format_ok"].mean()), 4),
            }
        )
    return pl.DataFrame(rows)
