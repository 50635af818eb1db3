"""Nothing lost: every input record is kept or rejected, exactly once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Accounting:
    n_in: int
    n_kept: int
    n_rejected: int
    missing: list = field(default_factory=list)  # inputs neither kept nor rejected
    duplicated: list = field(default_factory=list)  # inputs accounted for more than once
    unexpected: list = field(default_factory=list)  # outputs whose parent is not an input

    @property
    def ok(self) -> bool:
        return (
            self.n_in == self.n_kept + self.n_rejected
            and not self.missing
            and not self.duplicated
            and not self.unexpected
        )

    def metadata(self) -> dict:
        return {
            "rows_in": self.n_in,
            "kept": self.n_kept,
            "rejected": self.n_rejected,
            "missing": len(self.missing),
            "duplicated": len(self.duplicated),
            "unexpected": len(self.unexpected),
            "examples": [str(x) for x in (self.missing + self.duplicated + self.unexpected)[:10]],
        }


def account(inputs: Iterable, kept_parents: Iterable, rejected_parents: Iterable) -> Accounting:
    """Match output parents (source index or parent record id) against the inputs."""
    inputs = list(inputs)
    kept, rejected = list(kept_parents), list(rejected_parents)
    seen = Counter(kept) + Counter(rejected)
    wanted = set(inputs)
    return Accounting(
        n_in=len(inputs),
        n_kept=len(kept),
        n_rejected=len(rejected),
        missing=[x for x in inputs if x not in seen],
        duplicated=[x for x, n in seen.items() if n > 1],
        unexpected=[x for x in seen if x not in wanted],
    )
