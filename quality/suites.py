"""Expectation suites per dataset: integrity (ERROR; gates training) and drift (WARN)."""

from __future__ import annotations

from quality.expectations import ExpectationDecl, Suite
from synth.loaders import INSTRUCTION_SCHEMA, PERSONA_SCHEMA, PREFERENCE_SCHEMA
from synth.personaatlas.trajectories import TRAJECTORY_SCHEMA
from synth.personaknob.spec import all_masks
from synth.personaknob.synthesis import RECORD_SCHEMA as PERSONAKNOB_SCHEMA
from synth.responses import RESPONSE_SCHEMA
from synth.trace.triage import LABELS, TRIAGE_SCHEMA
from synth.ultraprompt.dataset import ULTRAPROMPT_SCHEMA
from synth.ultraprompt.principles import CATEGORIES

MAX_TEXT_CHARS = 20_000  # longer than any prompt or response a family writes
CURATION_COLUMNS = ("cluster_id", "cluster_size")


def columns(schema: dict, extra: tuple[str, ...] = ()) -> ExpectationDecl:
    return (
        "ExpectTableColumnsToMatchSet",
        {"column_set": [*schema, *extra], "exact_match": True},
    )


def identity() -> list[ExpectationDecl]:
    return [
        ("ExpectColumnValuesToNotBeNull", {"column": "record_id"}),
        ("ExpectColumnValuesToBeUnique", {"column": "record_id"}),
        ("ExpectColumnValuesToNotBeNull", {"column": "provenance"}),
    ]


def text(column: str, min_chars: int = 1) -> list[ExpectationDecl]:
    return [
        ("ExpectColumnValuesToNotBeNull", {"column": column}),
        (
            "ExpectColumnValueLengthsToBeBetween",
            {"column": column, "min_value": min_chars, "max_value": MAX_TEXT_CHARS},
        ),
    ]


def probability(column: str) -> ExpectationDecl:
    return ("ExpectColumnValuesToBeBetween", {"column": column, "min_value": 0.0, "max_value": 1.0})


def derived() -> list[ExpectationDecl]:
    """Rows made from another record carry exactly one parent."""
    return [
        ("ExpectColumnValuesToBeBetween", {"column": "parent_ids", "min_value": 1, "max_value": 1})
    ]


def _seed(name: str, schema: dict, texts: list[str]) -> list[Suite]:
    integrity = [columns(schema), *identity()]
    for t in texts:
        integrity += text(t)
    integrity.append(("ExpectColumnValuesToNotBeNull", {"column": "source_index"}))
    return [Suite(f"{name}.integrity", "error", tuple(integrity))]


def _responses(name: str, extra: tuple[str, ...] = ()) -> list[Suite]:
    integrity = [
        columns(RESPONSE_SCHEMA, extra),
        *identity(),
        *derived(),
        *text("instruction"),
        *text("response"),
        probability("judge_p_follows"),
        (
            "ExpectColumnValuesToBeInSet",
            {"column": "finish_reason", "value_set": ["stop", "length"]},
        ),
    ]
    drift = [
        (
            "ExpectColumnMeanToBeBetween",
            {"column": "judge_p_follows", "min_value": 0.3, "max_value": 1.0},
        ),
        (
            "ExpectColumnValuesToBeInSet",
            {"column": "finish_reason", "value_set": ["stop"], "mostly": 0.5},
        ),
        (
            "ExpectColumnProportionOfUniqueValuesToBeBetween",
            {"column": "instruction", "min_value": 0.9},
        ),
    ]
    return [
        Suite(f"{name}.integrity", "error", tuple(integrity)),
        Suite(f"{name}.drift", "warn", tuple(drift)),
    ]


def _trace(name: str, extra: tuple[str, ...] = ()) -> list[Suite]:
    integrity = [
        columns(TRIAGE_SCHEMA, extra),
        *identity(),
        *derived(),
        *text("prompt"),
        *text("chosen"),
        *text("rejected"),
        probability("p_chosen_violates"),
        probability("p_rejected_violates"),
        ("ExpectColumnValuesToBeInSet", {"column": "label", "value_set": list(LABELS)}),
        # One triage run judges under one policy version.
        (
            "ExpectColumnUniqueValueCountToBeBetween",
            {"column": "policy_version", "min_value": 1, "max_value": 1},
        ),
    ]
    drift = [
        # A policy that flags nearly everything, or nothing, is more likely a judge problem.
        (
            "ExpectColumnMeanToBeBetween",
            {"column": "p_chosen_violates", "min_value": 0.02, "max_value": 0.9},
        ),
        (
            "ExpectColumnValuesToBeInSet",
            {"column": "label", "value_set": ["RETAIN"], "mostly": 0.2},
        ),
    ]
    return [
        Suite(f"{name}.integrity", "error", tuple(integrity)),
        Suite(f"{name}.drift", "warn", tuple(drift)),
    ]


def _ultraprompt(name: str, extra: tuple[str, ...] = ()) -> list[Suite]:
    integrity = [
        columns(ULTRAPROMPT_SCHEMA, extra),
        *identity(),
        *derived(),
        *text("src_instruction"),
        *text("chosen_instruction"),
        *text("rejected_instruction"),
        # A reward model's scores are not probabilities: only present and finite.
        *(
            ("ExpectColumnValuesToNotBeNull", {"column": c})
            for c in ("chosen_reward", "rejected_reward", "root_reward")
        ),
        ("ExpectColumnValuesToBeInSet", {"column": "category", "value_set": list(CATEGORIES)}),
        ("ExpectColumnValuesToBeBetween", {"column": "tree_nodes", "min_value": 2}),
    ]
    drift = [
        # Most searches should find a rewrite at least as good as the original that differs.
        ("ExpectColumnMeanToBeBetween", {"column": "reward_gain", "min_value": 0.01}),
        (
            "ExpectColumnProportionOfUniqueValuesToBeBetween",
            {"column": "src_instruction", "min_value": 0.9},
        ),
    ]
    return [
        Suite(f"{name}.integrity", "error", tuple(integrity)),
        Suite(f"{name}.drift", "warn", tuple(drift)),
    ]


def _personaknob(name: str, extra: tuple[str, ...] = ()) -> list[Suite]:
    integrity = [
        columns(PERSONAKNOB_SCHEMA, extra),
        *identity(),
        *derived(),
        *text("prompt"),
        *text("golden"),
        *text("context"),
        ("ExpectColumnValuesToBeInSet", {"column": "mask", "value_set": all_masks()}),
        ("ExpectColumnValuesToBeBetween", {"column": "attempts", "min_value": 2}),
    ]
    drift = [
        # Rejects that never verify mean the steering or the judge is off for a dimension.
        (
            "ExpectColumnValueLengthsToBeBetween",
            {"column": "unverified_rejects", "max_value": 0, "mostly": 0.5},
        ),
        ("ExpectColumnProportionOfUniqueValuesToBeBetween", {"column": "prompt", "min_value": 0.9}),
    ]
    return [
        Suite(f"{name}.integrity", "error", tuple(integrity)),
        Suite(f"{name}.drift", "warn", tuple(drift)),
    ]


def _personaatlas(name: str, extra: tuple[str, ...] = ()) -> list[Suite]:
    integrity = [
        columns(TRAJECTORY_SCHEMA, extra),
        *identity(),
        *derived(),
        *text("original_query"),
        *text("initial_query"),
        ("ExpectColumnValuesToNotBeNull", {"column": "persona_id"}),
        ("ExpectColumnValuesToBeInSet", {"column": "split", "value_set": ["train", "heldout"]}),
        ("ExpectColumnValuesToBeBetween", {"column": "num_turns", "min_value": 1}),
        (
            "ExpectColumnPairValuesAToBeGreaterThanB",
            {"column_A": "num_turns", "column_B": "noised_turns", "or_equal": True},
        ),
    ]
    drift = [
        # A user simulator that is never (or always) satisfied is more likely broken than picky.
        (
            "ExpectColumnMeanToBeBetween",
            {"column": "num_turns", "min_value": 2.0, "max_value": 5.0},
        ),
        (
            "ExpectColumnProportionOfUniqueValuesToBeBetween",
            {"column": "initial_query", "min_value": 0.9},
        ),
    ]
    return [
        Suite(f"{name}.integrity", "error", tuple(integrity)),
        Suite(f"{name}.drift", "warn", tuple(drift)),
    ]


def _curated(suites: list[Suite]) -> list[Suite]:
    extra: list[ExpectationDecl] = [
        ("ExpectColumnValuesToBeBetween", {"column": "cluster_size", "min_value": 1}),
        ("ExpectColumnPairValuesToBeEqual", {"column_A": "record_id", "column_B": "cluster_id"}),
    ]
    return [
        Suite(s.name, s.severity, s.expectations + tuple(extra)) if s.severity == "error" else s
        for s in suites
    ]


SUITES: dict[str, list[Suite]] = {
    "seed_instructions": _seed("seed_instructions", INSTRUCTION_SCHEMA, ["instruction"]),
    "seed_preference_pairs": _seed(
        "seed_preference_pairs", PREFERENCE_SCHEMA, ["prompt", "chosen", "rejected"]
    ),
    "seed_personas": _seed("seed_personas", PERSONA_SCHEMA, ["persona"]),
    "judged_responses": _responses("judged_responses"),
    "responses_curated": _curated(_responses("responses_curated", CURATION_COLUMNS)),
    "trace_triage": _trace("trace_triage"),
    "trace_curated": _curated(_trace("trace_curated", CURATION_COLUMNS)),
    "ultraprompt": _ultraprompt("ultraprompt"),
    "ultraprompt_curated": _curated(_ultraprompt("ultraprompt_curated", CURATION_COLUMNS)),
    "personaknob": _personaknob("personaknob"),
    "personaknob_curated": _curated(_personaknob("personaknob_curated", CURATION_COLUMNS)),
    "personaatlas_trajectories": _personaatlas("personaatlas_trajectories"),
    "personaatlas_curated": _curated(_personaatlas("personaatlas_curated", CURATION_COLUMNS)),
}
