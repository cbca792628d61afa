"""The example configuration and the Markdown option reference, generated from the schema.

Regenerate the example: ``python3 -m virt_trimd.config > config/virt-trimd.example.yaml``;
the Markdown reference: ``python3 -m virt_trimd.config --markdown``.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator, Sequence
from typing import Any

import yaml

from virt_trimd.config.schema import config_schema

__all__ = ["example_config_yaml", "schema_reference_markdown"]

_WIDTH = 88


def _render(value: Any) -> str:
    """A YAML value for the example file: plain when unambiguous, JSON-quoted otherwise."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_render(item) for item in value) + "]"
    text = str(value)
    # Quote anything beyond URI-ish characters (globs, cron fields) so nobody has to
    # remember which of them YAML would misread.
    plain_ok = re.fullmatch(r"[A-Za-z0-9_./:@+-]+", text) is not None
    if plain_ok:
        try:
            plain_ok = yaml.safe_load(f"k: {text}") == {"k": text}
        except yaml.YAMLError:
            plain_ok = False
    return text if plain_ok else json.dumps(text)


def _comment(text: str, indent: int) -> list[str]:
    prefix = " " * indent + "# "
    return textwrap.wrap(
        text,
        _WIDTH - len(prefix),
        initial_indent=prefix,
        subsequent_indent=prefix,
        break_on_hyphens=False,
    )


def _leaf_doc(schema: dict[str, Any]) -> str:
    text = str(schema["description"])
    if schema.get("default", "") is None:
        text += " Default: unset."
    elif "default" in schema:
        text += f" Default: {_render(schema['default'])}."
    return text


def _example_lines(schema: dict[str, Any], indent: int) -> list[str]:
    lines: list[str] = []
    for position, (key, sub) in enumerate(schema["properties"].items()):
        if indent == 0 and position:
            lines.append("")
        pad = " " * indent
        if sub.get("type") == "object":
            lines += _comment(sub["description"], indent)
            # With every option commented out, an uncommented key would read as null.
            leaves = sub["properties"].values()
            hash_ = "# " if all(leaf.get("x-example-commented") for leaf in leaves) else ""
            lines.append(f"{pad}{hash_}{key}:")
            lines += _example_lines(sub, indent + 2)
        elif sub.get("type") == "array" and sub["items"].get("type") == "object":
            lines += _comment(sub["description"], indent)
            lines.append(f"{pad}{key}:")
            item_lines = _example_lines(sub["items"], indent + 4)
            # The first option of the item starts the list entry; its comment goes above
            # the "- " at the same indentation.
            first = next(
                i for i, line in enumerate(item_lines) if not line.lstrip().startswith("#")
            )
            lines += [line[2:] for line in item_lines[:first]]
            lines.append(f"{pad}  - {item_lines[first].lstrip()}")
            lines += item_lines[first + 1 :]
        else:
            lines += _comment(_leaf_doc(sub), indent)
            example = sub["examples"][0] if "examples" in sub else sub.get("default")
            hash_ = "# " if sub.get("x-example-commented") else ""
            lines.append(f"{pad}{hash_}{key}: {_render(example)}")
    return lines


def example_config_yaml() -> str:
    """The commented example configuration, generated from the schema."""
    schema = config_schema()
    header = [
        "# virt-trimd example configuration, generated from the schema:",
        "#   python3 -m virt_trimd.config > config/virt-trimd.example.yaml",
        "#",
        *_comment(schema["description"], 0),
        "",
    ]
    return "\n".join(header + _example_lines(schema, 0)) + "\n"


def _type_doc(schema: dict[str, Any]) -> str:
    kind = schema.get("x-kind")
    words: str
    if kind is not None:
        words = {"cron": "cron expression", "listen": "host:port"}.get(kind, str(kind))
    else:
        types = schema.get("type")
        types = [types] if isinstance(types, str) else list(types or [])
        words = " or ".join(t for t in types if t != "null")
        if types == ["array"]:
            item_type = schema["items"].get("type")
            words = "list of mappings" if item_type == "object" else f"list of {item_type}s"
    nullable = isinstance(schema.get("type"), list) and "null" in schema["type"]
    return words + (" or null" if nullable else "")


def _reference_rows(
    schema: dict[str, Any], prefix: str, required: Sequence[str]
) -> Iterator[tuple[str, str, str, str]]:
    for key, sub in schema["properties"].items():
        path = f"{prefix}{key}"
        if sub.get("type") == "object":
            yield from _reference_rows(sub, f"{path}.", sub.get("required", ()))
            continue
        if "default" in sub:
            default = f"`{_render(sub['default'])}`"
        elif key in required:
            default = "required"
        elif "x-default-doc" in sub:
            default = f"`{sub['x-default-doc']}`"
        else:
            default = "-"
        yield path, _type_doc(sub), default, sub["description"]
        items = sub.get("items", {})
        if items.get("type") == "object":
            yield from _reference_rows(items, f"{path}[].", items.get("required", ()))


def schema_reference_markdown() -> str:
    """A Markdown table of every option: key path, type, default, description."""

    def cell(text: str) -> str:
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")

    lines = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for path, type_doc, default, description in _reference_rows(config_schema(), "", ()):
        lines.append(f"| `{path}` | {cell(type_doc)} | {default} | {cell(description)} |")
    return "\n".join(lines) + "\n"
