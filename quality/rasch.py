"""A many-facet Rasch model (dichotomous) for judge ratings, fitted by maximum likelihood.

    logit P(rating = 1) = ability[model, dimension] - severity[judge]
                          - difficulty[criterion] - difficulty[item]

Identification: judge severities sum to zero, criterion difficulties sum to zero within
each dimension (which is what separates a dimension's criteria from the model's ability
on it), and item difficulties sum to zero. Standard errors come from the inverse of the
observed information (the Hessian of the negative log-likelihood) at the optimum.

No maintained Python package fits facet models (the field uses FACETS or R's TAM), so
this is written out in torch: autograd gives the gradient and the Hessian.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

RATING_COLUMNS = ("model", "dimension", "criterion", "judge", "item", "rating")


@dataclass(slots=True)
class RaschFit:
    abilities: pl.DataFrame  # model, dimension, estimate, se
    severities: pl.DataFrame  # judge, estimate, se
    criteria: pl.DataFrame  # criterion, dimension, estimate, se
    items: pl.DataFrame  # item, estimate, se
    n_ratings: int
    log_likelihood: float
    converged: bool


def _sum_to_zero(n: int, groups: list[list[int]]) -> np.ndarray:
    """Map from free parameters to n values that sum to zero within each group: the last
    member of a group is minus the sum of the others."""
    free = [i for g in groups for i in g[:-1]]
    a = np.zeros((n, len(free)))
    col = {i: c for c, i in enumerate(free)}
    for g in groups:
        for i in g[:-1]:
            a[i, col[i]] = 1.0
        if len(g) > 1:
            a[g[-1], [col[i] for i in g[:-1]]] = -1.0
    return a


def fit_rasch(ratings: pl.DataFrame, ridge: float = 1e-3, max_iter: int = 200) -> RaschFit:
    """Fit the model to ratings (columns RATING_COLUMNS; rating 0/1). `ridge` is a small
    L2 penalty that keeps perfectly separated facets finite; it shrinks toward zero."""
    import torch  # here, not at import: the CLI and the code location load this module

    if missing := [c for c in RATING_COLUMNS if c not in ratings.columns]:
        raise ValueError(f"ratings: missing column(s) {', '.join(missing)}")
    if not ratings.height:
        raise ValueError("ratings: no rows to fit")
    bad = ratings.filter(~pl.col("rating").is_in([0, 1]))
    if bad.height:
        raise ValueError(f"ratings: row with rating {bad['rating'][0]!r} (must be 0 or 1)")
    pairs = sorted(set(zip(ratings["model"], ratings["dimension"], strict=True)))
    judges = sorted(set(ratings["judge"]))
    crit = sorted(set(zip(ratings["dimension"], ratings["criterion"], strict=True)))
    items = sorted(set(ratings["item"]))
    ia = {p: i for i, p in enumerate(pairs)}
    ij = {j: i for i, j in enumerate(judges)}
    ic = {c: i for i, c in enumerate(crit)}
    ii = {x: i for i, x in enumerate(items)}
    rows = ratings.select(RATING_COLUMNS).rows()
    idx = torch.tensor([(ia[(m, d)], ij[j], ic[(d, c)], ii[x]) for m, d, c, j, x, _ in rows])
    y = torch.tensor([float(r[-1]) for r in rows], dtype=torch.float64)
    by_dim: dict[str, list[int]] = {}
    for (d, _), i in ic.items():
        by_dim.setdefault(d, []).append(i)
    maps = [
        np.eye(len(pairs)),
        _sum_to_zero(len(judges), [list(range(len(judges)))]),
        _sum_to_zero(len(crit), list(by_dim.values())),
        _sum_to_zero(len(items), [list(range(len(items)))]),
    ]
    widths = [m.shape[1] for m in maps]
    full = torch.tensor(
        np.block(
            [
                [
                    np.zeros((m.shape[0], sum(widths[:k]))),
                    m,
                    np.zeros((m.shape[0], sum(widths[k + 1 :]))),
                ]
                for k, m in enumerate(maps)
            ]
        )
    )
    sizes = [m.shape[0] for m in maps]
    offsets = np.cumsum([0, *sizes])

    def nll(free: torch.Tensor) -> torch.Tensor:
        p = full @ free
        a, s, c, b = (p[offsets[k] : offsets[k + 1]] for k in range(4))
        logit = a[idx[:, 0]] - s[idx[:, 1]] - c[idx[:, 2]] - b[idx[:, 3]]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="sum")
        return loss + ridge * (free**2).sum()

    free = torch.zeros(full.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [free], max_iter=max_iter, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nll(free)
        loss.backward()
        return loss

    opt.step(closure)
    est = free.detach()
    hess = torch.autograd.functional.hessian(nll, est)
    cov_free = torch.linalg.pinv(hess)
    values = (full @ est).numpy()
    se = np.sqrt(np.clip(np.diag((full @ cov_free @ full.T).numpy()), 0, None))
    g = torch.func.grad(nll)(est)
    converged = bool(torch.linalg.vector_norm(g) < 1e-3 * max(1, len(rows)) ** 0.5)
    loglik = -float(nll(est)) + ridge * float((est**2).sum())

    def part(k: int) -> tuple[np.ndarray, np.ndarray]:
        return values[offsets[k] : offsets[k + 1]], se[offsets[k] : offsets[k + 1]]

    (av, ase), (sv, sse), (cv, cse), (bv, bse) = (part(k) for k in range(4))
    return RaschFit(
        pl.DataFrame(
            {
                "model": [m for m, _ in pairs],
                "dimension": [d for _, d in pairs],
                "estimate": av,
                "se": ase,
            }
        ),
        pl.DataFrame({"judge": judges, "estimate": sv, "se": sse}),
        pl.DataFrame(
            {
                "criterion": [c for _, c in crit],
                "dimension": [d for d, _ in crit],
                "estimate": cv,
                "se": cse,
            }
        ),
        pl.DataFrame({"item": [str(x) for x in items], "estimate": bv, "se": bse}),
        len(rows),
        loglik,
        converged,
    )


def simulate_ratings(
    models: int = 2,
    dimensions: tuple[str, ...] = ("A", "T", "E", "C"),
    criteria_per_dimension: int = 2,
    judges: int = 3,
    items: int = 100,
    seed: int = 0,
) -> tuple[pl.DataFrame, dict[str, pl.DataFrame]]:
    """Ratings drawn from known parameters (all facets fully crossed), and those parameters
    in the fitter's identification, for parameter-recovery tests."""
    rng = np.random.default_rng(seed)
    ability = rng.normal(0, 1, (models, len(dimensions)))
    severity = rng.normal(0, 0.7, judges)
    severity -= severity.mean()
    crit = rng.normal(0, 0.7, (len(dimensions), criteria_per_dimension))
    crit -= crit.mean(axis=1, keepdims=True)
    item = rng.normal(0, 1, items)
    item -= item.mean()
    rows = []
    for m in range(models):
        for di, d in enumerate(dimensions):
            for k in range(criteria_per_dimension):
                for j in range(judges):
                    logit = ability[m, di] - severity[j] - crit[di, k] - item
                    p = 1 / (1 + np.exp(-logit))
                    ys = rng.random(items) < p
                    rows += [
                        (f"m{m}", d, f"{d}{k}", f"j{j}", f"i{x:04d}", int(ys[x]))
                        for x in range(items)
                    ]
    ratings = pl.DataFrame(rows, schema=list(RATING_COLUMNS), orient="row")
    truth = {
        "abilities": pl.DataFrame(
            {
                "model": [f"m{m}" for m in range(models) for _ in dimensions],
                "dimension": [d for _ in range(models) for d in dimensions],
                "true": ability.ravel(),
            }
        ),
        "severities": pl.DataFrame({"judge": [f"j{j}" for j in range(judges)], "true": severity}),
        "criteria": pl.DataFrame(
            {
                "criterion": [f"{d}{k}" for d in dimensions for k in range(criteria_per_dimension)],
                "true": crit.ravel(),
            }
        ),
        "items": pl.DataFrame({"item": [f"i{x:04d}" for x in range(items)], "true": item}),
    }
    return ratings, truth


def wald_z(a: float, se_a: float, b: float, se_b: float) -> float:
    """z of a difference between two estimates treated as independent."""
    return (a - b) / math.sqrt(se_a**2 + se_b**2) if se_a or se_b else math.inf


def ability_gaps(
    abilities: pl.DataFrame, upper: str = "trained", lower: str = "base", z: float = 1.96
) -> list[dict]:
    """Per dimension, `upper`'s ability minus `lower`'s, the difference's standard error
    and Wald z, and `resolved`: whether the 95% interval of the difference excludes 0, that
    is whether the rating design had enough items and judges to show that difference."""
    est = {(r["model"], r["dimension"]): (r["estimate"], r["se"]) for r in abilities.to_dicts()}
    out = []
    for dim in sorted({d for _, d in est}):
        if (upper, dim) not in est or (lower, dim) not in est:
            continue
        (a, sa), (b, sb) = est[(upper, dim)], est[(lower, dim)]
        w = wald_z(a, sa, b, sb)
        out.append(
            {
                "dimension": dim,
                "difference": round(a - b, 4),
                "se": round(math.sqrt(sa**2 + sb**2), 4),
                "z": round(w, 3),
                "resolved": abs(w) >= z,
            }
        )
    return out
