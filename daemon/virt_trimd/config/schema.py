"""The JSON Schemas of our YAML files (``config_schema.json``, ``web_config_schema.json``).

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

__all__ = ["KeyPath", "Schema", "config_schema", "schema_at", "schema_validator"]

KeyPath = tuple[str | int, ...]


class Schema:
    """One JSON Schema (draft 2020-12) shipped in this package, with its validator."""

    def __init__(self, filename: str) -> None:
        text = importlib.resources.files("virt_trimd.config").joinpath(filename).read_text()
        self.document: dict[str, Any] = json.loads(text)
        self.validator: Any = jsonschema.Draft202012Validator(self.document)

    @staticmethod
    def named(filename: str) -> Schema:
        """The schema in ``filename`` (config_schema.json, web_config_schema.json), cached."""
        return _schema_named(filename)

    def at(self, path: KeyPath) -> dict[str, Any]:
        """The subschema describing the value at ``path`` (which must exist in the schema).

        Below a mapping whose keys are free (``additionalProperties`` is a schema, as for
        user names), any key leads to that schema.
        """
        schema = self.document
        for part in path:
            if isinstance(part, int):
                schema = schema["items"]
            elif part in schema.get("properties", {}):
                schema = schema["properties"][part]
            else:
                schema = schema["additionalProperties"]
        return schema


@functools.cache
def _schema_named(filename: str) -> Schema:
    return Schema(filename)


def config_schema() -> dict[str, Any]:
    """The JSON Schema of the configuration file. Do not mutate."""
    return Schema.named("config_schema.json").document


def schema_validator() -> Any:
    """The validator of the configuration file's schema."""
    return Schema.named("config_schema.json").validator


def schema_at(path: KeyPath) -> dict[str, Any]:
    """The subschema describing the value at ``path`` in the configuration's schema."""
    return Schema.named("config_schema.json").at(path)
