"""Does a rewrite still ask what the original asked? Deterministic checks, and a judge.

A rewrite must stay a request for the same thing. The checks here catch the three ways
rewrites were seen to fail, each with its own prune reason:

- `answers_instead`: the rewrite answers the request instead of asking it ("The capital of
  France is Paris."): it opens like an answer, or has no request form at all;
- `adds_facts`: it states a number the original did not contain ("... at 60 kmph"), which
  plants an answer, often a wrong one;
- `changed_request`: it flips what is asked: a negation added or dropped ("why smoking is
  not bad"), a word turned into its opposite by a prefix ("disadvantages" -> "advantages"),
  or most of the original's content words gone.

`judge_intent_requests` builds the optional LLM check (the judge role), for what words
cannot see; its prune reason is `judge_intent_changed`.
"""

from __future__ import annotations

import re

from synth.llm import GenerationParams, LLMRequest
from synth.templates import PromptTemplate

INTENT_JUDGE = PromptTemplate(
    id="ultraprompt_intent_judge",
    system="You are a strict reviewer of rewritten requests. Answer with a single word: Yes or No.",
    user=(
        "Original request:\n{original}\n\nRewritten request:\n{rewrite}\n\n"
        "Does the rewritten request ask for exactly the same thing as the original, without "
        "answering it, without adding facts or numbers, and without changing what is asked? "
        "Answer Yes or No."
    ),
)

STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "if",
        "then",
        "else",
        "of",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "from",
        "into",
        "about",
        "as",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "this",
        "that",
        "these",
        "those",
        "it",
        "its",
        "it's",
        "i",
        "you",
        "he",
        "she",
        "we",
        "they",
        "me",
        "my",
        "your",
        "our",
        "their",
        "them",
        "his",
        "her",
        "what",
        "which",
        "who",
        "whom",
        "whose",
        "when",
        "where",
        "why",
        "how",
        "can",
        "could",
        "would",
        "should",
        "will",
        "shall",
        "may",
        "might",
        "must",
        "do",
        "does",
        "did",
        "done",
        "have",
        "has",
        "had",
        "having",
        "not",
        "no",
        "nor",
        "so",
        "than",
        "too",
        "very",
        "just",
        "also",
        "please",
        "some",
        "any",
        "each",
        "every",
        "all",
        "more",
        "most",
        "other",
        "such",
        "only",
        "own",
        "same",
        "few",
        "both",
        "there",
        "here",
        "out",
        "up",
        "down",
        "over",
        "under",
        "again",
        "further",
        "once",
    ]
)
NEGATIONS = frozenset({"not", "no", "never", "without", "none", "nothing", "neither", "nor"})
NEGATIVE_PREFIXES = ("dis", "un", "non", "in", "im", "ir", "il", "anti")
REQUEST_VERBS = frozenset(
    [
        "write",
        "explain",
        "describe",
        "list",
        "give",
        "tell",
        "help",
        "create",
        "summarize",
        "summarise",
        "calculate",
        "compute",
        "solve",
        "find",
        "suggest",
        "provide",
        "compare",
        "translate",
        "classify",
        "generate",
        "make",
        "show",
        "identify",
        "determine",
        "rewrite",
        "convert",
        "answer",
        "check",
        "review",
        "fix",
        "debug",
        "consider",
        "outline",
        "draft",
        "design",
        "plan",
        "recommend",
        "analyze",
        "analyse",
        "evaluate",
        "estimate",
        "predict",
        "name",
        "define",
        "discuss",
        "propose",
        "prepare",
        "compose",
        "imagine",
        "brainstorm",
        "teach",
        "walk",
        "guide",
        "detail",
        "elaborate",
        "clarify",
        "correct",
        "improve",
        "edit",
    ]
)
REQUEST_OPENERS = (
    "please",
    "can you",
    "could you",
    "would you",
    "will you",
    "i want",
    "i need",
    "i would like",
    "i'd like",
    "help me",
    "let's",
    "your task",
)
ANSWER_OPENERS = re.compile(
    r"^\s*(the answer is|answer:|sure[,!. ]|certainly[,!. ]|of course[,!. ]|yes[,!. ]|no[,!. ]|"
    r"here(?:'s| is) (?:the |an? )?(?:answer|solution|explanation)|the (?:result|solution) is)",
    re.IGNORECASE,
)
NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
WORD = re.compile(r"[a-z][a-z'\-]+")


def _words(text: str) -> list[str]:
    return WORD.findall(text.casefold())


def _content(text: str) -> set[str]:
    """The words that say what is asked about: not stopwords, not the asking verbs."""
    return {
        w for w in _words(text) if len(w) >= 3 and w not in STOPWORDS and w not in REQUEST_VERBS
    }


def _stem(word: str) -> str:
    return word[:5]


def _numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in NUMBER.findall(text)}


def is_request(text: str) -> bool:
    """A question, or a sentence that asks for something (a request verb or opener)."""
    low = text.casefold()
    if "?" in text or any(low.lstrip().startswith(o) or f" {o} " in low for o in REQUEST_OPENERS):
        return True
    sentences = [s.strip() for s in re.split(r"(?<=[.!:;\n])\s+", low) if s.strip()]
    return any((first := _words(s)[:1]) and first[0] in REQUEST_VERBS for s in sentences) or bool(
        set(_words(low)) & REQUEST_VERBS
    )


def prefix_flips(original: str, rewrite: str) -> list[tuple[str, str]]:
    """(original word, rewrite word) pairs where one is the other with a negative prefix
    ("unhealthy" -> "healthy", "advantages" -> "disadvantages"), the original word gone."""
    ow, rw = set(_words(original)), set(_words(rewrite))
    flips = []
    for a, b in ((ow, rw), (rw, ow)):
        for w in a:
            for p in NEGATIVE_PREFIXES:
                if w.startswith(p) and len(w) - len(p) >= 4 and w[len(p) :] in b:
                    pair = (w, w[len(p) :]) if a is ow else (w[len(p) :], w)
                    if pair[0] not in rw:
                        flips.append(pair)
    return sorted(set(flips))


def intent_problem(original: str, rewrite: str, min_coverage: float = 0.5) -> str:
    """The prune reason when `rewrite` no longer asks what `original` asks, else ''."""
    if ANSWER_OPENERS.match(rewrite) or not is_request(rewrite):
        return "answers_instead"
    if _numbers(rewrite) - _numbers(original):
        return "adds_facts"
    negated_before, negated_after = _negated(original), _negated(rewrite)
    if negated_before and not negated_after:  # the original's negation is gone
        return "changed_request"
    if not negated_before and _negates_content(original, rewrite):  # "is not bad"
        return "changed_request"
    if prefix_flips(original, rewrite):
        return "changed_request"
    words = _content(original)
    if words:
        stems = {_stem(w) for w in _content(rewrite)}
        covered = sum(_stem(w) in stems for w in words) / len(words)
        if covered < min_coverage:
            return "changed_request"
    return ""


def _is_negation(word: str) -> bool:
    return word in NEGATIONS or word.endswith("n't")


def _negated(text: str) -> bool:
    return any(_is_negation(w) for w in _words(text))


def _negates_content(original: str, rewrite: str) -> bool:
    """A negation in the rewrite that stands right before a word of the original's ask
    ("is not bad"), rather than in an instruction the rewrite added ("do not skip steps")."""
    content = {_stem(w) for w in _content(original)} | set(_words(original))
    toks = _words(rewrite)
    for i, w in enumerate(toks):
        if _is_negation(w):
            nxt = [t for t in toks[i + 1 : i + 3] if t not in STOPWORDS]
            if nxt and (nxt[0] in content or _stem(nxt[0]) in content):
                return True
    return False


def judge_intent_requests(pairs: list[tuple[str, str]]) -> list[LLMRequest]:
    params = GenerationParams(temperature=0.0, max_tokens=4)
    return [INTENT_JUDGE.request(params, original=o, rewrite=r) for o, r in pairs]
