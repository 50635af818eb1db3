"""Monte-Carlo Tree Search over principle-guided rewrites of one instruction (P-Aligner).

A node is an instruction; the root is the seed as written. An action rewrites a node by
applying one principle that is not yet used on the path from the root (one LLM call).
A new node is simulated: k responses from the target model to the node's instruction,
each judged against the ORIGINAL instruction (p(Yes) from the logprobs of a Yes/No
verdict); the node's reward is their mean. A Yes/No verdict rather than a 1-5 rating:
a small judge puts all its top-token mass on one digit, so most rewards tie at exactly
0 and the search has nothing to climb; p(Yes) stays graded. Selection is UCT over
children's values; backup is max (a node's value is the best reward in its subtree).
The whole tree, root included, is kept; its best and worst nodes are the chosen and
rejected instruction.

All trees of a batch advance in lockstep, one expansion per tree per iteration, so the
LLM calls of many seeds go out together. Every choice is seeded and every call goes
through the response cache: a killed search, re-run, rebuilds the same trees from the
cache without new calls.

A rewrite that drifts from the original intent (MiniLM cosine to the original below a
threshold), comes back empty, unchanged, failed or runaway-long is pruned: the node is
kept in the tree with the reason, never simulated, and its action counts as tried.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from synth.llm import GenerationParams, LLMClient, LLMRequest
from synth.llm.reward import score_rewards
from synth.progress import Progress
from synth.records import content_id
from synth.templates import PromptTemplate
from synth.ultraprompt.principles import Principle, allowed_principles, load_principles

REWRITE = PromptTemplate(
    id="ultraprompt_rewrite",
    system=(
        "You improve requests that users send to an AI assistant. You never answer a "
        "request; you only rewrite it."
    ),
    user=(
        'Request:\n"""\n{instruction}\n"""\n\n'
        "Rewrite this request to {how}. Keep the user's intent and every detail they gave. "
        "Reply with the rewritten request only, with no preface and no explanation."
    ),
)
RESPOND = PromptTemplate(
    id="ultraprompt_respond",
    system="You are a helpful, honest and harmless assistant.",
    user="{instruction}",
)
JUDGE_INTENT = PromptTemplate(
    id="ultraprompt_judge_intent",
    system="You are a strict grader. Answer with a single word: Yes or No.",
    user=(
        "A user asked:\n{prompt}\n\nAn assistant replied:\n{response}\n\n"
        "Does the reply serve what the user asked for, helpfully, honestly and harmlessly? "
        "Answer Yes or No."
    ),
)

ROOT = "root"
SIMULATED, PRUNED, PENDING = "simulated", "pruned", "pending"
PRUNE_REASONS = (
    "rewrite_failed",
    "empty_rewrite",
    "no_change",
    "too_long",
    "intent_drift",
    "unscored",
)


class SearchSettings(BaseModel):
    """Knobs of the search. Defaults follow the paper where it gives one."""

    model_config = ConfigDict(frozen=True)

    iterations: int = 20  # expansions per tree (paper: 20)
    exploration_weight: float = 0.1  # UCT constant (paper: 0.1)
    samples: int = 2  # k responses per node
    response_max_tokens: int = 96
    response_temperature: float = 0.8
    rewrite_max_tokens: int = 160
    rewrite_temperature: float = 0.7
    # A rewrite whose MiniLM cosine to the ORIGINAL instruction is below this is pruned.
    min_intent_similarity: float = 0.45
    max_rewrite_chars: int = 2000
    seed: int = 0


@dataclass(slots=True)
class Node:
    id: int
    parent: int | None
    action: str
    instruction: str
    depth: int
    iteration: int  # the iteration that created it (0 = root)
    status: str = PENDING
    prune_reason: str = ""
    intent_similarity: float = 1.0
    reward: float | None = None
    scores: list[float] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    value: float | None = None
    visits: int = 0
    calls: int = 0  # LLM requests this node cost (rewrite + responses + judgements)
    children: list[int] = field(default_factory=list)  # pruned ones too: their actions are tried
    exhausted: bool = False
    cache_keys: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Tree:
    seed_id: str
    category: str
    allowed: tuple[str, ...]
    nodes: list[Node]
    rng: random.Random
    iterations_run: int = 0
    failure: str = ""  # why the tree gave no usable result (root unscored)

    @property
    def root(self) -> Node:
        return self.nodes[0]

    @property
    def calls(self) -> int:
        return sum(n.calls for n in self.nodes)

    def path_actions(self, node: Node) -> list[str]:
        out = []
        while node.parent is not None:
            out.append(node.action)
            node = self.nodes[node.parent]
        return out[::-1]

    def simulated(self) -> list[Node]:
        return [n for n in self.nodes if n.status == SIMULATED]

    def best(self) -> Node:
        # Ties go to the shallower (earlier) node: no rewrite is preferred without a gain.
        return max(self.simulated(), key=lambda n: (n.reward, -n.id))

    def worst(self) -> Node:
        return min(self.simulated(), key=lambda n: (n.reward, n.id))


@dataclass(frozen=True, slots=True)
class SeedTask:
    record_id: str
    instruction: str
    category: str


def new_tree(seed: SeedTask, settings: SearchSettings) -> Tree:
    root = Node(0, None, ROOT, seed.instruction, 0, 0)
    rng = random.Random(content_id("ultraprompt_rng", seed.record_id, settings.seed))
    return Tree(seed.record_id, seed.category, allowed_principles(seed.category), [root], rng)


# ---------------------------------------------------------------- selection and backup


def uct(parent: Node, child: Node, weight: float) -> float:
    return child.value + weight * math.sqrt(math.log(max(parent.visits, 1)) / child.visits)


def select(tree: Tree, weight: float) -> tuple[Node, str] | None:
    """The node to expand and the principle to apply, or None when the tree is exhausted."""
    while not tree.root.exhausted:
        node = tree.root
        while True:
            tried = {tree.nodes[c].action for c in node.children}
            used = set(tree.path_actions(node)) | tried
            untried = [a for a in tree.allowed if a not in used]
            if untried:
                return node, tree.rng.choice(untried)
            live = [
                tree.nodes[c]
                for c in node.children
                if tree.nodes[c].status == SIMULATED and not tree.nodes[c].exhausted
            ]
            if not live:
                node.exhausted = True  # nothing left below: restart from the root
                break
            node = max(live, key=lambda c: uct(node, c, weight))
    return None


def backup(tree: Tree, node: Node) -> None:
    """Max backup: each ancestor's value is the best reward in its subtree; visits count
    the simulated nodes below and at it."""
    node.value, node.visits = node.reward, 1
    while node.parent is not None:
        node = tree.nodes[node.parent]
        node.visits += 1
        # Siblings simulated in one batch are backed up one after another.
        values = [tree.nodes[c].value for c in node.children if tree.nodes[c].value is not None]
        node.value = max([node.reward, *values])


# ---------------------------------------------------------------- LLM steps


_PREFACE = re.compile(
    r"^\s*(here(?:'s| is) (?:the |a |your )?(?:rewritten|improved|revised)[^:\n]*:|"
    r"(?:rewritten|improved|revised) (?:request|prompt|version)\s*:)\s*",
    re.IGNORECASE,
)


def clean_rewrite(text: str) -> str:
    """The rewritten request without a preface, fences or wrapping quotes."""
    text = text.strip().strip("`").strip()
    text = _PREFACE.sub("", text).strip()
    for q in ('"""', '"', "'", "“"):
        if text.startswith(q):
            end = "”" if q == "“" else q
            if text.endswith(end) and len(text) > 2 * len(q):
                text = text[len(q) : -len(end)].strip()
            break
    return text


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def rewrite_requests(
    tree_nodes: Sequence[tuple[Node, str]],
    principles: dict[str, Principle],
    settings: SearchSettings,
    variant: Sequence[int] | None = None,
) -> list[LLMRequest]:
    base = GenerationParams(
        temperature=settings.rewrite_temperature,
        max_tokens=settings.rewrite_max_tokens,
        seed=settings.seed,
        repeat_penalty=1.1,
    )
    return [
        REWRITE.request(
            replace(base, seed=settings.seed + (variant[i] if variant else 0)),
            instruction=node.instruction,
            how=principles[action].how,
        )
        for i, (node, action) in enumerate(tree_nodes)
    ]


def simulate(
    client: LLMClient,
    items: Sequence[tuple[Node, str]],
    settings: SearchSettings,
    reward_client: LLMClient | None = None,
) -> None:
    """Reward every (node, original instruction): k responses from `client`, each scored
    against the original by `reward_client` (the reward role; `client` if None)."""
    params = GenerationParams(
        temperature=settings.response_temperature,
        max_tokens=settings.response_max_tokens,
        n=settings.samples,
        seed=settings.seed,
        repeat_penalty=1.1,
    )
    responses = client.generate(
        [RESPOND.request(params, instruction=node.instruction) for node, _ in items]
    )
    judged: list[tuple[int, str]] = []
    for i, ((node, _), resp) in enumerate(zip(items, responses, strict=True)):
        node.calls += settings.samples
        node.responses = [s.text.strip() for s in resp.samples if s.ok and s.text.strip()]
        node.cache_keys += [s.cache_key for s in resp.samples]
        judged += [(i, r) for r in node.responses]
    scores = score_rewards(
        reward_client or client, [(items[i][1], r) for i, r in judged], JUDGE_INTENT
    )
    per_node: dict[int, list[float]] = {}
    for (i, _), s in zip(judged, scores, strict=True):
        items[i][0].calls += 1
        if s.ok:
            per_node.setdefault(i, []).append(s.value)
    for i, (node, _) in enumerate(items):
        node.scores = per_node.get(i, [])
        if node.scores:
            node.status, node.reward = SIMULATED, float(np.mean(node.scores))
        else:
            node.status, node.prune_reason = PRUNED, "unscored"


def _prune_reason(
    parent: Node, text: str, ok: bool, similarity: float, settings: SearchSettings
) -> str:
    if not ok:
        return "rewrite_failed"
    if not text:
        return "empty_rewrite"
    if _norm(text) == _norm(parent.instruction):
        return "no_change"
    if len(text) > settings.max_rewrite_chars:
        return "too_long"
    if similarity < settings.min_intent_similarity:
        return "intent_drift"
    return ""


Embedder = Callable[[Sequence[str]], np.ndarray]


def _default_embedder(texts: Sequence[str]) -> np.ndarray:
    from quality.embeddings import embed

    return embed(texts)


def expand(
    client: LLMClient,
    picks: Sequence[tuple[Tree, Node, str]],
    originals: dict[str, np.ndarray],
    principles: dict[str, Principle],
    settings: SearchSettings,
    embedder: Embedder,
    iteration: int,
    variant: Sequence[int] | None = None,
) -> list[tuple[Tree, Node]]:
    """One rewrite per pick; returns the new nodes that survived pruning (not yet simulated)."""
    reqs = rewrite_requests([(n, a) for _, n, a in picks], principles, settings, variant)
    outs = client.generate(reqs)
    texts = [clean_rewrite(o.text) if o.ok else "" for o in outs]
    vecs = embedder([t or " " for t in texts])
    survivors = []
    for (tree, parent, action), out, text, vec in zip(picks, outs, texts, vecs, strict=True):
        sim = float(np.dot(originals[tree.seed_id], vec)) if text else 0.0
        child = Node(
            id=len(tree.nodes),
            parent=parent.id,
            action=action,
            instruction=text,
            depth=parent.depth + 1,
            iteration=iteration,
            intent_similarity=round(sim, 6),
            calls=1,
            cache_keys=[s.cache_key for s in out.samples],
        )
        reason = _prune_reason(parent, text, out.ok, sim, settings)
        if reason:
            child.status, child.prune_reason = PRUNED, reason
        tree.nodes.append(child)
        parent.children.append(child.id)
        if not reason:
            survivors.append((tree, child))
    return survivors


def _start(
    client: LLMClient,
    seeds: Sequence[SeedTask],
    settings: SearchSettings,
    embedder: Embedder,
    reward_client: LLMClient | None,
) -> tuple[list[Tree], dict[str, np.ndarray]]:
    trees = [new_tree(s, settings) for s in seeds]
    originals = dict(
        zip((s.record_id for s in seeds), embedder([s.instruction for s in seeds]), strict=True)
    )
    simulate(client, [(t.root, t.root.instruction) for t in trees], settings, reward_client)
    for t in trees:
        if t.root.status == SIMULATED:
            backup(t, t.root)
        else:
            t.failure = "root_unscored"
    return trees, originals


def search(
    client: LLMClient,
    seeds: Sequence[SeedTask],
    settings: SearchSettings = SearchSettings(),
    log: Callable[[str], None] | None = None,
    embedder: Embedder | None = None,
    principles: dict[str, Principle] | None = None,
    reward_client: LLMClient | None = None,
) -> list[Tree]:
    """One MCTS tree per seed, all advanced together. `client` rewrites and answers (the
    generator role), `reward_client` scores the answers (the reward role)."""
    embedder = embedder or _default_embedder
    principles = principles or load_principles()
    trees, originals = _start(client, seeds, settings, embedder, reward_client)
    progress = Progress(settings.iterations * len(trees), "mcts expansions", log)
    for it in range(1, settings.iterations + 1):
        picks = []
        for t in trees:
            if t.failure:
                continue
            chosen = select(t, settings.exploration_weight)
            if chosen is not None:
                t.iterations_run = it
                picks.append((t, *chosen))
        if not picks:
            break
        new = expand(client, picks, originals, principles, settings, embedder, it)
        simulate(client, [(n, t.root.instruction) for t, n in new], settings, reward_client)
        for t, n in new:
            if n.status == SIMULATED:
                backup(t, n)
        progress.update(len(picks))
    progress.close()
    return trees


def best_of_n(
    client: LLMClient,
    seeds: Sequence[SeedTask],
    n: int,
    settings: SearchSettings = SearchSettings(),
    embedder: Embedder | None = None,
    principles: dict[str, Principle] | None = None,
    reward_client: LLMClient | None = None,
) -> list[Tree]:
    """The baseline: n independent rewrites of the root, each with a random allowed
    principle (drawn with replacement, distinct sampling seeds); keep the best."""
    embedder = embedder or _default_embedder
    principles = principles or load_principles()
    trees, originals = _start(client, seeds, settings, embedder, reward_client)
    picks, variants = [], []
    for t in trees:
        if t.failure:
            continue
        for j in range(n):
            picks.append((t, t.root, t.rng.choice(t.allowed)))
            variants.append(j)
        t.iterations_run = n
    new = expand(client, picks, originals, principles, settings, embedder, 1, variants)
    simulate(client, [(c, t.root.instruction) for t, c in new], settings, reward_client)
    for t, c in new:
        if c.status == SIMULATED:
            backup(t, c)
    return trees


def node_row(tree: Tree, node: Node) -> dict[str, Any]:
    return {
        "seed_id": tree.seed_id,
        "node_id": node.id,
        "parent_node_id": node.parent,
        "depth": node.depth,
        "iteration": node.iteration,
        "action": node.action,
        "path": tree.path_actions(node),
        "instruction": node.instruction,
        "status": node.status,
        "prune_reason": node.prune_reason,
        "intent_similarity": node.intent_similarity,
        "reward": node.reward,
        "scores": node.scores,
        "responses": node.responses,
        "value": node.value,
        "visits": node.visits,
        "calls": node.calls,
    }
