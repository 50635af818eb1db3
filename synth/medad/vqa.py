"""MedAD VQA: multiple-choice items whose answers are computed from a case's label mask and
metadata, and a think-then-answer chain of thought whose checkable claims (modality,
anatomy, presence, count, finding, location, size) come from the same facts.

`parse_claims` reads those claims back out of any text, so the same function verifies
the generated reasoning, an LLM paraphrase of it, and a trained model's generations.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from synth.medad.bases import decode_png, load_allowlist
from synth.medad.cases import ALL_FINDINGS, CELLS, FINDING_OPTIONS, SIZE_CLASSES, lesion_facts
from synth.records import LINEAGE_SCHEMA, Provenance, Rejected, content_id, frame, rejected_frame


def _allowlist_terms(field: str) -> list[str]:
    return sorted({e[field] for e in load_allowlist()})


# The vocabularies: every term of the shipped allow-list, then distractors. A term is
# read whole ("CE-MRI" is not "MRI", "PET/CT" is one claim), see `_term_re`.
MODALITIES = tuple(
    dict.fromkeys(
        [
            *_allowlist_terms("modality"),
            "PET",
            "PET/CT",
            "CE-MRI",
            "dermoscopy",
            "endoscopy",
            "mammography",
        ]
    )
)
ANATOMIES = tuple(
    dict.fromkeys(
        [
            *_allowlist_terms("anatomy"),
            "abdomen",
            "chest",
            "knee",
            "breast",
            "skin",
            "liver",
            "pelvis",
        ]
    )
)
COUNT_WORDS = ("no", "one", "two", "three", "four", "five")
LETTERS = "ABCD"
QUESTION_TYPES = (
    "modality",
    "anatomy",
    "presence",
    "location",
    "count",
    "size",
    "characterisation",
)
CLAIM_FIELDS = ("modality", "anatomy", "abnormal", "count", "finding", "location", "size")
SIZE_NOTE = "small: under 7% of the image width; medium: 7-12%; large: over 12%"

QUESTIONS = {
    "modality": ("Which imaging modality produced this image?", "What kind of image is this?"),
    "anatomy": ("Which anatomical region is shown?", "What part of the body is imaged here?"),
    "presence": ("Is there an abnormality in this image?", "Does this image show a focal lesion?"),
    "location": (
        "In which region of a 3x3 grid over the image is the largest lesion?",
        "Where is the largest lesion, on a 3x3 grid over the image?",
    ),
    "count": ("How many lesions are visible?", "How many focal lesions does the image show?"),
    "size": (
        f"How large is the largest lesion ({SIZE_NOTE})?",
        f"What is the size class of the largest lesion ({SIZE_NOTE})?",
    ),
    "characterisation": (
        "Which finding best describes the lesion?",
        "How would you characterise the abnormality?",
    ),
}


def case_facts(case: dict[str, Any]) -> dict[str, Any]:
    """The facts of a case, recomputed from its mask (lesions) and metadata."""
    mask = decode_png(case["mask_png"])
    lesions = lesion_facts(mask, mask.shape[0])
    largest = max(lesions, key=lambda f: f["area"]) if lesions else None
    # The real slice, as acquired: no drawn mask, so presence is what the source states
    # (a real anomaly's finding, or none for an evaluation subject's normal image).
    real = case["split"] == "real_anomaly"
    return {
        "modality": case["modality"],
        "anatomy": case["anatomy"],
        "abnormal": bool(case["finding"]) if real else bool(lesions),
        "count": None if real else len(lesions),
        "finding": case["finding"] if lesions else None,
        "real_finding": (case["finding"] or None) if real else None,
        "location": largest["cell"] if largest else None,
        "size": largest["size_class"] if largest else None,
        "diameter": largest["equiv_diameter"] if largest else None,
        "largest_tied": sum(f["area"] == largest["area"] for f in lesions) > 1
        if largest
        else False,
        # Every lesion's cell and size class: a reasoning may describe each lesion.
        "cells": sorted({f["cell"] for f in lesions}),
        "sizes": sorted({f["size_class"] for f in lesions}),
        "side": int(mask.shape[0]),
    }


def question_types_for(facts: dict[str, Any]) -> list[str]:
    if facts["count"] is None:  # a real anomaly: no mask, only what the source states
        return ["modality", "anatomy", "presence"]
    if not facts["abnormal"]:
        return ["modality", "anatomy", "presence"]
    if facts["largest_tied"]:  # "the largest lesion" names none: ask neither where nor how large
        return [q for q in QUESTION_TYPES if q not in ("location", "size")]
    return list(QUESTION_TYPES)


def answer_text(qtype: str, facts: dict[str, Any]) -> str:
    if qtype == "presence":
        return "yes" if facts["abnormal"] else "no"
    if qtype == "count":
        return COUNT_WORDS[facts["count"]]
    if qtype == "characterisation":
        return facts["finding"]
    return facts[qtype]


def option_pool(qtype: str, facts: dict[str, Any]) -> tuple[str, ...]:
    if qtype == "characterisation":
        return FINDING_OPTIONS.get(facts["modality"], tuple(ALL_FINDINGS))
    return {
        "modality": MODALITIES,
        "anatomy": ANATOMIES,
        "presence": ("yes", "no"),
        "location": CELLS,
        "count": COUNT_WORDS[1:5],
        "size": SIZE_CLASSES,
    }[qtype]


# Regions of which one contains the other: never the right answer and a distractor together.
CONTAINS = {frozenset(p) for p in (("abdomen", "liver"), ("abdomen", "colon"))}


def overlapping(a: str, b: str) -> bool:
    """Terms a reader could both call right: one names the other ("CE-MRI" and "MRI",
    "PET/CT" and "CT") or contains it (abdomen and liver)."""
    words = lambda s: set(re.split(r"[-/ ]", s.lower()))  # noqa: E731
    return a != b and (bool(words(a) & words(b)) or frozenset((a, b)) in CONTAINS)


def make_options(qtype: str, facts: dict[str, Any], rng: np.random.Generator) -> list[str]:
    """The right answer and up to three distractors that are plainly wrong for it, in a
    seeded shuffled order."""
    right = answer_text(qtype, facts)
    others = [
        o
        for o in option_pool(qtype, facts)
        if o != right and not (qtype in TERM_FIELDS and overlapping(o, right))
    ]
    k = min(len(LETTERS) - 1, len(others))
    chosen = [right, *[others[i] for i in rng.permutation(len(others))[:k]]]
    return [chosen[i] for i in rng.permutation(len(chosen))]


# --- reasoning --------------------------------------------------------------------------


def _plural(finding: str, n: int) -> str:
    if n == 1:
        return finding
    head, _, tail = finding.partition(" with ")
    head = head + ("es" if head.endswith(("s", "x")) else "s")
    return f"{head} with {tail}" if tail else head


def reasoning(facts: dict[str, Any], rng: np.random.Generator) -> str:
    """The think text: one sentence per fact, in a seeded choice of wordings."""
    m, a = facts["modality"], facts["anatomy"]
    art = "an" if m in ("MRI", "ultrasound", "X-ray radiograph", "endoscopy") else "a"
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    parts = [
        pick(
            (
                f"This is {art} {m} image of the {a}.",
                f"The image is {art} {m} study showing the {a}.",
                f"I am looking at {m} of the {a}.",
            )
        )
    ]
    if facts["count"] is None and facts["abnormal"]:
        parts.append(f"An abnormality is present: {facts['real_finding'].split(' (')[0]}.")
    elif not facts["abnormal"]:
        parts.append(
            pick(
                (
                    "I see no focal lesion; the tissue looks normal.",
                    "There is no focal lesion anywhere in the tissue.",
                    "No focal lesion is visible and the appearance is normal.",
                )
            )
        )
    else:
        n, word = facts["count"], COUNT_WORDS[facts["count"]]
        lesion_word = "lesion" if n == 1 else "lesions"
        what = f"a {facts['finding']}" if n == 1 else _plural(facts["finding"], n)
        each = "" if n == 1 else "each "
        parts.append(
            pick(
                (
                    f"I count {word} focal {lesion_word}, {each}a {facts['finding']}.",
                    f"There {'is' if n == 1 else 'are'} {word} {lesion_word}: {what}.",
                    f"{word.capitalize()} {lesion_word} {'is' if n == 1 else 'are'} visible, appearing as {what}.",
                )
            )
        )
        which = "It" if n == 1 else "The largest"
        pct = round(100 * facts["diameter"] / facts["side"])
        parts.append(
            pick(
                (
                    f"{which} lies in the {facts['location']} of the image.",
                    f"{which} sits in the {facts['location']} region.",
                )
            )
        )
        parts.append(
            pick(
                (
                    f"{which} spans about {pct}% of the image width, so it is {facts['size']}.",
                    f"At roughly {pct}% of the width, {which.lower()} is {facts['size']} in size.",
                )
            )
        )
    return " ".join(parts)


def completion(think: str, letter: str) -> str:
    return f"<think>{think}</think><answer>{letter}</answer>"


ANSWER_RE = re.compile(r"^\s*<think>(.+?)</think>\s*<answer>\s*([A-D])\s*</answer>\s*$", re.S)


def parse_completion(text: str) -> tuple[str, str] | None:
    """(think, letter) of a well-formed completion, else None."""
    m = ANSWER_RE.match(text)
    return (m.group(1), m.group(2)) if m else None


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def _term_re(words) -> re.Pattern:
    """Whole terms: a hyphen or slash joins words into one term, so neither may touch."""
    return re.compile(rf"(?<![\w/-])({_alternation(words)})(?![\w/-])", re.I)


_MODALITY_RE = _term_re(MODALITIES)
_ANATOMY_RE = _term_re(ANATOMIES)
_COUNT_RE = re.compile(rf"\b({_alternation(COUNT_WORDS[1:])})\s+(?:focal\s+)?lesions?\b", re.I)
_NO_LESION_RE = re.compile(
    r"\bno (?:focal )?lesions?\b|\bno abnormalit(?:y|ies)\b|\blooks normal\b", re.I
)
_PRESENT_RE = re.compile(r"\babnormality is present\b", re.I)
_FINDING_RE = re.compile(
    rf"\b({_alternation([*ALL_FINDINGS, *[_plural(f, 2) for f in ALL_FINDINGS]])})\b", re.I
)
_CELL_RE = re.compile(rf"\b({_alternation(CELLS)})\b", re.I)
_SIZE_RE = re.compile(rf"\b(?:is|so it is|is thus)\s+({_alternation(SIZE_CLASSES)})\b", re.I)
_SINGULAR = {_plural(f, 2).lower(): f for f in ALL_FINDINGS}


def parse_claims(text: str) -> dict[str, list]:
    """Every value the text claims for each field (a field claimed twice with different
    values is a contradiction)."""

    def found(rx):
        return sorted({m.group(1).lower() for m in rx.finditer(text)})

    counts = found(_COUNT_RE)
    abnormal = set()
    if _NO_LESION_RE.search(text):
        abnormal.add(False)
    if counts or _PRESENT_RE.search(text):
        abnormal.add(True)
    canon = {m.lower(): m for m in (*MODALITIES, *ANATOMIES, *ALL_FINDINGS, *CELLS)}
    return {
        "modality": [canon[v] for v in found(_MODALITY_RE)],
        "anatomy": [canon[v] for v in found(_ANATOMY_RE)],
        "abnormal": sorted(abnormal),
        "count": [COUNT_WORDS.index(v) for v in counts],
        "finding": sorted({_SINGULAR.get(v, canon.get(v, v)) for v in found(_FINDING_RE)}),
        "location": [canon[v] for v in found(_CELL_RE)],
        "size": found(_SIZE_RE),
    }


PER_LESION = {"location": "cells", "size": "sizes"}


def claim_problems(claims: dict[str, list], facts: dict[str, Any]) -> list[str]:
    """Contradictions inside the claims and with the image facts ([] = consistent).

    A case-level field (modality, anatomy, presence, count, finding) claimed with two
    values contradicts itself. Location and size belong to each lesion: a reasoning may
    name one per lesion, each of which must be a lesion's, and no more than there are."""
    problems = [
        f"{k}: claims {v}"
        for k, v in claims.items()
        if len(v) > 1 and k not in PER_LESION and not _one_term(v)
    ]
    if False in claims["abnormal"] and any(
        claims[k] for k in ("count", "finding", "location", "size")
    ):
        problems.append("says normal but describes a lesion")
    if facts.get("count") == 0 and any(claims[k] for k in ("count", "finding", "location", "size")):
        problems.append("describes a lesion the image does not have")
    for k, v in claims.items():
        if k in PER_LESION and facts.get(PER_LESION[k]):
            known = facts[PER_LESION[k]]
            wrong = [x for x in v if x not in known]
            if wrong:
                problems.append(f"{k}: claims {wrong[0]!r}, the lesions have {known}")
            elif len(v) > max(facts.get("count") or 1, 1):
                problems.append(f"{k}: claims {len(v)} values for {facts['count']} lesions")
            continue
        if k in TERM_FIELDS and facts.get(k) is not None:
            wrong = [x for x in v if x != facts[k] and not overlapping(x, facts[k])]
            if wrong:
                problems.append(f"{k}: claims {wrong[0]!r}, the image has {facts[k]!r}")
            continue
        if len(v) != 1:
            continue
        fact = facts["abnormal"] if k == "abnormal" else facts.get(k)
        if fact is not None and v[0] != fact:
            problems.append(f"{k}: claims {v[0]!r}, the image has {fact!r}")
    return problems


TERM_FIELDS = ("modality", "anatomy")


def _one_term(values: list) -> bool:
    """Several words for one thing ("abdomen" and "liver", "MRI" and "CE-MRI")."""
    return all(isinstance(v, str) for v in values) and all(
        overlapping(a, b) for i, a in enumerate(values) for b in values[i + 1 :]
    )


def supports(claims: dict[str, list], qtype: str, chosen: str) -> bool | None:
    """Does the reasoning back the chosen option? None when it says nothing on it."""
    field = {"presence": "abnormal", "characterisation": "finding"}.get(qtype, qtype)
    values = claims[field]
    if qtype in PER_LESION and len(values) > 1:
        return chosen in values  # several lesions described, the chosen one among them
    if qtype in TERM_FIELDS and len(values) > 1 and _one_term(values):
        return chosen in values
    if len(values) != 1:
        return None
    v = values[0]
    if qtype == "presence":
        return ("yes" if v else "no") == chosen
    if qtype == "count":
        return COUNT_WORDS[v] == chosen
    return v == chosen


# --- items ------------------------------------------------------------------------------

VQA_SCHEMA: dict[str, pl.DataType] = {
    **LINEAGE_SCHEMA,
    "case_id": pl.Utf8(),
    "question_type": pl.Utf8(),
    "question": pl.Utf8(),
    "options": pl.List(pl.Utf8),
    "answer": pl.Utf8(),
    "answer_text": pl.Utf8(),
    "completion": pl.Utf8(),
    "facts_json": pl.Utf8(),
    "paraphrase": pl.Utf8(),  # none | accepted | rejected_claims_changed | failed
    "split": pl.Utf8(),
    "center": pl.Utf8(),
    "modality": pl.Utf8(),
    "base_id": pl.Utf8(),
}

PARAPHRASE_PROMPT = (
    "Rewrite this radiology reasoning in different words. Keep every fact exactly: the "
    "modality, the body part, the number of lesions, what they look like, where the largest "
    "is and its size class. Reply with the rewritten text only.\n\n{think}"
)


def prompt_text(question: str, options: list[str]) -> str:
    lines = [question, *[f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]]
    return (
        "\n".join(lines)
        + "\nThink inside <think></think>, then give the letter inside <answer></answer>."
    )


def build_items(
    cases: pl.DataFrame,
    seed: int,
    client: Any = None,
    paraphrase_rate: float = 0.0,
    log: Callable[[str], None] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """Items for every case and applicable question type; a share of the reasonings
    paraphrased by the LLM and kept only when their claims survive unchanged.
    Counts in are cases: a case whose facts cannot be recomputed is rejected."""
    from synth.llm import GenerationParams, LLMRequest
    from synth.progress import generate_logged

    rows, rejected = [], []
    for ci, case in enumerate(cases.to_dicts()):
        try:
            facts = case_facts(case)
        except Exception as exc:  # an unreadable mask: the case cannot be asked about
            rejected.append(
                Rejected(
                    case["record_id"],
                    "vqa",
                    "mask_unreadable",
                    f"case {case['record_id']}: mask_png: {exc}",
                    [case["record_id"]],
                    "medad_cases",
                    ci,
                )
            )
            continue
        if facts["count"] is not None and facts["count"] != case["lesion_count"]:
            rejected.append(
                Rejected(
                    case["record_id"],
                    "vqa",
                    "mask_disagrees",
                    f"case {case['record_id']}: lesion_count {case['lesion_count']} but the mask has {facts['count']}",
                    [case["record_id"]],
                    "medad_cases",
                    ci,
                )
            )
            continue
        for qtype in question_types_for(facts):
            item_id = content_id("medad_vqa", case["record_id"], qtype, seed)
            rng = np.random.default_rng([seed, int(item_id[:12], 16)])
            options = make_options(qtype, facts, rng)
            right = answer_text(qtype, facts)
            letter = LETTERS[options.index(right)]
            question = QUESTIONS[qtype][rng.integers(len(QUESTIONS[qtype]))]
            think = reasoning(facts, rng)
            rows.append(
                {
                    "record_id": item_id,
                    "parent_ids": [case["record_id"]],
                    "provenance": Provenance(
                        "procedural", template_id="medad_vqa", seed=seed
                    ).as_dict(),
                    "case_id": case["record_id"],
                    "question_type": qtype,
                    "question": question,
                    "options": options,
                    "answer": letter,
                    "answer_text": right,
                    "completion": completion(think, letter),
                    "facts_json": json.dumps(facts, sort_keys=True),
                    "paraphrase": "none",
                    "split": case["split"],
                    "center": case["center"],
                    "modality": case["modality"],
                    "base_id": case["base_id"],
                    "_think": think,
                    "_facts": facts,
                    "_para": rng.random() < paraphrase_rate,
                }
            )
    if client is not None and paraphrase_rate > 0:
        todo = [r for r in rows if r["_para"]]
        reqs = [
            LLMRequest.chat(
                PARAPHRASE_PROMPT.format(think=r["_think"]),
                params=GenerationParams(temperature=0.7, max_tokens=160, seed=seed),
                template_id="medad_paraphrase",
            )
            for r in todo
        ]
        for r, resp in zip(
            todo, generate_logged(client, reqs, "medad paraphrase", log), strict=True
        ):
            r["provenance"] = Provenance.of_client(
                client, "medad_paraphrase", seed=seed, cache_keys=resp.cache_keys
            ).as_dict()
            text = (resp.text or "").strip() if not resp.error else ""
            if not text:
                r["paraphrase"] = "failed"
            elif parse_claims(text) == parse_claims(r["_think"]) and "<" not in text:
                r["paraphrase"] = "accepted"
                r["completion"] = completion(text, r["answer"])
            else:
                r["paraphrase"] = "rejected_claims_changed"
    for r in rows:
        for k in ("_think", "_facts", "_para"):
            r.pop(k)
    return frame(rows, VQA_SCHEMA), rejected_frame(rejected), cases.height
