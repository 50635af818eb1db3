"""PPOpt (personalized prompt optimization) data and judges.

Per persona, a target query and up to 4 of its other sessions as history, with the
assistant turns masked; the policy reads history + query and writes
`<REASONING>inferred profile</REASONING><PROMPT>rewritten prompt</PROMPT>`. A teacher
that sees the true persona writes that output for the training personas. The judges
score an inferred profile against the true persona and a rewritten prompt against the
original (does the answer to it serve this user better).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

import polars as pl

from synth.llm import GenerationParams, LLMClient, LLMRequest, judge, structured_failure
from synth.personaatlas.personas import PersonaSchema
from synth.progress import generate_logged
from synth.records import PROVENANCE_DTYPE, Provenance, Rejected, content_id, frame, rejected_frame
from synth.templates import PromptTemplate

MAX_HISTORY = 4  # other sessions shown as history (paper: up to 4)
MASKED = "[assistant reply hidden]"

POLICY_PROMPT = (
    "Below are a user's earlier conversations with an AI assistant (the assistant's replies "
    "are hidden), then the user's new query. Infer the user's profile from how they write "
    "and what they ask, then rewrite the new query into a prompt that will get this user "
    "the answer they want. Answer exactly as <REASONING>profile</REASONING>"
    "<PROMPT>rewritten prompt</PROMPT>.\n\n{history}\n\nNew query: {query}"
)
# The no-history baseline: the same instruction with nothing to infer a profile from, so
# a win there is what a generic rewrite buys, and the gap to it what the history adds.
NO_HISTORY = "(no earlier conversations)"


def no_history_prompt(query: str) -> str:
    return POLICY_PROMPT.format(history=NO_HISTORY, query=query)


TEACHER = PromptTemplate(
    id="personaatlas_teacher",
    system="You write training targets for a prompt-personalization model.",
    user=(
        "The user's true profile:\n{profile}\n\nTheir earlier conversations (assistant "
        "replies hidden):\n{history}\n\nTheir new query: {query}\n\nAnswer in JSON with "
        '"profile": the traits the history reveals, in one or two sentences, and "prompt": '
        "the query rewritten so that an assistant who knows nothing about the user answers it "
        "the way this user wants."
    ),
)
TEACHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        # Bounded so that a rambling small model still closes the JSON within max_tokens.
        "profile": {"type": "string", "minLength": 1, "maxLength": 200},
        "prompt": {"type": "string", "minLength": 1, "maxLength": 300},
    },
    "required": ["profile", "prompt"],
    "additionalProperties": False,
}
# A closing </PROMPT> may be cut off by the completion budget: the rewrite is still there.
OUTPUT_RE = re.compile(
    r"<REASONING>(?P<profile>.*?)</REASONING>\s*<PROMPT>(?P<prompt>.*?)(?:</PROMPT>|$)", re.S
)


def render_output(profile: str, prompt: str) -> str:
    return f"<REASONING>{profile.strip()}</REASONING><PROMPT>{prompt.strip()}</PROMPT>"


# What the instructions put between the tags: a policy that copies them has written nothing.
PLACEHOLDERS = frozenset(
    {"profile", "inferred profile", "rewritten prompt", "prompt", "the user's prompt"}
)


def parse_output(text: str) -> tuple[str, str] | None:
    """(profile, prompt) from a policy output, or None when it is not in the format or
    a tag holds only the instructions' placeholder."""
    m = OUTPUT_RE.search(text or "")
    if not m:
        return None
    profile, prompt = m["profile"].strip(), m["prompt"].strip()
    if any(not bare or bare in PLACEHOLDERS for bare in map(_bare, (profile, prompt))):
        return None
    return profile, prompt


def _bare(text: str) -> str:
    return " ".join(text.lower().strip(" .:;!?\"'()[]").split())


def target_and_history(
    sessions: list[dict[str, Any]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The paper's choice: the session with the fewest turns is the target (the latest of
    a tie); the history is the latest MAX_HISTORY of the others, in session order."""
    sessions = sorted(sessions, key=lambda r: r["session"])
    k = min(range(len(sessions)), key=lambda i: (sessions[i]["num_turns"], -i))
    others = sessions[:k] + sessions[k + 1 :]
    return sessions[k], others[-MAX_HISTORY:]


def render_history(sessions: list[dict[str, Any]], clean: bool) -> str:
    """Sessions as the policy sees them: user turns only (clean or as sent), replies masked."""
    blocks = []
    for k, s in enumerate(sessions, 1):
        lines = [f"Session {k}:"]
        for t in s["turns"]:
            lines += [
                f"User: {t['user_clean'] if clean else t['user_text']}",
                f"Assistant: {MASKED}",
            ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


PPOPT_SCHEMA: dict[str, pl.DataType] = {
    "record_id": pl.Utf8(),
    "parent_ids": pl.List(pl.Utf8),  # the target conversation
    "provenance": PROVENANCE_DTYPE,
    "persona_id": pl.Utf8(),
    "split": pl.Utf8(),
    "persona": pl.Utf8(),  # the observed persona, described (for judges; never in the prompt)
    "observed": pl.Utf8(),  # JSON: the observed features the simulator played
    "history_ids": pl.List(pl.Utf8),
    "query": pl.Utf8(),  # the target query as the user first wrote it
    "prompt": pl.Utf8(),  # the policy's input, history as sent (with noise)
    "prompt_clean": pl.Utf8(),  # the same with the clean user turns
    "noised_history_turns": pl.Int64(),
    "completion": pl.Utf8(),  # the teacher's tagged output; "" for held-out personas
}


def teacher_problem(reply: Any) -> tuple[str, str]:
    """('', '') for a usable teacher output, else (reason, what is wrong)."""
    if not reply.ok:
        return structured_failure(reply)
    if parse_output(render_output(reply.parsed["profile"], reply.parsed["prompt"])) is None:
        return "out_of_format", f"a tag holds only a placeholder: {reply.text[:120]!r}"
    return "", ""


def build_ppopt(
    client: LLMClient,
    trajectories: pl.DataFrame,
    schema: PersonaSchema,
    seed: int = 0,
    max_tokens: int = 320,
    log: Callable[[str], None] | None = None,
    attempts: int = 3,
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """(rows, rejected, n_in) with one row per persona: its session with the fewest turns
    is the target, up to MAX_HISTORY others the history. Personas with one session are
    rejected."""
    views = []
    rejected: list[Rejected] = []
    by_persona = trajectories.sort("session").partition_by(
        "persona_id", as_dict=True, maintain_order=True
    )
    for (pid,), convs in by_persona.items():
        rows = convs.to_dicts()
        if len(rows) < 2:
            rejected.append(
                Rejected(
                    record_id=content_id("personaatlas_ppopt_rejected", pid, "no_history"),
                    stage="ppopt",
                    reason="no_history",
                    detail=f"persona {pid}: field history is empty (1 curated session; PPOpt needs 2)",
                    parent_ids=[pid],
                )
            )
            continue
        target, history = target_and_history(rows)
        views.append((pid, target, history))
    train = [v for v in views if v[1]["split"] == "train"]
    answers: dict[str, Any] = {}
    keys_of: dict[str, list[str]] = {}
    todo = train
    # A teacher output that failed, or that only repeats the format's placeholders, is
    # asked again with the next seed, up to `attempts` times; the last one is kept.
    for attempt in range(attempts):
        params = GenerationParams(temperature=0.3, max_tokens=max_tokens, seed=seed + attempt)
        requests = [
            TEACHER.request(
                params,
                TEACHER_SCHEMA,
                profile=schema.describe(json.loads(t["observed"])),
                history=render_history(h, clean=True),
                query=t["initial_query"],
            )
            for _, t, h in todo
        ]
        replies = generate_logged(client, requests, "personaatlas PPOpt teacher", log)
        for (pid, _, _), r in zip(todo, replies, strict=True):
            answers[pid] = r
            keys_of[pid] = keys_of.get(pid, []) + r.cache_keys
        todo = [v for v in todo if teacher_problem(answers[v[0]])[0]]
        if not todo:
            break
    kept = []
    for pid, target, history in views:
        completion, keys = "", []
        if pid in answers:
            r = answers[pid]
            keys = keys_of[pid]
            obj = r.parsed
            why, what = teacher_problem(r)
            if why:
                rejected.append(
                    Rejected(
                        record_id=content_id("personaatlas_ppopt_rejected", pid, why),
                        stage="ppopt",
                        reason=f"teacher_{why}",
                        detail=f"persona {pid}: field completion: {what}",
                        parent_ids=[pid],
                        payload={"target": target["record_id"], "text": r.text if r.ok else ""},
                    )
                )
                continue
            completion = render_output(obj["profile"], obj["prompt"])
        kept.append(
            {
                "record_id": content_id("personaatlas_ppopt", target["record_id"], completion),
                "parent_ids": [target["record_id"]],
                "provenance": Provenance.of_client(
                    client,
                    template_id=TEACHER.id,
                    template_hash=TEACHER.hash,
                    params_json=json.dumps({"max_tokens": max_tokens, "max_history": MAX_HISTORY}),
                    seed=seed,
                    cache_keys=keys,
                ).as_dict(),
                "persona_id": pid,
                "split": target["split"],
                "persona": schema.describe(json.loads(target["observed"])),
                "observed": target["observed"],
                "history_ids": [h["record_id"] for h in history],
                "query": target["initial_query"],
                "prompt": POLICY_PROMPT.format(
                    history=render_history(history, clean=False), query=target["initial_query"]
                ),
                "prompt_clean": POLICY_PROMPT.format(
                    history=render_history(history, clean=True), query=target["initial_query"]
                ),
                "noised_history_turns": sum(h["noised_turns"] for h in history),
                "completion": completion,
            }
        )
    return frame(kept, PPOPT_SCHEMA), rejected_frame(rejected), len(by_persona)


# ---- judges --------------------------------------------------------------------------

PROFILE_JUDGE_ID = "personaatlas_profile_judge"
TASK_JUDGE_ID = "personaatlas_task_judge"
ANSWER_ID = "personaatlas_answer"
SCALE = ("1", "2", "3", "4", "5")


def answer_requests(prompts: list[str], max_tokens: int = 128) -> list[LLMRequest]:
    """The plain assistant (no persona) answering a prompt: original or rewritten."""
    params = GenerationParams(temperature=0.0, max_tokens=max_tokens, seed=0, repeat_penalty=1.1)
    return [LLMRequest.chat(p, None, params, None, ANSWER_ID) for p in prompts]


def profile_scores(client: LLMClient, personas: list[str], profiles: list[str]) -> list[float]:
    """How well each inferred profile matches the true persona: the expected 1-5 rating
    from the judge's token probabilities, mapped to [0, 1]; nan when it did not answer."""
    reqs = [
        LLMRequest.chat(
            f"True user profile:\n{p}\n\nInferred profile:\n{q}\n\nHow well does the inferred "
            "profile match the true one, from 1 (not at all) to 5 (fully)? Answer with one digit.",
            None,
            template_id=PROFILE_JUDGE_ID,
        )
        for p, q in zip(personas, profiles, strict=True)
    ]
    scores = judge(client, reqs, SCALE)
    return [
        (s.expected({c: int(c) for c in SCALE}) - 1) / 4 if s.ok else float("nan") for s in scores
    ]


def _task_request(persona: str, query: str, first: str, second: str) -> LLMRequest:
    return LLMRequest.chat(
        f"User profile:\n{persona}\n\nUser query:\n{query}\n\nResponse A:\n{first}\n\n"
        f"Response B:\n{second}\n\nWhich response serves this user better? Answer A or B.",
        None,
        template_id=TASK_JUDGE_ID,
    )


def task_scores(
    client: LLMClient,
    personas: list[str],
    queries: list[str],
    original_answers: list[str],
    rewritten_answers: list[str],
    both_orders: bool = True,
) -> list[float]:
    """p(the answer to the rewritten prompt is better), averaged over both presentation
    orders when `both_orders` (position bias cancels); nan when the judge did not answer."""
    items = list(zip(personas, queries, original_answers, rewritten_answers, strict=True))
    reqs = [_task_request(p, q, o, r) for p, q, o, r in items]
    if both_orders:
        reqs += [_task_request(p, q, r, o) for p, q, o, r in items]
    if not reqs:
        return []
    scores = judge(client, reqs, ("A", "B"))
    n = len(items)
    out = []
    for i in range(n):
        ps = [scores[i].p("B")] if scores[i].ok else []
        if both_orders and scores[n + i].ok:
            ps.append(scores[n + i].p("A"))
        out.append(sum(ps) / len(ps) if ps else float("nan"))
    return out


def rewrite_scores(
    client: LLMClient,
    personas: list[str],
    queries: list[str],
    rewrites: list[str],
    both_orders: bool,
    answer_max_tokens: int = 128,
    answer_client: LLMClient | None = None,
) -> list[float]:
    """Per rewrite, `task_scores` of the plain assistant's answer to it against its answer
    to the original query (each distinct original is answered once). `answer_client`
    answers (the deployed assistant; `client` if None), `client` judges."""
    originals = sorted(set(queries))
    answers = (answer_client or client).generate(
        answer_requests(originals + rewrites, answer_max_tokens)
    )
    original_answer = {q: a.text for q, a in zip(originals, answers, strict=False)}
    return task_scores(
        client,
        personas,
        queries,
        [original_answer[q] for q in queries],
        [a.text for a in answers[len(originals) :]],
        both_orders,
    )


WIN_SCHEMA: dict[str, pl.DataType] = {
    "model": pl.Utf8(),
    "history": pl.Utf8(),  # noised | clean | none (the generic-rewrite baseline)
    "persona_id": pl.Utf8(),
    "format_ok": pl.Boolean(),
    "p_better": pl.Float64(),  # null when there was no rewrite to judge or the judge failed
    "judge_failed": pl.Boolean(),  # a rewrite the judge gave no answer on: not counted
    "win": pl.Boolean(),
}


def score_rewrites(
    client: LLMClient,
    heldout: pl.DataFrame,
    responses: list[dict[str, Any]],
    answer_max_tokens: int = 96,
    answer_client: LLMClient | None = None,
) -> pl.DataFrame:
    """One row per optimizer output (`model`, `prompt_id` = "<ppopt record_id>|<history>",
    `response`): does the answer to its rewrite serve the persona better than the answer
    to the original query? Judged in both orders; an output without a rewrite loses."""
    by_id = {r["record_id"]: r for r in heldout.to_dicts()}
    rows = []
    for r in responses:
        rid, history = r["prompt_id"].rsplit("|", 1)
        parsed = parse_output(r["response"])
        rows.append((r["model"], history, by_id[rid], parsed[1] if parsed else None))
    scored = [x for x in rows if x[3]]
    p_better = rewrite_scores(
        client,
        [x[2]["persona"] for x in scored],
        [x[2]["query"] for x in scored],
        [x[3] for x in scored],
        both_orders=True,
        answer_max_tokens=answer_max_tokens,
        answer_client=answer_client,
    )
    judged = {id(x): p for x, p in zip(scored, p_better, strict=True)}
    out = []
    for x in rows:
        p = judged.get(id(x))
        failed = p is not None and math.isnan(p)
        out.append(
            {
                "model": x[0],
                "history": x[1],
                "persona_id": x[2]["persona_id"],
                "format_ok": x[3] is not None,
                "p_better": None if failed else p,
                "judge_failed": failed,
                "win": p is not None and not failed and p > 0.5,
            }
        )
    return frame(out, WIN_SCHEMA)
