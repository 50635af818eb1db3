"""PersonaGym trajectories: a simulated user with a hidden persona talks to an assistant
that never sees it, while a distractor rewrites some user messages with layered noise.

All conversations advance in lockstep, turn by turn, so each step (distractor, assistant,
user simulator) is one batch of LLM calls. A conversation that cannot go on (a failed
call, an empty assistant turn, a user-simulator verdict that does not parse) becomes a
rejected row with the turn and the reason; conversations in = kept + rejected.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict

from synth.llm import GenerationParams, LLMClient, LLMRequest, Message, structured_failure
from synth.loaders import instruction_text
from synth.personaatlas.noise import (
    DISTRACT_ID,
    INTENT_ID,
    distract_request,
    intent_request,
    load_noise,
    plan_noise,
)
from synth.personaatlas.personas import PersonaSchema, load_schema
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

ASSISTANTS_FILE = Path(__file__).with_name("assistants.yaml")
ASSISTANT_ID = "personaatlas_assistant"
USER_SIM_ID = "personaatlas_user_sim"

STYLE_PROMPT = PromptTemplate(
    id="personaatlas_style",
    user=(
        "A person with these traits:\n{traits}\n\nwants to ask an AI assistant this:\n{query}\n\n"
        "Rewrite the request in their own words and style, as they would type it, in "
        "{words} words. Write only the request."
    ),
)
USER_SIM_SYSTEM = (
    "You are playing a user of an AI assistant. Stay in character. Your profile, which the "
    "assistant cannot see:\n{profile}"
)
USER_SIM_USER = (
    "The conversation so far:\n{dialogue}\n\nThe assistant's latest reply:\n{reply}\n\n"
    "This was turn {turn} of at most {target}. Given your profile, are you satisfied? "
    'Answer in JSON with "satisfied" (true or false) and "feedback": your next message '
    "to the assistant, in your own voice, saying what is missing or asking a follow-up. "
    "At turn {target} you are satisfied."
)
USER_SIM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "satisfied": {"type": "boolean"},
        "feedback": {"type": "string", "minLength": 1, "maxLength": 240},
    },
    "required": ["satisfied", "feedback"],
    "additionalProperties": False,
}


class AtlasSettings(BaseModel):
    """Knobs of PersonaAtlas; paper values where it gives one, else ours, named here."""

    model_config = ConfigDict(frozen=True)

    hub_personas: int = 2  # Persona Hub texts mapped onto the schema by the LLM
    sampled_personas: int = 4  # personas drawn from the schema alone
    observe_rate: float = 0.7  # share of dimensions a persona exposes (paper 0.7)
    min_distance: int = 3  # any two personas differ on at least this many dimensions
    min_constraints: int = 5  # hard-constraint dimensions every persona exposes (paper 5)
    min_mapped_dims: int = 2  # a Persona Hub mapping naming fewer is rejected
    map_max_tokens: int = 320
    queries_per_persona: int = 3  # seed queries, so PPOpt has history sessions
    style_rate: float = 0.5  # share of queries rewritten into the persona's style
    # Of those, this share uses only 2-4 of the observed traits; the rest use them all.
    partial_style_share: float = 0.5
    min_style_traits: int = 2
    max_style_traits: int = 4
    length_mean: float = 1.5  # restyled length bucket ~ N(mean, sd) over LENGTH_WORDS (paper)
    length_sd: float = 1.0
    # A restyled query's token budget follows its bucket up to this cap (a very_long one
    # needs about 375); lower it to trade the long buckets for speed.
    style_max_tokens: int = 384
    turns_mean: float = 3.0  # target turns ~ N(mean, sd), clipped to [min, max]
    turns_sd: float = 0.5
    min_turns: int = 2
    max_turns: int = 5
    noise_rate: float = 0.25  # probability that a user message is noised (paper 0.25)
    noise_file: str = ""  # empty = synth/personaatlas/noise.yaml
    assistants_file: str = ""  # empty = synth/personaatlas/assistants.yaml
    schema_file: str = ""  # empty = synth/personaatlas/schema.yaml
    assistant_max_tokens: int = 128
    user_max_tokens: int = 96
    # The simulator's JSON verdict: its feedback is capped at 240 characters by the schema,
    # so this budget always closes the object (a truncated one is an unparseable verdict).
    verdict_max_tokens: int = 128
    temperature: float = 0.8
    heldout_every: int = 3  # every k-th persona is held out for PPOpt evaluation (0 = none)
    seed: int = 0

    def schema(self) -> PersonaSchema:
        return load_schema(self.schema_file) if self.schema_file else load_schema()

    def noise(self):
        return load_noise(self.noise_file) if self.noise_file else load_noise()


@dataclass(frozen=True, slots=True)
class Assistant:
    name: str
    weight: float
    temperature: float
    system: str
    base_url: str = ""
    model: str = ""


def load_assistants(path: Path | str = ASSISTANTS_FILE) -> list[Assistant]:
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    entries = raw.get("assistants") if isinstance(raw, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{path.name}: assistants: needs at least one entry")
    out = []
    for name, e in entries.items():
        where = f"{path.name}: assistants.{name}"
        if (
            not isinstance(e, dict)
            or not isinstance(e.get("weight"), int | float)
            or e["weight"] <= 0
        ):
            raise ValueError(f"{where}.weight: needs a number > 0")
        if not str(e.get("system", "")).strip():
            raise ValueError(f"{where}.system: needs a system prompt")
        out.append(
            Assistant(
                str(name),
                float(e["weight"]),
                float(e.get("temperature", 0.7)),
                str(e["system"]).strip(),
                str(e.get("base_url", "")),
                str(e.get("model", "")),
            )
        )
    return out


# The paper's target lengths for a restyled query, in words.
LENGTH_WORDS = {
    "very_short": (10, 20),
    "short": (20, 40),
    "medium": (40, 80),
    "long": (80, 150),
    "very_long": (150, 250),
}


def style_budget(bucket: str, s: AtlasSettings) -> int:
    """Tokens for a restyled query: room for its bucket's upper word count (about 1.5
    tokens a word), never below `user_max_tokens`, capped at `style_max_tokens`."""
    return min(max(s.user_max_tokens, round(LENGTH_WORDS[bucket][1] * 1.5)), s.style_max_tokens)


def target_length(rng: random.Random, s: AtlasSettings) -> str:
    """A length bucket: N(length_mean, length_sd) rounded to a bucket index (paper
    N(1.5, 1.0), so short and medium are the commonest), clipped to the buckets."""
    buckets = list(LENGTH_WORDS)
    k = min(max(round(rng.gauss(s.length_mean, s.length_sd)), 0), len(buckets) - 1)
    return buckets[k]


def target_turns(rng: random.Random, s: AtlasSettings) -> int:
    return min(max(round(rng.gauss(s.turns_mean, s.turns_sd)), s.min_turns), s.max_turns)


TURN_DTYPE = pl.Struct(
    {
        "turn": pl.Int64,
        "user_clean": pl.Utf8,  # the simulator's message before the distractor
        "user_text": pl.Utf8,  # what the assistant received
        "noise_layer": pl.Utf8,  # "" = clean
        "noise_strategies": pl.List(pl.Utf8),
        "noise_error": pl.Utf8,  # the distractor failed: the clean text was sent
        "noise_intent": pl.Utf8,  # what the distractor read the message as asking ("" = clean)
        "noise_slots": pl.List(pl.Utf8),  # the details it found to target
        "assistant": pl.Utf8,
        "assistant_model": pl.Utf8,
        "satisfied": pl.Boolean,
        "feedback": pl.Utf8,
    }
)

TRAJECTORY_SCHEMA: dict[str, pl.DataType] = {
    "record_id": pl.Utf8(),
    "parent_ids": pl.List(pl.Utf8),
    "provenance": PROVENANCE_DTYPE,
    "plan_index": pl.Int64(),
    "persona_id": pl.Utf8(),
    "split": pl.Utf8(),
    "session": pl.Int64(),  # the persona's k-th conversation
    "features": pl.Utf8(),  # JSON: the full persona
    "observed": pl.Utf8(),  # JSON: its observed part
    "query_id": pl.Utf8(),  # the seed instruction's record_id
    "original_query": pl.Utf8(),
    "initial_query": pl.Utf8(),
    "styled": pl.Boolean(),
    "style_traits": pl.List(pl.Utf8),
    "style_length": pl.Utf8(),  # target length bucket of the restyled query ("" = raw)
    "target_turns": pl.Int64(),
    "num_turns": pl.Int64(),
    "turns": pl.List(TURN_DTYPE),
    "satisfaction": pl.List(pl.Boolean),
    "noised_turns": pl.Int64(),
}


@dataclass(slots=True)
class Conversation:
    index: int
    persona: dict[str, Any]
    session: int
    query: dict[str, Any]
    target: int
    style_traits: list[str]
    style_length: str = ""  # the length bucket of a restyled query ("" = not restyled)
    initial: str = ""
    turns: list[dict[str, Any]] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)  # as the assistant saw them
    next_user: str = ""
    failed: tuple[str, str] | None = None  # (reason, detail)
    cache_keys: list[str] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        """The simulated user said it was satisfied: no further turn."""
        return bool(self.turns) and self.turns[-1]["satisfied"]


def render_dialogue(messages: list[Message]) -> str:
    """The conversation as the simulated user remembers it: its own turns and the replies."""
    return "\n".join(f"{'You' if m.role == 'user' else 'Assistant'}: {m.content}" for m in messages)


async def _gather(
    batches: list[tuple[LLMClient, list[LLMRequest]]], on_done: Callable[[int], None]
):
    """Every pool entry's batch at once: entries may sit on different servers."""
    try:
        return await asyncio.gather(*(c.agenerate(reqs, on_done) for c, reqs in batches))
    finally:
        for c, _ in batches:
            await c.release_loop()


def plan_conversations(
    personas: pl.DataFrame, queries: pl.DataFrame, s: AtlasSettings
) -> list[Conversation]:
    """Per persona, `queries_per_persona` distinct seed queries, a target turn count, and
    (for a `style_rate` share) 2-4 of its observed traits to restyle the query with.
    Queries are dealt from one seeded permutation, so no two conversations share a seed
    query until every query is used (a shared one would be a duplicate to curation)."""
    if not queries.height:
        raise ValueError("personaatlas trajectories: seed_instructions is empty")
    deck = list(range(queries.height))
    random.Random(s.seed).shuffle(deck)
    per = min(s.queries_per_persona, queries.height)
    plan = []
    for pi, p in enumerate(personas.to_dicts()):
        rng = random.Random(content_id("personaatlas_plan", s.seed, p["record_id"]))
        picks = [deck[(pi * per + k) % len(deck)] for k in range(per)]
        observed = list(json.loads(p["observed"]))
        for k, qi in enumerate(picks):
            traits: list[str] = []
            if rng.random() < s.style_rate and observed:
                n = len(observed)
                if rng.random() < s.partial_style_share:
                    n = rng.randint(min(s.min_style_traits, n), min(s.max_style_traits, n))
                traits = sorted(rng.sample(observed, n))
            turns = target_turns(rng, s)
            plan.append(
                Conversation(
                    len(plan),
                    p,
                    k,
                    queries.row(qi, named=True),
                    turns,
                    traits,
                    target_length(rng, s) if traits else "",
                )
            )
    return plan


def synthesize_trajectories(
    client: LLMClient,
    personas: pl.DataFrame,
    queries: pl.DataFrame,
    s: AtlasSettings = AtlasSettings(),
    assistants: dict[str, LLMClient] | None = None,
    log: Callable[[str], None] | None = None,
    shard: tuple[int, int] | None = None,
    simulator: LLMClient | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """(trajectories, rejected, n_in). `client` (the generator role) answers as the
    assistant; `simulator` (the simulator role; `client` if None) restyles the queries and
    plays the user and the distractor. `assistants` maps pool names to clients (a name
    missing from it uses `client`). `shard` (k, n): only the conversations of the personas
    whose persona_index % n == k; plan indices stay those of the whole plan, so the shards
    of one plan concatenate into it."""
    simulator = simulator or client
    schema, layers = s.schema(), s.noise()
    pool = load_assistants(s.assistants_file or ASSISTANTS_FILE)
    assistants = assistants or {}
    convs = plan_conversations(personas, queries, s)
    if shard is not None:
        k, n = shard
        convs = [c for c in convs if c.persona["persona_index"] % n == k]

    # 1. Restyle the planned queries.
    style_params = GenerationParams(
        temperature=s.temperature, max_tokens=s.user_max_tokens, seed=s.seed, repeat_penalty=1.1
    )
    styled = [c for c in convs if c.style_traits]
    # Partial observability: every agent acts on the observed features only; the rest of
    # the drawn persona is never shown to anyone (PPOpt must infer the profile from turns).
    seen = {c.index: json.loads(c.persona["observed"]) for c in convs}
    requests = [
        STYLE_PROMPT.request(
            replace(style_params, max_tokens=style_budget(c.style_length, s)),
            traits=schema.describe({t: seen[c.index][t] for t in c.style_traits}),
            words="{}-{}".format(*LENGTH_WORDS[c.style_length]),
            query=instruction_text(c.query),
        )
        for c in styled
    ]
    for c, r in zip(
        styled,
        generate_logged(simulator, requests, "personaatlas style queries", log),
        strict=True,
    ):
        c.cache_keys += r.cache_keys
        text = clean_message(r.text) if r.ok else ""
        if not r.ok:
            c.failed = ("style_failed", f"conversation {c.index}: the LLM call failed: {r.error}")
        elif not text:
            c.failed = ("style_failed", f"conversation {c.index}: field initial_query is empty")
        c.initial = text
    for c in convs:
        if not c.style_traits:
            c.initial = instruction_text(c.query)
        c.next_user = c.initial

    # 2. Turn by turn: distractor, assistant, user simulator.
    for t in range(max((c.target for c in convs), default=0)):
        live = [c for c in convs if c.failed is None and not c.ended and t < c.target]
        if not live:
            break
        plans = {c.index: plan_noise(layers, s.noise_rate, s.seed, c.index, t) for c in live}
        noisy = [c for c in live if plans[c.index] is not None]
        distract_params = GenerationParams(
            temperature=0.9, max_tokens=s.user_max_tokens, seed=s.seed + t, repeat_penalty=1.1
        )
        intent_params = GenerationParams(temperature=0.0, max_tokens=96, seed=s.seed)
        intents = generate_logged(
            simulator,
            [intent_request(c.next_user, intent_params) for c in noisy],
            f"personaatlas distractor intents (turn {t + 1})",
            log,
        )
        # An extraction that failed or did not parse leaves the rewrite without it (the
        # noise still applies); the turn records what was extracted.
        extracted = {}
        for c, r in zip(noisy, intents, strict=True):
            c.cache_keys += r.cache_keys
            extracted[c.index] = r.parsed if r.ok else None
        noised = generate_logged(
            simulator,
            [
                distract_request(
                    c.next_user,
                    plans[c.index],
                    layers,
                    distract_params,
                    extracted[c.index],
                    schema.describe(seen[c.index]),
                )
                for c in noisy
            ],
            f"personaatlas distractor (turn {t + 1})",
            log,
        )
        sent: dict[int, tuple[str, str]] = {c.index: (c.next_user, "") for c in live}
        for c, r in zip(noisy, noised, strict=True):
            c.cache_keys += r.cache_keys
            text = clean_message(r.text) if r.ok else ""
            sent[c.index] = (text, "") if text else (c.next_user, r.error or "empty rewrite")
        # The assistant turn: one pool entry per conversation, drawn by weight (the paper
        # locks the assistant model for a whole conversation).
        picks = {
            c.index: random.Random(content_id("personaatlas_pool", s.seed, c.index)).choices(
                pool, weights=[a.weight for a in pool]
            )[0]
            for c in live
        }
        groups = [(a, [c for c in live if picks[c.index] is a]) for a in pool]
        groups = [(a, mine) for a, mine in groups if mine]
        batches = [
            (
                assistants.get(a.name, client),
                [
                    LLMRequest(
                        (
                            Message("system", a.system),
                            *c.messages,
                            Message("user", sent[c.index][0]),
                        ),
                        GenerationParams(
                            temperature=a.temperature,
                            max_tokens=s.assistant_max_tokens,
                            seed=s.seed + t,
                            repeat_penalty=1.1,
                        ),
                        None,
                        ASSISTANT_ID,
                    )
                    for c in mine
                ],
            )
            for a, mine in groups
        ]
        progress = Progress(len(live), f"personaatlas assistants (turn {t + 1})", log)
        outs = asyncio.run(_gather(batches, lambda _, p=progress: p.update()))
        progress.close()
        replies = {
            c.index: r
            for (_, mine), out in zip(groups, outs, strict=True)
            for c, r in zip(mine, out, strict=True)
        }
        for c in live:
            r = replies[c.index]
            c.cache_keys += r.cache_keys
            if not r.ok:
                c.failed = (
                    "assistant_failed",
                    f"conversation {c.index} turn {t}: the LLM call failed: {r.error}",
                )
            elif not r.text.strip():
                c.failed = (
                    "empty_assistant_turn",
                    f"conversation {c.index} turn {t}: field assistant is empty",
                )
        live = [c for c in live if c.failed is None]
        sim_params = GenerationParams(
            temperature=s.temperature, max_tokens=s.verdict_max_tokens, seed=s.seed + t
        )
        verdicts = generate_logged(
            simulator,
            [
                LLMRequest.chat(
                    USER_SIM_USER.format(
                        dialogue=render_dialogue([*c.messages, Message("user", sent[c.index][0])]),
                        reply=replies[c.index].text,
                        turn=t + 1,
                        target=c.target,
                    ),
                    USER_SIM_SYSTEM.format(profile=schema.describe(seen[c.index])),
                    sim_params,
                    USER_SIM_SCHEMA,
                    USER_SIM_ID,
                )
                for c in live
            ],
            f"personaatlas user simulator (turn {t + 1})",
            log,
        )
        for c, v in zip(live, verdicts, strict=True):
            c.cache_keys += v.cache_keys
            obj = v.parsed
            why, what = ("", "") if v.ok else structured_failure(v)
            if why:
                c.failed = (
                    f"user_sim_{why}",
                    f"conversation {c.index} turn {t}: field verdict: {what}",
                )
                continue
            text, err = sent[c.index]
            plan = plans[c.index]
            reply = replies[c.index].text
            c.turns.append(
                {
                    "turn": t,
                    "user_clean": c.next_user,
                    "user_text": text,
                    "noise_layer": plan.layer if plan and not err else "",
                    "noise_strategies": list(plan.strategies) if plan and not err else [],
                    "noise_error": err,
                    "noise_intent": (extracted.get(c.index) or {}).get("intent", ""),
                    "noise_slots": list((extracted.get(c.index) or {}).get("slots", [])),
                    "assistant": reply,
                    "assistant_model": picks[c.index].name,
                    "satisfied": bool(obj["satisfied"]),
                    "feedback": obj["feedback"].strip(),
                }
            )
            c.messages += [Message("user", text), Message("assistant", reply)]
            # A satisfied user ends the dialogue (`ended`); its feedback is never sent.
            c.next_user = obj["feedback"].strip()

    params_json = s.model_dump_json()
    thash = template_hash(
        STYLE_PROMPT.hash, INTENT_ID, DISTRACT_ID, ASSISTANT_ID, USER_SIM_SYSTEM, USER_SIM_USER
    )
    kept, rejected = [], []
    for c in convs:
        pid = c.persona["record_id"]
        cid = content_id("personaatlas_conversation", pid, c.query["record_id"], c.session, s.seed)
        if c.failed is not None:
            reason, detail = c.failed
            rejected.append(
                Rejected(
                    record_id=cid,
                    stage="trajectory",
                    reason=reason,
                    detail=detail,
                    parent_ids=[pid],
                    source="personaatlas_plan",
                    source_index=c.index,
                    payload={"query": c.initial, "turns_done": len(c.turns)},
                )
            )
            continue
        kept.append(
            {
                "record_id": cid,
                "parent_ids": [pid],
                "provenance": Provenance.of_client(
                    client,
                    also=(simulator,),
                    template_id=ASSISTANT_ID,
                    template_hash=thash,
                    params_json=params_json,
                    seed=s.seed,
                    cache_keys=c.cache_keys,
                ).as_dict(),
                "plan_index": c.index,
                "persona_id": pid,
                "split": c.persona["split"],
                "session": c.session,
                "features": c.persona["features"],
                "observed": c.persona["observed"],
                "query_id": c.query["record_id"],
                "original_query": instruction_text(c.query),
                "initial_query": c.initial,
                "styled": bool(c.style_traits),
                "style_traits": c.style_traits,
                "style_length": c.style_length,
                "target_turns": c.target,
                "num_turns": len(c.turns),
                "turns": c.turns,
                "satisfaction": [x["satisfied"] for x in c.turns],
                "noised_turns": sum(bool(x["noise_layer"]) for x in c.turns),
            }
        )
    return frame(kept, TRAJECTORY_SCHEMA), rejected_frame(rejected), len(convs)


def pool_clients(
    cache_path: str, max_concurrency: int, path: Path | str = ""
) -> dict[str, LLMClient]:
    """Clients for the pool entries that name their own server (the rest use the run's)."""
    from synth.llm import ResponseCache, make_backend

    return {
        a.name: LLMClient(
            make_backend("openai", model=a.model, base_url=a.base_url),
            ResponseCache(cache_path),
            max_concurrency,
        )
        for a in load_assistants(path or ASSISTANTS_FILE)
        if a.base_url
    }
