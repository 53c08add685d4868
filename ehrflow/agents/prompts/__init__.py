"""Prompts, kept apart from the agents' logic: one YAML file per prompt with ``system`` and ``user``
templates (``str.format`` fields)."""

from __future__ import annotations

from functools import cache
from importlib import resources

import yaml


@cache
def _load(name: str) -> dict[str, str]:
    path = resources.files(__package__) / f"{name}.yaml"
    if not path.is_file():
        raise KeyError(f"no prompt named {name!r} in ehrflow/agents/prompts")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not {"system", "user"} <= data.keys():
        raise ValueError(f"prompt {name!r}: needs 'system' and 'user' keys")
    return data


def render(name: str, **fields: str) -> list[dict[str, str]]:
    """The chat messages of prompt ``name`` with ``fields`` filled in."""
    tpl = _load(name)
    return [
        {"role": "system", "content": tpl["system"].strip()},
        {"role": "user", "content": tpl["user"].format(**fields).strip()},
    ]
