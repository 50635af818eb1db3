"""The PersonaKnob dimensions, triggers and rubric, read from a YAML file users can edit."""

from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

SPEC_FILE = Path(__file__).parent / "dimensions.yaml"
# Canonical order: a mask is written as a string in this order ("AT", "ATEC").
DIMENSIONS = ("A", "T", "E", "C")


@dataclass(frozen=True, slots=True)
class Dimension:
    key: str
    name: str
    satisfy: str
    fail: str
    verify: str
    criteria: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Trigger:
    name: str
    situation: str
    tests: tuple[str, ...]
    sycophancy_probe: bool


@dataclass(frozen=True, slots=True)
class KnobSpec:
    dimensions: dict[str, Dimension]
    triggers: dict[str, Trigger]
    sycophancy: str
    judges: dict[str, str]  # name -> system prompt of one IRT rater

    def triggers_for(self, mask: str) -> list[str]:
        """Triggers that probe at least one active dimension, in file order."""
        return [t.name for t in self.triggers.values() if set(t.tests) & set(mask)]

    def cover(self, mask: str, rng: random.Random) -> list[str]:
        """A seeded smallest-first set of triggers that together probe every active
        dimension: greedily the trigger adding the most uncovered ones, ties drawn."""
        left, chosen = set(mask), []
        while left:
            gain = {n: len(set(t.tests) & left) for n, t in self.triggers.items()}
            best = max(gain.values())
            if not best:
                raise SpecFileError(f"no trigger tests dimension(s) {''.join(sorted(left))}")
            name = rng.choice([n for n, g in gain.items() if g == best])
            chosen.append(name)
            left -= set(self.triggers[name].tests)
        return chosen


class SpecFileError(ValueError):
    pass


def _text(entry: dict, field: str, where: str) -> str:
    value = entry.get(field)
    if not isinstance(value, str) or not value.strip():
        raise SpecFileError(f"{where}: needs a non-empty text field {field!r}")
    return value.strip()


@functools.cache
def load_spec(path: Path = SPEC_FILE) -> KnobSpec:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    dims: dict[str, Dimension] = {}
    for key, entry in (raw.get("dimensions") or {}).items():
        where = f"{path}: dimensions.{key}"
        if key not in DIMENSIONS:
            raise SpecFileError(f"{where}: unknown dimension (one of {', '.join(DIMENSIONS)})")
        if not isinstance(entry, dict):
            raise SpecFileError(f"{where}: must be a mapping")
        criteria = entry.get("criteria") or []
        if len(criteria) < 2 or not all(isinstance(c, str) and c.strip() for c in criteria):
            # One criterion per dimension cannot be told apart from the model's ability.
            raise SpecFileError(f"{where}.criteria: needs at least 2 rubric questions")
        dims[key] = Dimension(
            key,
            _text(entry, "name", where),
            _text(entry, "satisfy", where),
            _text(entry, "fail", where),
            _text(entry, "verify", where),
            tuple(c.strip() for c in criteria),
        )
    if missing := [d for d in DIMENSIONS if d not in dims]:
        raise SpecFileError(f"{path}: dimensions {', '.join(missing)} are missing")
    triggers: dict[str, Trigger] = {}
    for name, entry in (raw.get("triggers") or {}).items():
        where = f"{path}: triggers.{name}"
        if not isinstance(entry, dict):
            raise SpecFileError(f"{where}: must be a mapping")
        tests = tuple(entry.get("tests") or [])
        if not tests or any(t not in DIMENSIONS for t in tests):
            raise SpecFileError(f"{where}.tests: a non-empty list of {', '.join(DIMENSIONS)}")
        triggers[name] = Trigger(
            name, _text(entry, "situation", where), tests, bool(entry.get("sycophancy_probe"))
        )
    for mask in all_masks():
        if not any(set(t.tests) & set(mask) for t in triggers.values()):
            raise SpecFileError(f"{path}: no trigger tests any dimension of mask {mask!r}")
    judges = raw.get("judges") or {}
    if len(judges) < 2 or not all(isinstance(v, str) and v.strip() for v in judges.values()):
        # A severity is relative to the other raters: one rater has nothing to be compared with.
        raise SpecFileError(f"{path}: judges needs at least 2 named system prompts")
    sycophancy = _text(raw, "sycophancy", str(path))
    return KnobSpec(dims, triggers, sycophancy, {k: v.strip() for k, v in judges.items()})


def all_masks() -> list[str]:
    """The 15 non-empty subsets of A/T/E/C, as canonical strings."""
    return ["".join(c) for k in range(1, 5) for c in itertools.combinations(DIMENSIONS, k)]


def canonical_mask(mask: str) -> str:
    """'ta' -> 'AT'; raises naming the mask when it is empty or has an unknown letter."""
    letters = set(mask.upper())
    if not letters or letters - set(DIMENSIONS):
        raise ValueError(f"mask {mask!r}: a non-empty subset of {''.join(DIMENSIONS)}")
    return "".join(d for d in DIMENSIONS if d in letters)
