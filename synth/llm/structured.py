"""JSON-schema structured output: validate schemas up front, extract and repair JSON replies."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema


class InvalidSchemaError(ValueError):
    pass


def check_schema(schema: dict[str, Any], where: str) -> None:
    """Fail fast, naming `where`, when a JSON schema is itself invalid."""
    if not isinstance(schema, dict):
        raise InvalidSchemaError(
            f"{where}: JSON schema must be an object, got {type(schema).__name__}"
        )
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "/".join(str(p) for p in e.absolute_path) or "<root>"
        raise InvalidSchemaError(f"{where}: invalid JSON schema at {path}: {e.message}") from None


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def _outermost_object(text: str) -> str | None:
    start = text.find("{")
    if start < 0:
        return None
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    # Unbalanced: a reply cut off by max_tokens. Close what is open as a last resort.
    return text[start:] + ("}" * depth if depth > 0 and not in_str else "")


def extract_json(text: str) -> tuple[Any, str | None]:
    """Best-effort parse of a model reply. Never raises: returns (object, None) or (None, reason)."""
    candidates = [text.strip()]
    candidates += [m.strip() for m in _FENCE.findall(text)]
    obj_text = _outermost_object(text)
    if obj_text:
        candidates.append(obj_text)
    for cand in candidates:
        for variant in (cand, _TRAILING_COMMA.sub(r"\1", cand)):
            try:
                return json.loads(variant), None
            except (json.JSONDecodeError, ValueError):
                continue
    return None, "no_json_found" if obj_text is None else "invalid_json"


def validate(obj: Any, schema: dict[str, Any]) -> str | None:
    """None when obj satisfies schema, else a one-line description of the first violation."""
    errors = sorted(
        jsonschema.validators.validator_for(schema)(schema).iter_errors(obj), key=lambda e: e.path
    )
    if not errors:
        return None
    e = errors[0]
    path = "/".join(str(p) for p in e.absolute_path) or "<root>"
    return f"{path}: {e.message}"


def parse_structured(text: str, schema: dict[str, Any]) -> tuple[Any, str | None, str]:
    """(object, reason, detail): reason None on success, else `invalid_json` / `schema_violation`."""
    obj, reason = extract_json(text)
    if reason is not None:
        return None, "invalid_json", f"{reason}: {text[:200]!r}"
    violation = validate(obj, schema)
    if violation is not None:
        return None, "schema_violation", violation
    return obj, None, ""


def structured_failure(response: Any) -> tuple[str, str]:
    """(kind, detail) of a failed structured call: kind is `invalid_json`,
    `schema_violation`, or `failed` (the call itself); detail has the error and its text."""
    kind = response.error if response.error in ("invalid_json", "schema_violation") else "failed"
    return kind, f"{response.error}: {response.first.error_detail}"[:400]
