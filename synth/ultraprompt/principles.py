"""The rewriting principles, read from a YAML file users can edit."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).parent
PRINCIPLES_FILE = HERE / "principles.yaml"
CATEGORIES = ("helpfulness", "harmlessness", "honesty", "coding", "math")
# Every seed may use this group, plus its own category's.
SHARED_GROUP = "helpfulness"


@dataclass(frozen=True, slots=True)
class Principle:
    name: str
    category: str
    how: str


class PrincipleFileError(ValueError):
    pass


@functools.cache
def load_principles(path: Path = PRINCIPLES_FILE) -> dict[str, Principle]:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    out: dict[str, Principle] = {}
    for category, items in raw.items():
        if category not in CATEGORIES:
            raise PrincipleFileError(f"{path}: unknown category {category!r} (one of {CATEGORIES})")
        for i, item in enumerate(items or []):
            where = f"{path}: {category}[{i}]"
            if not isinstance(item, dict) or not item.get("name") or not item.get("how"):
                raise PrincipleFileError(f"{where}: needs fields 'name' and 'how'")
            if item["name"] in out:
                raise PrincipleFileError(f"{where}: principle {item['name']!r} defined twice")
            out[item["name"]] = Principle(item["name"], category, str(item["how"]).strip())
    if not any(p.category == SHARED_GROUP for p in out.values()):
        raise PrincipleFileError(f"{path}: the {SHARED_GROUP!r} group is empty")
    return out


def allowed_principles(
    category: str, principles: dict[str, Principle] | None = None
) -> tuple[str, ...]:
    """The principles a seed of `category` may apply: helpfulness plus its own group."""
    principles = principles if principles is not None else load_principles()
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r} (one of {CATEGORIES})")
    return tuple(name for name, p in principles.items() if p.category in (SHARED_GROUP, category))
