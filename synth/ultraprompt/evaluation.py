"""Win rate of responses to rewritten instructions over responses to the originals.

For each held-out instruction and rewriter, the target model answers the original and
the rewrite; a pairwise judge, shown the ORIGINAL request, says which answer serves it
better. Each pair is judged in both orders and the two verdicts averaged, because small
judges prefer whichever answer comes first. A rewrite wins when its averaged probability
is above one half; an empty or failed rewrite counts as the original (no win). When the
judge gives no usable verdict in either order, the row's `p_rewritten_better` and `win`
are null and `judge_failed` is set: a failure is counted and left out of the win rate,
never scored as a tie or a loss."""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

from synth.llm import GenerationParams, LLMClient, judge
from synth.templates import PromptTemplate
from synth.ultraprompt.search import RESPOND, clean_rewrite

JUDGE_PAIRWISE = PromptTemplate(
    id="ultraprompt_judge_pairwise",
    system="You are a strict grader. Reply with a single letter: A or B.",
    user=(
        "A user asked:\n{original}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
        "Which response serves what the user asked for better, helpfully, honestly and "
        "harmlessly? Reply with A or B."
    ),
)

WIN_SCHEMA = {
    "rewriter": pl.Utf8,
    "instruction": pl.Utf8,
    "rewrite": pl.Utf8,
    "response_original": pl.Utf8,
    "response_rewritten": pl.Utf8,
    "p_rewritten_better": pl.Float64,
    "win": pl.Boolean,
    "judge_failed": pl.Boolean,
    "judge_method": pl.Utf8,
}


def win_rates(
    client: LLMClient,
    rewrites: pl.DataFrame,
    max_tokens: int = 96,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    answer_client: LLMClient | None = None,
) -> pl.DataFrame:
    """`rewrites` has rewriter, instruction, rewrite; one judged row per input row.
    `answer_client` answers both instructions (the generator; `client` if None), `client`
    judges which answer serves the original better (the evaluator)."""
    rows = rewrites.to_dicts()
    for r in rows:
        r["rewrite"] = clean_rewrite(r["rewrite"] or "") or r["instruction"]
    params = GenerationParams(temperature=0.0, max_tokens=max_tokens, seed=seed, repeat_penalty=1.1)
    texts = sorted({r["instruction"] for r in rows} | {r["rewrite"] for r in rows})
    answers = dict(
        zip(
            texts,
            (
                resp.text.strip() if resp.ok else ""
                for resp in (answer_client or client).generate(
                    [RESPOND.request(params, instruction=t) for t in texts]
                )
            ),
            strict=True,
        )
    )
    reqs = []
    for r in rows:
        orig, new = answers[r["instruction"]], answers[r["rewrite"]]
        reqs.append(JUDGE_PAIRWISE.request(params, original=r["instruction"], a=new, b=orig))
        reqs.append(JUDGE_PAIRWISE.request(params, original=r["instruction"], a=orig, b=new))
    scores = judge(client, reqs, choices=("A", "B"))
    out = []
    for k, r in enumerate(rows):
        first, second = scores[2 * k], scores[2 * k + 1]
        votes = [s.p("A") for s in (first,) if s.ok] + [s.p("B") for s in (second,) if s.ok]
        p = sum(votes) / len(votes) if votes else None
        same = r["rewrite"] == r["instruction"]
        failed = p is None and not same
        out.append(
            {
                "rewriter": r["rewriter"],
                "instruction": r["instruction"],
                "rewrite": r["rewrite"],
                "response_original": answers[r["instruction"]],
                "response_rewritten": answers[r["rewrite"]],
                "p_rewritten_better": 0.5 if same else p,
                "win": None if failed else (not same) and p > 0.5,
                "judge_failed": failed,
                "judge_method": "+".join(sorted({first.method, second.method})),
            }
        )
    if log:
        failed = sum(r["judge_failed"] for r in out)
        log(f"judged {len(out)} rewrites in both orders; {failed} without a usable verdict")
    return pl.DataFrame(out, schema=WIN_SCHEMA)
