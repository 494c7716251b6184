"""Bundled YAML recipes (``hiermem train MODEL --config NAME``) and the reader of recipe files.

A recipe file holds a command's options, flat or grouped in sections (``data:``, ``training:``,
``optimization:``, ...): section keys are flattened into options. A command may route whole
sections to one dict option (``config_dict_sections``, e.g. ``model:`` -> ``model_options``) and
rename dotted keys (``config_renames``, e.g. ``tokenizer.type`` -> ``tokenizer_type``). An
unknown key is an error naming it and the file.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from hiermem.errors import ConfigError

BUNDLED = Path(__file__).resolve().parent


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in BUNDLED.glob("*.yaml"))


def resolve_config(spec: str) -> Path:
    """A YAML file path, or the name of a bundled recipe (with or without ``.yaml``)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    bundled = BUNDLED / f"{path.stem}.yaml"
    if path.suffix in ("", ".yaml") and bundled.is_file():
        return bundled
    raise ConfigError(f"config file not found: {spec} (bundled recipes: {', '.join(bundled_configs()) or 'none'})")


def read_config(func, spec: str) -> dict:
    """The options of ``func`` set by the YAML recipe ``spec``; ConfigError on unknown keys."""
    import yaml

    path = resolve_config(spec)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of options, got {type(data).__name__}")
    params = set(inspect.signature(func).parameters) - {"config"}
    dict_sections = getattr(func, "config_dict_sections", {})
    renames = getattr(func, "config_renames", {})
    out: dict = {}

    def put(key: str, value, label: str):
        key = renames.get(label, key)
        if key not in params:
            raise ConfigError(f"{path}: unknown key {label!r}; known options: {', '.join(sorted(params))}")
        out[key] = value

    for key, value in data.items():
        if key in dict_sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: section {key!r} must be a mapping")
            out[dict_sections[key]] = value
        elif isinstance(value, dict):
            for sub, v in value.items():
                put(sub, v, f"{key}.{sub}")
        else:
            put(key, value, key)
    return out
