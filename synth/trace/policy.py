"""A written policy the judge checks responses against, read from YAML and versioned by content."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SHIPPED_POLICIES = Path(__file__).parent / "policies"
EVAL_PROMPTS = Path(__file__).parent / "eval_prompts.jsonl"  # held-out prompts for policy agreement
GENERAL = "general"


class PolicyError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Category:
    id: str
    name: str
    tier: int
    description: str
    keywords: tuple[str, ...] = ()
    zero_tolerance: bool = False  # no exception ever applies


@dataclass(frozen=True, slots=True)
class Tier:
    level: int
    name: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class PolicyException:
    id: str
    text: str
    applies_to: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    version: str  # sha256 of the file's bytes, first 12 hex: a changed file is a new version
    title: str
    description: str
    categories: tuple[Category, ...]
    exceptions: tuple[PolicyException, ...] = ()
    requirements: tuple[tuple[str, str], ...] = field(default=())
    source: str = ""
    tiers: tuple[Tier, ...] = ()

    def category(self, category_id: str) -> Category | None:
        return next((c for c in self.categories if c.id == category_id), None)

    def match_category(self, text: str) -> str:
        """The category whose keywords the text mentions most (ties: lower tier first), or `general`.

        A keyword match is a cheap, transparent routing choice; the judge still sees the
        whole policy, the category only tells it where to look first.
        """
        lowered = text.lower()
        best, best_hits = GENERAL, 0
        for c in sorted(self.categories, key=lambda c: c.tier):
            # a word-start match, so "chemical" also finds "chemicals"
            hits = sum(len(re.findall(r"\b" + re.escape(k.lower()), lowered)) for k in c.keywords)
            if hits > best_hits:
                best, best_hits = c.id, hits
        return best

    def render(self) -> str:
        """The whole policy as a judge reads it: every tier, category, exception and rule.

        It is the same text for every item, so it goes first in the judge's prompt and a
        server with prefix caching (vLLM, llama.cpp) reuses it across requests."""
        tier_names = {t.level: t for t in self.tiers}
        lines = [f"{self.title} (version {self.version})", self.description.strip(), ""]
        lines.append("Harm categories, by tier (tier 1 is the most severe):")
        for level in sorted({c.tier for c in self.categories}):
            t = tier_names.get(level)
            head = f"Tier {level}" + (f" ({t.name})" if t else "")
            lines.append(head + (f": {t.description.strip()}" if t and t.description else ""))
            for c in (c for c in self.categories if c.tier == level):
                zt = " Zero tolerance: no exception applies." if c.zero_tolerance else ""
                lines.append(f"- [{c.id}] {c.name}: {c.description.strip()}{zt}")
        if self.exceptions:
            lines += ["", "Exceptions (context that changes the verdict):"]
            for ex in self.exceptions:
                scope = f" (applies to {', '.join(ex.applies_to)})" if ex.applies_to else ""
                lines.append(f"- [{ex.id}]{scope}: {ex.text.strip()}")
        lines += ["", "Rules:"]
        lines += [f"- [{rid}] {text.strip()}" for rid, text in self.requirements]
        return "\n".join(lines)

    def category_hint(self, category_id: str) -> str:
        """A one-line pointer to the category a cheap keyword match suggests."""
        cat = self.category(category_id)
        if cat is None:
            return "none of the harm categories matched by keyword"
        return f"[{cat.id}] {cat.name} (tier {cat.tier})"


def _require(d: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in d:
        raise PolicyError(f"{where}: field '{key}' is missing")
    if not isinstance(d[key], kind):
        raise PolicyError(
            f"{where}: field '{key}' should be {kind.__name__}, got {type(d[key]).__name__}"
        )
    return d[key]


def read_policy_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise PolicyError(f"{path}: cannot read policy file ({e.strerror})") from None


def load_policy(path: str | Path) -> Policy:
    return parse_policy(read_policy_bytes(path), path)


def parse_policy(raw_bytes: bytes, path: str | Path) -> Policy:
    """A policy from its file's bytes (the version is their hash); `path` names it in errors."""
    path = Path(path)
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if path.suffix == ".md":  # Markdown with YAML front matter
        m = re.match(r"^---\n(.*?)\n---\n?(.*)$", text, re.DOTALL)
        if not m:
            raise PolicyError(
                f"{path}: a Markdown policy needs YAML front matter between '---' lines"
            )
        text = m.group(1)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())  # one line: the CLI prints errors on one line
        raise PolicyError(f"{path}: invalid YAML: {first}") from None
    if not isinstance(doc, dict):
        raise PolicyError(f"{path}: a policy must be a mapping")
    where = str(path)
    cats = []
    categories = _require(doc, "categories", list, where)
    if not categories:
        raise PolicyError(f"{where}: field 'categories' is empty: a policy needs at least one")
    for i, c in enumerate(categories):
        w = f"{where} categories[{i}]"
        _mapping(c, w)
        cats.append(
            Category(
                id=_require(c, "id", str, w),
                name=_require(c, "name", str, w),
                tier=_require(c, "tier", int, w),
                description=_require(c, "description", str, w),
                keywords=tuple(str(k) for k in c.get("keywords") or ()),
                zero_tolerance=bool(c.get("zero_tolerance", False)),
            )
        )
    ids = [c.id for c in cats]
    if len(set(ids)) != len(ids):
        raise PolicyError(f"{where}: category ids repeat: {ids}")
    tiers = []
    for i, t in enumerate(doc.get("tiers") or []):
        w = f"{where} tiers[{i}]"
        _mapping(t, w)
        tiers.append(
            Tier(
                _require(t, "level", int, w), _require(t, "name", str, w), t.get("description", "")
            )
        )
    excs = []
    for i, e in enumerate(doc.get("exceptions") or []):
        w = f"{where} exceptions[{i}]"
        _mapping(e, w)
        applies = tuple(e.get("applies_to") or ())
        unknown = set(applies) - set(ids)
        if unknown:
            raise PolicyError(f"{w}: field 'applies_to' names unknown categories {sorted(unknown)}")
        excs.append(
            PolicyException(_require(e, "id", str, w), _require(e, "text", str, w), applies)
        )
    reqs = []
    for i, r in enumerate(_require(doc, "requirements", list, where)):
        w = f"{where} requirements[{i}]"
        _mapping(r, w)
        reqs.append((_require(r, "id", str, w), _require(r, "text", str, w)))
    return Policy(
        name=_require(doc, "name", str, where),
        version=hashlib.sha256(raw_bytes).hexdigest()[:12],
        title=_require(doc, "title", str, where),
        description=_require(doc, "description", str, where),
        categories=tuple(cats),
        exceptions=tuple(excs),
        requirements=tuple(reqs),
        source=str(path),
        tiers=tuple(tiers),
    )


def _mapping(item: Any, where: str) -> None:
    if not isinstance(item, dict):
        raise PolicyError(
            f"{where}: should be a mapping with id and text fields, got {type(item).__name__} {str(item)[:40]!r}"
        )
