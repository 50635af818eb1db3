"""PersonaAtlas personas: a schema of categorical preference dimensions, seeded sampling
with partial observability and a distinctness rule, and Persona Hub text mapped onto the
schema by the LLM (a mapping that does not parse is rejected with the reason).

    python -m synth.personaatlas.personas --check synth/personaatlas/schema.yaml
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from synth.llm import GenerationParams, LLMClient, structured_failure
from synth.progress import generate_logged
from synth.records import (
    PROVENANCE_DTYPE,
    Provenance,
    Rejected,
    content_id,
    frame,
    rejected_frame,
)
from synth.templates import PromptTemplate

SCHEMA_FILE = Path(__file__).with_name("schema.yaml")


class SchemaFileError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Dimension:
    name: str
    constraint: bool  # a hard constraint, else a soft preference
    describe: str
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PersonaSchema:
    dimensions: dict[str, Dimension]

    @property
    def constraints(self) -> list[str]:
        return [d for d, dim in self.dimensions.items() if dim.constraint]

    def describe(self, features: dict[str, str]) -> str:
        """One line per feature, in schema order: what the user simulator and judges read."""
        return "\n".join(
            f"- {self.dimensions[d].describe} ({d}): {features[d]}"
            + (" [hard constraint]" if self.dimensions[d].constraint else "")
            for d in self.dimensions
            if d in features
        )


def load_schema(path: Path | str = SCHEMA_FILE) -> PersonaSchema:
    """The schema file, validated; a bad entry is named (`file: dimensions.X.values: ...`)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SchemaFileError(f"{path}: not valid YAML: {e}") from None
    dims = raw.get("dimensions") if isinstance(raw, dict) else None
    if not isinstance(dims, dict) or not dims:
        raise SchemaFileError(f"{path}: dimensions: needs a mapping of dimension names")
    out: dict[str, Dimension] = {}
    for name, d in dims.items():
        where = f"{path.name}: dimensions.{name}"
        if not isinstance(d, dict):
            raise SchemaFileError(f"{where}: needs constraint, describe and values")
        values = d.get("values")
        if not isinstance(values, list) or len(values) < 2:
            raise SchemaFileError(f"{where}.values: needs a list of at least 2 values")
        if len(set(map(str, values))) != len(values):
            raise SchemaFileError(f"{where}.values: repeats a value")
        if not isinstance(d.get("constraint"), bool):
            raise SchemaFileError(f"{where}.constraint: needs true or false")
        if not isinstance(d.get("describe"), str) or not d["describe"].strip():
            raise SchemaFileError(f"{where}.describe: needs a short description")
        out[str(name)] = Dimension(
            str(name), d["constraint"], d["describe"].strip(), tuple(map(str, values))
        )
    return PersonaSchema(out)


def hamming(a: dict[str, str], b: dict[str, str]) -> int:
    """Dimensions on which two personas differ; a dimension one exposes and the other does
    not counts as a difference (the paper's distance between partially observed personas)."""
    return sum(a.get(k) != b.get(k) for k in set(a) | set(b))


def observe(
    features: dict[str, str],
    schema: PersonaSchema,
    rate: float,
    min_constraints: int,
    rng: random.Random,
    keep: tuple[str, ...] = (),
) -> dict[str, str]:
    """The observed part of a persona: each dimension kept with probability `rate`, topped
    up with constraint dimensions until `min_constraints` are observed."""
    kept = {d for d in features if d in keep or rng.random() < rate}
    missing = [d for d in schema.constraints if d in features and d not in kept]
    rng.shuffle(missing)
    short = min_constraints - sum(d in kept for d in schema.constraints)
    kept.update(missing[: max(short, 0)])
    return {d: features[d] for d in schema.dimensions if d in kept}


def sample_personas(
    schema: PersonaSchema,
    n: int,
    rate: float = 0.7,
    min_distance: int = 3,
    min_constraints: int = 5,
    seed: int = 0,
    max_tries: int = 50,
    existing: list[dict[str, str]] | None = None,
) -> list[tuple[dict[str, str], dict[str, str]]]:
    """n (full, observed) personas; every observed persona differs from every other (and
    from the observed personas in `existing`) on at least `min_distance` dimensions.
    Raises, naming the setting, when the schema cannot give that many distinct personas in
    `max_tries` draws each."""
    if len(schema.constraints) < min_constraints:
        raise ValueError(
            f"min_constraints={min_constraints} but the schema has only {len(schema.constraints)} constraint dimensions"
        )
    rng = random.Random(seed)
    taken = list(existing or [])
    out = []
    for i in range(n):
        for _ in range(max_tries):
            full = {d: rng.choice(dim.values) for d, dim in schema.dimensions.items()}
            seen = observe(full, schema, rate, min_constraints, rng)
            if all(hamming(seen, t) >= min_distance for t in taken):
                break
        else:
            raise ValueError(
                f"persona {i}: no draw in {max_tries} tries differs from all others on {min_distance} dimensions (setting min_distance)"
            )
        taken.append(seen)
        out.append((full, seen))
    return out


# ---- Persona Hub text mapped onto the schema -------------------------------------------

MAP_PROMPT = PromptTemplate(
    id="personaatlas_map",
    user=(
        "Here is a person: {persona}\n\n"
        "Fill in a profile of this person as JSON. Use only these fields and these values, "
        "and leave out any field the description gives no hint about:\n{fields}"
    ),
)


def mapping_schema(schema: PersonaSchema) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            d: {"type": "string", "enum": list(dim.values)} for d, dim in schema.dimensions.items()
        },
        "additionalProperties": False,
    }


PERSONA_SCHEMA: dict[str, pl.DataType] = {
    "record_id": pl.Utf8(),
    "parent_ids": pl.List(pl.Utf8),
    "provenance": PROVENANCE_DTYPE,
    "source": pl.Utf8(),  # sampled | persona_hub
    "persona_index": pl.Int64(),
    "split": pl.Utf8(),  # train | heldout (PPOpt evaluation personas)
    "description": pl.Utf8(),  # the Persona Hub text; empty for sampled personas
    "features": pl.Utf8(),  # JSON: every dimension drawn (the unobserved ones reach no agent)
    "observed": pl.Utf8(),  # JSON: the persona every agent acts on
    "observed_dims": pl.Int64(),
    "observed_constraints": pl.Int64(),
}


def build_personas(
    client: LLMClient,
    hub: pl.DataFrame,
    schema: PersonaSchema,
    settings: Any,
    log: Callable[[str], None] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """(personas, rejected, n_in): `settings.hub_personas` Persona Hub texts mapped by the
    LLM (the mapped dimensions are observed; the rest of the hidden persona is sampled),
    then `settings.sampled_personas` drawn from the schema alone."""
    rng = random.Random(settings.seed)
    hub_rows = hub.head(settings.hub_personas).to_dicts()
    fields = "\n".join(f"{d}: {', '.join(dim.values)}" for d, dim in schema.dimensions.items())
    params = GenerationParams(
        temperature=0.0, max_tokens=settings.map_max_tokens, seed=settings.seed
    )
    json_schema = mapping_schema(schema)
    requests = [
        MAP_PROMPT.request(params, json_schema, persona=r["persona"], fields=fields)
        for r in hub_rows
    ]
    responses = generate_logged(client, requests, "personaatlas map personas", log)
    kept: list[dict[str, Any]] = []
    rejected: list[Rejected] = []
    taken: list[dict[str, str]] = []

    params_json = settings.model_dump_json()
    mapped = Provenance.of_client(
        client,
        MAP_PROMPT.id,
        template_hash=MAP_PROMPT.hash,
        params_json=params_json,
        seed=settings.seed,
    )
    # Sampled personas come from the schema and the seed alone, no LLM.
    sampled_by = Provenance("schema_sampler", params_json=params_json, seed=settings.seed).as_dict()

    k = settings.heldout_every

    def add(source, index, description, full, observed, parents, prov):
        taken.append(observed)
        kept.append(
            {
                "record_id": content_id(
                    "personaatlas_persona", source, json.dumps(full, sort_keys=True)
                ),
                "parent_ids": parents,
                "provenance": prov,
                "source": source,
                "persona_index": index,
                "split": "heldout" if k and index % k == k - 1 else "train",
                "description": description,
                "features": json.dumps(full),
                "observed": json.dumps(observed),
                "observed_dims": len(observed),
                "observed_constraints": sum(d in observed for d in schema.constraints),
            }
        )

    for i, (row, resp) in enumerate(zip(hub_rows, responses, strict=True)):
        where = f"persona_hub record {row['record_id']}"
        obj, reason, detail = resp.parsed, "", ""
        if not resp.ok:
            kind, what = structured_failure(resp)
            reason, detail = f"mapping_{kind}", f"{where}: field mapping: {what}"
        elif len(obj) < settings.min_mapped_dims:
            reason = "mapping_too_sparse"
            detail = f"{where}: field mapping names {len(obj)} dimensions (min {settings.min_mapped_dims})"
        full: dict[str, str] = {}
        if not reason:
            full = {d: obj.get(d) or rng.choice(dim.values) for d, dim in schema.dimensions.items()}
            # The mapped dimensions are what the text shows; constraints are topped up
            # from the sampled rest so every persona has its minimum of hard constraints.
            observed = observe(full, schema, 0.0, settings.min_constraints, rng, keep=tuple(obj))
            if any(hamming(observed, t) < settings.min_distance for t in taken):
                reason = "persona_not_distinct"
                detail = f"{where}: differs from an earlier persona on fewer than {settings.min_distance} dimensions"
        if reason:
            rejected.append(
                Rejected(
                    record_id=content_id("personaatlas_persona_rejected", row["record_id"], reason),
                    stage="map_persona",
                    reason=reason,
                    detail=detail,
                    parent_ids=[row["record_id"]],
                    source="persona_hub",
                    source_index=i,
                    payload={"text": resp.text if resp.ok else ""},
                )
            )
            continue
        add(
            "persona_hub",
            i,
            row["persona"],
            full,
            observed,
            [row["record_id"]],
            {**mapped.as_dict(), "cache_keys": resp.cache_keys},
        )
    sampled = sample_personas(
        schema,
        settings.sampled_personas,
        settings.observe_rate,
        settings.min_distance,
        settings.min_constraints,
        settings.seed,
        existing=taken,
    )
    for j, (full, observed) in enumerate(sampled):
        add("sampled", len(hub_rows) + j, "", full, observed, [], sampled_by)
    return frame(kept, PERSONA_SCHEMA), rejected_frame(rejected), len(hub_rows) + len(sampled)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Validate a PersonaAtlas persona schema file.")
    ap.add_argument("--check", default=str(SCHEMA_FILE))
    schema = load_schema(ap.parse_args(argv).check)
    print(
        f"{len(schema.dimensions)} dimensions, {len(schema.constraints)} hard constraints, "
        f"{sum(len(d.values) for d in schema.dimensions.values())} values"
    )


if __name__ == "__main__":
    main()
