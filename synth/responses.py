"""The starter slice: a response per seed instruction from the LLM, judged for whether it
follows the instruction (Yes/No by logprobs), kept or rejected with a reason.

It exercises everything a family uses: templates with hashes in provenance, the cache,
the judge, lineage to the seed, and a rejected table where counts in = kept + rejected.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict

from synth.llm import GenerationParams, LLMClient, judge
from synth.progress import Progress
from synth.records import PROVENANCE_DTYPE, Provenance, Rejected, content_id, rejected_frame
from synth.templates import PromptTemplate

RESPOND_PLAIN = PromptTemplate(
    id="respond_plain",
    system="You are a helpful, honest assistant. Answer the user's request directly.",
    user="{instruction}",
)
RESPOND_WITH_INPUT = PromptTemplate(
    id="respond_with_input",
    system="You are a helpful, honest assistant. Answer the user's request directly.",
    user="{instruction}\n\nInput:\n{input}",
)
JUDGE_FOLLOWS = PromptTemplate(
    id="judge_follows_instruction",
    system="You are a strict grader. Answer with a single word: Yes or No.",
    user=(
        "Instruction:\n{instruction}\n\nResponse:\n{response}\n\n"
        "Does the response follow the instruction? Answer Yes or No."
    ),
)


@dataclass(frozen=True, slots=True)
class ResponseTemplates:
    plain: PromptTemplate = RESPOND_PLAIN
    with_input: PromptTemplate = RESPOND_WITH_INPUT
    judge: PromptTemplate = JUDGE_FOLLOWS


class ResponseSettings(BaseModel):
    """Knobs of the slice; a pydantic model so the Dagster run config can extend it as is."""

    model_config = ConfigDict(frozen=True)

    max_tokens: int = 96
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    repeat_penalty: float = 1.1
    # A response whose judged probability of following the instruction is below this is dropped.
    min_follow_prob: float = 0.2

    def params(self) -> GenerationParams:
        return GenerationParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            seed=self.seed,
            repeat_penalty=self.repeat_penalty,
        )


RESPONSE_SCHEMA: dict[str, pl.DataType] = {
    "record_id": pl.Utf8(),
    "parent_ids": pl.List(pl.Utf8),
    "provenance": PROVENANCE_DTYPE,
    "instruction": pl.Utf8(),
    "input": pl.Utf8(),
    "response": pl.Utf8(),
    "finish_reason": pl.Utf8(),
    "completion_tokens": pl.Int64(),
    "judge_p_follows": pl.Float64(),
    "judge_method": pl.Utf8(),
    "judge_template_hash": pl.Utf8(),
    "judge_cache_key": pl.Utf8(),
}


@dataclass(slots=True)
class Curated:
    kept: pl.DataFrame
    rejected: pl.DataFrame
    n_in: int


def judged_responses(
    client: LLMClient,
    instructions: pl.DataFrame,
    settings: ResponseSettings = ResponseSettings(),
    templates: ResponseTemplates = ResponseTemplates(),
    log: Callable[[str], None] | None = None,
    judge_client: LLMClient | None = None,
) -> Curated:
    """`client` writes the responses; `judge_client` (the judge role; `client` if None)
    decides whether each follows its instruction."""
    judge_client = judge_client or client
    rows = instructions.to_dicts()
    params = settings.params()
    used = [templates.with_input if r["input"] else templates.plain for r in rows]
    gen_reqs = [
        t.request(params, instruction=r["instruction"], input=r["input"])
        for t, r in zip(used, rows, strict=True)
    ]

    progress = Progress(len(rows), "responses", log)
    responses = client.generate(gen_reqs, on_done=lambda _: progress.update())
    progress.close()

    kept: list[dict[str, Any]] = []
    rejected: list[Rejected] = []
    to_judge: list[int] = []
    for i, (row, resp) in enumerate(zip(rows, responses, strict=True)):
        where = f"instruction {row['record_id']}"
        if not resp.ok:
            rejected.append(
                _reject(
                    row,
                    "generate",
                    f"llm_{resp.error}",
                    f"{where}: {resp.first.error_detail}",
                    resp.text,
                )
            )
        elif not resp.text.strip():
            rejected.append(
                _reject(
                    row, "generate", "empty_response", f"{where}: field 'response' is empty", ""
                )
            )
        else:
            to_judge.append(i)

    judge_reqs = [
        templates.judge.request(
            params, instruction=_with_input(rows[i]), response=responses[i].text
        )
        for i in to_judge
    ]
    progress = Progress(len(judge_reqs), "judge", log)
    scores = judge(judge_client, judge_reqs, on_done=lambda _: progress.update())
    progress.close()

    params_json = json.dumps(asdict(params), sort_keys=True)
    for i, score in zip(to_judge, scores, strict=True):
        row, resp, tmpl = rows[i], responses[i], used[i]
        where = f"instruction {row['record_id']}"
        if not score.ok:
            rejected.append(
                _reject(
                    row,
                    "judge",
                    f"judge_{score.error}",
                    f"{where}: judge gave no usable answer",
                    resp.text,
                )
            )
            continue
        p_follow = score.p("Yes")
        if p_follow < settings.min_follow_prob:
            rejected.append(
                _reject(
                    row,
                    "judge",
                    "judge_below_threshold",
                    f"{where}: judge_p_follows {p_follow:.3f} < {settings.min_follow_prob}",
                    resp.text,
                )
            )
            continue
        prov = Provenance.of_client(
            client,
            also=(judge_client,),
            template_id=tmpl.id,
            template_hash=tmpl.hash,
            params_json=params_json,
            seed=settings.seed,
            cache_keys=resp.cache_keys,
        )
        kept.append(
            {
                "record_id": content_id("response", row["record_id"], tmpl.hash, resp.text),
                "parent_ids": [row["record_id"]],
                "provenance": prov.as_dict(),
                "instruction": row["instruction"],
                "input": row["input"],
                "response": resp.text,
                "finish_reason": resp.first.finish_reason,
                "completion_tokens": resp.first.usage.completion_tokens,
                "judge_p_follows": p_follow,
                "judge_method": score.method,
                "judge_template_hash": templates.judge.hash,
                "judge_cache_key": score.cache_key,
            }
        )
    return Curated(pl.DataFrame(kept, schema=RESPONSE_SCHEMA), rejected_frame(rejected), len(rows))


def _with_input(row: dict[str, Any]) -> str:
    return f"{row['instruction']}\n\nInput:\n{row['input']}" if row["input"] else row["instruction"]


def _reject(row: dict[str, Any], stage: str, reason: str, detail: str, response: str) -> Rejected:
    return Rejected(
        record_id=content_id("response", row["record_id"], reason),
        stage=stage,
        reason=reason,
        detail=detail,
        parent_ids=[row["record_id"]],
        source=row.get("source", ""),
        source_index=row.get("source_index"),
        payload={"instruction": row["instruction"], "input": row["input"], "response": response},
    )
