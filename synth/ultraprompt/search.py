"""Monte-Carlo Tree Search over principle-guided rewrites of one instruction (P-Aligner).

Following the paper's official code (`online_synthesis/mcts_utils.py`):

- A node is an instruction; the root is the seed as written. Expanding a node applies one
  principle (of the seed's category, plus the helpfulness group) that none of the node's
  children used yet: the ban is among siblings, so a principle may be applied again
  further down a path. Rewrites compose: a child rewrites its parent's rewrite.
- A new node is simulated: k responses (the generator role) to the node's instruction,
  each scored against the ORIGINAL instruction by the reward role (a reward model, or a
  chat judge's p(Yes)); the node's reward is their mean (`local_avg_reward`).
- Selection descends while a node is fully expanded, by UCT on the children's Q: the
  recursive mean of the child's own reward and its children's Q. Backup keeps the max
  (`value`: the best reward in the subtree). The best node (the chosen instruction) is the
  node with the highest own reward, the worst the lowest; the root is a candidate.
- The budget counts successful expansions (`iterations`, 20 in the paper). A rewrite that
  fails, comes back empty or unchanged, runs away, drifts from the original intent
  (MiniLM cosine), answers instead of asking, adds facts or changes what is asked (see
  `intent`) is pruned: kept in the tree with its reason but not a child, and the
  expansion is retried with another sampling seed, within a separate retry budget. A
  principle that fails twice at a node is not tried there again.

All trees of a batch advance in lockstep, so the LLM calls of many seeds go out
together. Every choice is seeded and every call goes through the response cache: a
killed search, re-run, rebuilds the same trees from the cache without new calls.
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

from synth.llm import GenerationParams, LLMClient, LLMRequest, judge
from synth.llm.reward import score_rewards
from synth.progress import Progress
from synth.records import content_id
from synth.templates import PromptTemplate
from synth.ultraprompt.intent import intent_problem, judge_intent_requests
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
    "answers_instead",
    "adds_facts",
    "changed_request",
    "judge_intent_changed",
    "unscored",
)


class SearchSettings(BaseModel):
    """Knobs of the search. Defaults follow the paper where it gives one."""

    model_config = ConfigDict(frozen=True)

    iterations: int = 20  # successful expansions per tree (paper: 20)
    retries: int = 20  # pruned or failed expansions a tree may retry beyond the budget
    attempts_per_action: int = 2  # a principle that fails this often at a node is dropped there
    exploration_weight: float = 0.1  # UCT constant (paper: 0.1)
    samples: int = 2  # k responses per node
    response_max_tokens: int = 96
    response_temperature: float = 0.8
    rewrite_max_tokens: int = 160
    rewrite_temperature: float = 0.7
    # A rewrite whose MiniLM cosine to the ORIGINAL instruction is below this is pruned.
    min_intent_similarity: float = 0.45
    min_content_coverage: float = 0.5  # share of the original's content words a rewrite keeps
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
    value: float | None = None  # max backup: the best reward in the subtree
    q: float | None = None  # selection value: mean of the own reward and the children's q
    visits: int = 0
    calls: int = 0  # LLM requests this node cost (rewrite + responses + judgements)
    children: list[int] = field(default_factory=list)  # simulated children only
    attempts: dict[str, int] = field(default_factory=dict)  # failed expansions per principle
    attempt: int = 0  # for a pruned node: which try of (parent, principle) it was
    exhausted: bool = False
    cache_keys: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Tree:
    seed_id: str
    category: str
    allowed: tuple[str, ...]
    nodes: list[Node]
    rng: random.Random
    max_attempts_per_action: int = 2
    iterations_run: int = 0  # successful expansions
    retries_used: int = 0
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
    allowed = allowed_principles(seed.category)
    return Tree(seed.record_id, seed.category, allowed, [root], rng, settings.attempts_per_action)


# ---------------------------------------------------------------- selection and backup


def uct(parent: Node, child: Node, weight: float) -> float:
    return child.q + weight * math.sqrt(math.log(max(parent.visits, 1)) / child.visits)


def untried(tree: Tree, node: Node) -> list[str]:
    """Principles that no child of `node` used and that have not failed out there."""
    used = {tree.nodes[c].action for c in node.children}
    return [
        a
        for a in tree.allowed
        if a not in used and node.attempts.get(a, 0) < tree.max_attempts_per_action
    ]


def select(tree: Tree, weight: float) -> tuple[Node, str] | None:
    """The node to expand and the principle to apply, or None when the tree is exhausted:
    descend while fully expanded, by UCT on Q (the mean), then pick an untried principle."""
    while not tree.root.exhausted:
        node = tree.root
        while True:
            todo = untried(tree, node)
            if todo:
                return node, tree.rng.choice(todo)
            live = [tree.nodes[c] for c in node.children if not tree.nodes[c].exhausted]
            if not live:
                node.exhausted = True  # nothing left below: restart from the root
                break
            node = max(live, key=lambda c: uct(node, c, weight))
    return None


def backup(tree: Tree, node: Node) -> None:
    """From a newly simulated node up: visits +1, value = max of the own reward and the
    children's values, q = mean of the own reward and the children's q."""
    node.value, node.q, node.visits = node.reward, node.reward, 1
    while node.parent is not None:
        node = tree.nodes[node.parent]
        node.visits += 1
        kids = [tree.nodes[c] for c in node.children]
        node.value = max([node.reward, *(k.value for k in kids)])
        node.q = float(np.mean([node.reward, *(k.q for k in kids)]))


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
    original: str, parent: Node, text: str, ok: bool, similarity: float, settings: SearchSettings
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
    return intent_problem(original, text, settings.min_content_coverage)


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
    intent_client: LLMClient | None = None,
) -> list[tuple[Tree, Node]]:
    """One rewrite per pick; returns the new nodes that survived pruning (not yet simulated).
    A pruned node stays in the tree (with its reason and which attempt it was) but is not a
    child of its parent, and its principle's failure count at the parent goes up."""
    # A retry of (parent, principle) samples with another seed: the same seed would give
    # the same rewrite back from the cache.
    tries = [parent.attempts.get(action, 0) for _, parent, action in picks]
    offsets = [t * 1000 + (variant[i] if variant else 0) for i, t in enumerate(tries)]
    reqs = rewrite_requests([(n, a) for _, n, a in picks], principles, settings, offsets)
    outs = client.generate(reqs)
    texts = [clean_rewrite(o.text) if o.ok else "" for o in outs]
    vecs = embedder([t or " " for t in texts])
    children = []
    for (tree, parent, action), out, text, vec, attempt in zip(
        picks, outs, texts, vecs, tries, strict=True
    ):
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
            attempt=attempt,
            cache_keys=[s.cache_key for s in out.samples],
        )
        reason = _prune_reason(tree.root.instruction, parent, text, out.ok, sim, settings)
        if reason:
            child.status, child.prune_reason = PRUNED, reason
        tree.nodes.append(child)
        children.append((tree, parent, child))
    if intent_client is not None:
        asked = [(t, c) for t, _, c in children if c.status == PENDING]
        verdicts = judge(
            intent_client,
            judge_intent_requests([(t.root.instruction, c.instruction) for t, c in asked]),
        )
        for (_, c), v in zip(asked, verdicts, strict=True):
            c.calls += 1
            c.cache_keys.append(v.cache_key)
            if v.ok and v.p("Yes") < 0.5:
                c.status, c.prune_reason = PRUNED, "judge_intent_changed"
    survivors = []
    for tree, parent, child in children:
        if child.status == PRUNED:
            parent.attempts[child.action] = parent.attempts.get(child.action, 0) + 1
        else:
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


def _settle(tree: Tree, node: Node) -> bool:
    """After simulation: a scored node joins its parent's children and is backed up (True);
    an unscored one counts as a failed attempt of its principle (False)."""
    parent = tree.nodes[node.parent]
    if node.status != SIMULATED:
        parent.attempts[node.action] = parent.attempts.get(node.action, 0) + 1
        return False
    parent.children.append(node.id)
    backup(tree, node)
    return True


def search(
    client: LLMClient,
    seeds: Sequence[SeedTask],
    settings: SearchSettings = SearchSettings(),
    log: Callable[[str], None] | None = None,
    embedder: Embedder | None = None,
    principles: dict[str, Principle] | None = None,
    reward_client: LLMClient | None = None,
    intent_client: LLMClient | None = None,
) -> list[Tree]:
    """One MCTS tree per seed, all advanced together, until each has `iterations`
    successful expansions, runs out of retries or of untried principles. `client` rewrites
    and answers (the generator role), `reward_client` scores the answers (the reward role),
    `intent_client` (the judge role, optional) double-checks each rewrite's intent."""
    embedder = embedder or _default_embedder
    principles = principles or load_principles()
    trees, originals = _start(client, seeds, settings, embedder, reward_client)
    progress = Progress(settings.iterations * len(trees), "mcts expansions", log)
    rounds = 0
    while True:
        rounds += 1
        picks = []
        for t in trees:
            if t.failure or t.iterations_run >= settings.iterations:
                continue
            if t.retries_used > settings.retries:
                continue
            chosen = select(t, settings.exploration_weight)
            if chosen is not None:
                picks.append((t, *chosen))
        if not picks:
            break
        new = expand(
            client, picks, originals, principles, settings, embedder, rounds, None, intent_client
        )
        simulate(client, [(n, t.root.instruction) for t, n in new], settings, reward_client)
        done = {id(n) for t, n in new if _settle(t, n)}
        for t in {id(t): t for t, _, _ in picks}.values():
            made = [n for n in t.nodes if n.iteration == rounds and n.parent is not None]
            ok = sum(id(n) in done for n in made)
            t.iterations_run += ok
            t.retries_used += len(made) - ok
            progress.update(ok)
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
    principle (drawn with replacement, distinct sampling seeds); keep the best. A pruned
    one is not retried: the budget is n rewrites."""
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
    new = expand(client, picks, originals, principles, settings, embedder, 1, variants)
    simulate(client, [(c, t.root.instruction) for t, c in new], settings, reward_client)
    for t, c in new:
        if c.status == SIMULATED:
            t.root.children.append(c.id)
            backup(t, c)
            t.iterations_run += 1
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
        "q": node.q,
        "visits": node.visits,
        "calls": node.calls,
        "attempt": node.attempt,
    }
