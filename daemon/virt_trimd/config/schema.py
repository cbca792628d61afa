"""The configuration's JSON Schema (``config_schema.json``) and lookups into it.

The schema is the single source of option names, types, defaults, descriptions and
examples: ``configload`` checks documents against it and parses values as it says,
``config`` builds the dataclasses from it, ``configdoc`` generates the example
configuration and the Markdown reference from it.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from typing import Any

import jsonschema

__all__ = ["KeyPath", "config_schema", "schema_at", "schema_validator"]

KeyPath = tuple[str | int, ...]


@functools.cache
def config_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the configuration file. Do not mutate."""
    text = importlib.resources.files("virt_trimd.config").joinpath("config_schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.cache
def schema_validator() -> Any:
    return jsonschema.Draft202012Validator(config_schema())


def schema_at(path: KeyPath) -> dict[str, Any]:
    """The subschema describing the value at ``path`` (which must exist in the schema)."""
    schema = config_schema()
    for part in path:
        schema = schema["items"] if isinstance(part, int) else schema["properties"][part]
    return schema
