"""alignfoundry.yaml: the model roles and per-family settings, with environment overrides.

    roles:
      default:   {backend: embedded}          # what every role starts from
      generator: {backend: openai, base_url: http://127.0.0.1:8000/v1, model: Qwen/Qwen2.5-7B-Instruct}
      judge:     {backend: openai, base_url: https://api.openai.com/v1, model: gpt-4o, api_key_env: OPENAI_API_KEY}
      reward:    {backend: pooling, base_url: http://127.0.0.1:8001/v1, model: Skywork/Skywork-Reward-V2-Llama-3.1-8B}
    families:
      trace:
        trace_triage_assets: {limit: 40}     # run config of that op in the family's jobs

The file is the one `ALIGNFOUNDRY_CONFIG` names; without it (or with no `roles` in it) the
embedded model fills every role, so the demo runs offline.
Precedence, lowest first: built-in defaults, `roles.default`, `roles.<role>`,
`ALIGNFOUNDRY_LLM_<SETTING>` (every role), `ALIGNFOUNDRY_<ROLE>_<SETTING>` (one role).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The model roles, and what each one does; every family asset names the roles it uses.
ROLES: dict[str, str] = {
    "generator": "writes the data: responses, rewrites, scenarios, assistant turns, teacher targets",
    "judge": "labels and verifies the data while it is made: verdicts, filters, verification",
    "reward": "scores (prompt, response) pairs with a scalar: a reward model (backend pooling) or a chat judge",
    "simulator": "plays the user and the distractor in PersonaAtlas conversations",
    "evaluator": "grades trained models in evaluation, kept apart from the judge that made the data",
}

# setting -> (type, default, environment suffix)
ROLE_SETTINGS: dict[str, tuple[type, Any, str]] = {
    "backend": (str, "embedded", "BACKEND"),
    "model": (str, "", "MODEL"),
    "base_url": (str, "", "BASE_URL"),
    "api_key_env": (str, "OPENAI_API_KEY", "API_KEY_ENV"),
    "server": (str, "auto", "SERVER"),
    "max_concurrency": (int, 8, "CONCURRENCY"),
    "timeout_s": (float, 60.0, "TIMEOUT_S"),
    "max_retries": (int, 4, "MAX_RETRIES"),
    "deadline_s": (float, 180.0, "DEADLINE_S"),
    "response_format": (str, "auto", "RESPONSE_FORMAT"),
    "cache_namespace": (str, "", "CACHE_NAMESPACE"),
}
TOP_LEVEL = ("roles", "families")


class SettingsError(ValueError):
    """A configuration mistake, naming the file or variable and the setting."""


@dataclass(frozen=True, slots=True)
class RoleSettings:
    role: str
    values: dict[str, Any]
    sources: dict[str, str]  # setting -> where its value came from

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


@dataclass(frozen=True, slots=True)
class Settings:
    path: str  # "" when there is no file
    roles: dict[str, RoleSettings]
    # family -> op name -> run config of that op
    families: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def op_config(self) -> dict[str, dict[str, Any]]:
        """Every family's op settings, merged: op name -> its `config` block."""
        return {op: cfg for ops in self.families.values() for op, cfg in ops.items()}


def config_path(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("ALIGNFOUNDRY_CONFIG", "")


def _coerce(value: Any, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and kind is not str:
        try:
            return kind(value)
        except ValueError:
            raise SettingsError(f"{where}: should be {kind.__name__}, got {value!r}") from None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SettingsError(f"{where}: should be {kind.__name__}, got {type(value).__name__}")
    return value


def _read_file(path: str) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise SettingsError(f"{path} (ALIGNFOUNDRY_CONFIG): cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "parse error"
        raise SettingsError(f"{path}: invalid YAML: {first}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise SettingsError(f"{path}: should be a mapping with {' and '.join(TOP_LEVEL)}")
    unknown = sorted(set(doc) - set(TOP_LEVEL))
    if unknown:
        raise SettingsError(
            f"{path}: unknown section {unknown[0]!r} (known: {', '.join(TOP_LEVEL)})"
        )
    return doc


def _role_block(doc: dict[str, Any], path: str, name: str) -> dict[str, Any]:
    block = (doc.get("roles") or {}).get(name) or {}
    where = f"{path}: roles.{name}"
    if not isinstance(block, dict):
        raise SettingsError(f"{where}: should be a mapping of settings")
    out = {}
    for key, value in block.items():
        if key not in ROLE_SETTINGS:
            raise SettingsError(
                f"{where}: unknown setting {key!r} (known: {', '.join(ROLE_SETTINGS)})"
            )
        out[key] = _coerce(value, ROLE_SETTINGS[key][0], f"{where}.{key}")
    return out


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """The effective settings from the file named by ALIGNFOUNDRY_CONFIG and the environment."""
    env = dict(os.environ if env is None else env)
    path = config_path(env)
    doc = _read_file(path) if path else {}
    roles_doc = doc.get("roles") or {}
    if not isinstance(roles_doc, dict):
        raise SettingsError(f"{path}: roles should be a mapping of role names")
    unknown = sorted(set(roles_doc) - {"default", *ROLES})
    if unknown:
        raise SettingsError(
            f"{path}: roles.{unknown[0]} is not a role (roles: default, {', '.join(ROLES)})"
        )
    default_block = _role_block(doc, path, "default")
    roles = {}
    for role in ROLES:
        values = {k: spec[1] for k, spec in ROLE_SETTINGS.items()}
        sources = dict.fromkeys(values, "default")
        layers = [
            (default_block, f"{path}: roles.default"),
            (_role_block(doc, path, role), f"{path}: roles.{role}"),
        ]
        for layer, where in layers:
            for k, v in layer.items():
                values[k], sources[k] = v, where
        for prefix in ("LLM", role.upper()):
            for k, (kind, _, suffix) in ROLE_SETTINGS.items():
                var = f"ALIGNFOUNDRY_{prefix}_{suffix}"
                if env.get(var, "") != "":
                    values[k], sources[k] = _coerce(env[var], kind, var), var
        roles[role] = RoleSettings(role, values, sources)
    families = doc.get("families") or {}
    if not isinstance(families, dict):
        raise SettingsError(f"{path}: families should be a mapping of family names")
    for fam, ops in families.items():
        if not isinstance(ops, dict) or not all(isinstance(c, dict) for c in ops.values()):
            raise SettingsError(
                f"{path}: families.{fam} should map op names to their config settings"
            )
    return Settings(path, roles, {f: dict(ops) for f, ops in families.items()})


def role_summary(settings: Settings, env: dict[str, str] | None = None) -> dict[str, Any]:
    """What `alignfoundry config` prints per role: every setting, keys only as set/unset."""
    env = os.environ if env is None else env
    out = {}
    for role, rs in settings.roles.items():
        v = dict(rs.values)
        key_var = v.pop("api_key_env")
        v["api_key"] = f"{'set' if env.get(key_var) else 'unset'} ({key_var})"
        if v["backend"] == "embedded":
            v["model"] = v["model"] or "(embedded SmolLM2-135M-Instruct)"
        v["purpose"] = ROLES[role]
        v["from"] = sorted({s for s in rs.sources.values() if s != "default"}) or ["defaults"]
        out[role] = v
    return out


DEFAULT_HOME = ".alignfoundry"


def home_dir(home: str | Path | None = None) -> Path:
    """Where Parquet, the LLM cache, LanceDB and the Dagster instance live."""
    return Path(home or os.environ.get("ALIGNFOUNDRY_HOME") or DEFAULT_HOME).expanduser().resolve()


def policy_files() -> list[str]:
    """Policy files the TRACE sensor watches: ALIGNFOUNDRY_POLICY_FILES (os.pathsep-separated)."""
    from synth.trace.policy import SHIPPED_POLICIES

    listed = os.environ.get("ALIGNFOUNDRY_POLICY_FILES")
    return listed.split(os.pathsep) if listed else [str(SHIPPED_POLICIES / "new_policy.yaml")]


def quiet_environment() -> None:
    """No telemetry banner and no progress bars from the Hugging Face libraries, unless
    the user asked for them."""
    for k, v in (
        ("DAGSTER_DISABLE_TELEMETRY", "1"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(k, v)


def ensure_instance_yaml() -> None:
    """A dagster.yaml in DAGSTER_HOME when there is none: without it Dagster warns on every
    command that it is using the defaults (which are what we want), and prints its
    telemetry banner."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        return
    path = Path(home) / "dagster.yaml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "# Dagster instance settings: the defaults (SQLite under this folder), no telemetry.\n"
            "telemetry:\n  enabled: false\n"
        )
