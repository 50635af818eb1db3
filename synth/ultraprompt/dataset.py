"""From searched trees to the UltraPrompt tables: nodes, one record per seed, training views."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl

from synth.llm import LLMClient
from synth.records import (
    PROVENANCE_DTYPE,
    Provenance,
    Rejected,
    content_id,
    frame,
    rejected_frame,
)
from synth.templates import PromptTemplate
from synth.ultraprompt.intent import INTENT_JUDGE
from synth.ultraprompt.search import (
    JUDGE_INTENT,
    RESPOND,
    REWRITE,
    SearchSettings,
    SeedTask,
    Tree,
    node_row,
    search,
)

TREE_SCHEMA: dict[str, pl.DataType] = {
    "seed_id": pl.Utf8(),
    "node_id": pl.Int64(),
    "parent_node_id": pl.Int64(),
    "depth": pl.Int64(),
    "iteration": pl.Int64(),
    "action": pl.Utf8(),
    "path": pl.List(pl.Utf8),
    "instruction": pl.Utf8(),
    "status": pl.Utf8(),
    "prune_reason": pl.Utf8(),
    "intent_similarity": pl.Float64(),
    "reward": pl.Float64(),
    "scores": pl.List(pl.Float64),
    "responses": pl.List(pl.Utf8),
    "value": pl.Float64(),
    "q": pl.Float64(),
    "visits": pl.Int64(),
    "calls": pl.Int64(),
    "attempt": pl.Int64(),
}

ULTRAPROMPT_SCHEMA: dict[str, pl.DataType] = {
    "record_id": pl.Utf8(),
    "parent_ids": pl.List(pl.Utf8),
    "provenance": PROVENANCE_DTYPE,
    "category": pl.Utf8(),
    "src_instruction": pl.Utf8(),
    "chosen_instruction": pl.Utf8(),
    "chosen_actions": pl.List(pl.Utf8),
    "chosen_reward": pl.Float64(),
    "chosen_node_id": pl.Int64(),
    "rejected_instruction": pl.Utf8(),
    "rejected_actions": pl.List(pl.Utf8),
    "rejected_reward": pl.Float64(),
    "rejected_node_id": pl.Int64(),
    "root_reward": pl.Float64(),
    "reward_gain": pl.Float64(),  # chosen - root
    "tree_nodes": pl.Int64(),
    "pruned_nodes": pl.Int64(),
    "iterations_run": pl.Int64(),  # successful expansions
    "retries_used": pl.Int64(),
    "max_depth": pl.Int64(),  # of the simulated nodes
    "llm_calls": pl.Int64(),
}

# What the P-Aligner rewriter sees: the original request, nothing else.
PALIGNER_PROMPT = PromptTemplate(
    id="paligner_rewrite",
    system="",
    user=(
        "Rewrite the following request so that an AI assistant can answer it as helpfully, "
        "honestly and harmlessly as possible, keeping its intent.\n\nRequest:\n{instruction}"
    ),
)


@dataclass(slots=True)
class Synthesis:
    trees: pl.DataFrame
    records: pl.DataFrame
    rejected: pl.DataFrame
    n_in: int
    searched: list[Tree]


def synthesize(
    client: LLMClient,
    seeds: pl.DataFrame,
    settings: SearchSettings = SearchSettings(),
    log: Callable[[str], None] | None = None,
    embedder: Any = None,
    reward_client: LLMClient | None = None,
    intent_client: LLMClient | None = None,
) -> Synthesis:
    """Search every `split == "search"` seed; one record per seed or a rejected row.
    `client` (generator) rewrites and answers, `reward_client` (reward) scores,
    `intent_client` (judge, optional) double-checks each rewrite's intent."""
    rows = seeds.filter(pl.col("split") == "search").to_dicts()
    tasks = [SeedTask(r["record_id"], r["instruction"], r["category"]) for r in rows]
    trees = search(
        client,
        tasks,
        settings,
        log,
        embedder,
        reward_client=reward_client,
        intent_client=intent_client,
    )
    params_json = json.dumps(settings.model_dump(), sort_keys=True)
    template_hash = content_id(REWRITE.hash, RESPOND.hash, JUDGE_INTENT.hash, INTENT_JUDGE.hash)[
        :12
    ]
    node_rows, kept, rejected = [], [], []
    for r, tree in zip(rows, trees, strict=True):
        node_rows += [node_row(tree, n) for n in tree.nodes]
        where = f"seed {r['record_id']}"
        reason, detail = "", ""
        if tree.failure:
            reason, detail = tree.failure, f"{where}: no response to the original could be judged"
        elif len(tree.simulated()) < 2:
            reason = "no_contrast"
            pruned = [n.prune_reason for n in tree.nodes if n.prune_reason]
            detail = (
                f"{where}: no rewrite survived to be scored (pruned: {', '.join(pruned) or 'none'})"
            )
        if reason:
            rejected.append(
                Rejected(
                    record_id=content_id("ultraprompt_rejected", r["record_id"], reason),
                    stage="search",
                    reason=reason,
                    detail=detail,
                    parent_ids=[r["record_id"]],
                    payload={"instruction": r["instruction"], "category": r["category"]},
                )
            )
            continue
        best, worst, root = tree.best(), tree.worst(), tree.root
        prov = Provenance.of_client(
            client,
            also=(reward_client, intent_client),
            template_id=REWRITE.id,
            template_hash=template_hash,
            params_json=params_json,
            seed=settings.seed,
            cache_keys=[k for n in tree.nodes for k in n.cache_keys],
        )
        kept.append(
            {
                "record_id": content_id(
                    "ultraprompt", r["record_id"], best.instruction, worst.instruction
                ),
                "parent_ids": [r["record_id"]],
                "provenance": prov.as_dict(),
                "category": r["category"],
                "src_instruction": root.instruction,
                "chosen_instruction": best.instruction,
                "chosen_actions": tree.path_actions(best),
                "chosen_reward": best.reward,
                "chosen_node_id": best.id,
                "rejected_instruction": worst.instruction,
                "rejected_actions": tree.path_actions(worst),
                "rejected_reward": worst.reward,
                "rejected_node_id": worst.id,
                "root_reward": root.reward,
                "reward_gain": best.reward - root.reward,
                "tree_nodes": len(tree.nodes),
                "pruned_nodes": sum(n.status == "pruned" for n in tree.nodes),
                "iterations_run": tree.iterations_run,
                "retries_used": tree.retries_used,
                "max_depth": max(n.depth for n in tree.simulated()),
                "llm_calls": tree.calls,
            }
        )
    return Synthesis(
        frame(node_rows, TREE_SCHEMA),
        frame(kept, ULTRAPROMPT_SCHEMA),
        rejected_frame(rejected),
        len(rows),
        trees,
    )


def rewriter_prompt(instruction: str) -> str:
    return PALIGNER_PROMPT.user.format(instruction=instruction)


def _view_keys() -> list[pl.Expr]:
    return [
        pl.col("record_id"),
        pl.col("category"),
        pl.col("src_instruction")
        .map_elements(rewriter_prompt, return_dtype=pl.Utf8)
        .alias("prompt"),
    ]


def sft_view(records: pl.DataFrame) -> pl.DataFrame:
    """(prompt -> completion) pairs for the rewriter: the original to the best rewrite."""
    return records.select(
        *_view_keys(),
        pl.col("chosen_instruction").alias("completion"),
        (pl.col("chosen_node_id") == 0).alias("keeps_original"),
    )


def dpo_view(records: pl.DataFrame) -> pl.DataFrame:
    """(prompt, chosen, rejected) for DPO of the rewriter: best over worst rewrite."""
    return records.filter(pl.col("chosen_node_id") != pl.col("rejected_node_id")).select(
        *_view_keys(),
        pl.col("chosen_instruction").alias("chosen"),
        pl.col("rejected_instruction").alias("rejected"),
        (pl.col("chosen_reward") - pl.col("rejected_reward")).alias("reward_margin"),
    )
