"""Reading configuration text: YAML nodes -> plain values with lines -> schema -> values.

Loading composes the YAML into nodes first (never ``yaml.load``) so that every key
path has a line number, aliases can be counted, and no Python object is ever built
from a tag. Errors come out as ``FILE:LINE: key.path: message``.

``DocumentLoader`` knows the schema but not the dataclasses: ``config`` subclasses it
to cross-check the parsed values and build the ``Config``.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from virt_trimd.config.cron import crontab_fields
from virt_trimd.config.schema import KeyPath, Schema
from virt_trimd.units import parse_duration, parse_size

__all__ = ["MAX_DEPTH", "MAX_FILE_BYTES", "MAX_NODES", "DocumentLoader", "parse_listen"]

# A real configuration is a few KiB; the caps keep hostile files (alias bombs, megabytes
# of nesting) from costing more than a moment of CPU and a little memory.
MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 10_000
MAX_DEPTH = 32

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class UnreadableDocument(Exception):
    """The file cannot be read, or is too large to be what it claims; str() is FILE:1: ..."""


def read_document(path: Path, what: str) -> bytes:
    """The bytes of ``path``, at most MAX_FILE_BYTES; raise UnreadableDocument.

    ``what`` names the file in the message ("configuration file", "web config file").
    """
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UnreadableDocument(f"{path}:1: (root): cannot read the {what}: {reason}") from None
    if len(data) > MAX_FILE_BYTES:
        raise UnreadableDocument(
            f"{path}:1: (root): the file is larger than {MAX_FILE_BYTES} bytes; wrong file?"
        )
    return data


def parse_listen(text: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6addr]:port`` for IPv6) into host and port.

    Raises ValueError saying what to write instead.
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} in brackets is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':port' after ']', e.g. [::1]:9742")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f"{text!r}: expected host:port, e.g. 127.0.0.1:9742 or [::1]:9742")
        if ":" in host:
            raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:9742")
        if not host:
            raise ValueError(
                f"{text!r}: give a host before the port, e.g. 0.0.0.0:9742 (all IPv4 "
                "addresses), [::]:9742 (all addresses) or 127.0.0.1:9742"
            )
        if not _is_host(host):
            raise ValueError(f"{text!r}: {host!r} is neither an IP address nor a host name")
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _is_host(host: str) -> bool:
    labels = host.split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


# _compose's answer when there is no document to check at all (syntax error, too big).
_UNUSABLE = object()


class _Abort(Exception):
    """Stop converting: the document is too big or too deep to look at further."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


@dataclass(frozen=True)
class _Problem:
    line: int
    path: KeyPath
    message: str


def _format_path(path: KeyPath) -> str:
    if not path:
        return "(root)"
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _short(value: Any, limit: int = 60) -> str:
    """repr() for messages: escaped (never a newline) and cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(value: Any) -> str:
    if value is None:
        return "an empty value (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int):
        return f"an integer ({_short(value)})"
    if isinstance(value, float):
        return f"a number ({_short(value)})"
    if isinstance(value, str):
        return f"a string ({_short(value)})"
    return f"{type(value).__name__} ({_short(value)})"


_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
    "boolean": "true or false",
}
_KIND_WORDS = {
    "duration": "a duration such as 10m",
    "size": "a size such as 64MiB",
    "cron": "a crontab expression",
    "listen": "host:port",
    "path": "a path",
}


class DocumentLoader:
    """One load: YAML nodes -> plain values with lines -> schema, and each value parsed.

    ``config`` subclasses it to cross-check the values and build the ``Config``.
    """

    def __init__(self, source: Path | None, schema: Schema | None = None) -> None:
        """`schema`: what the document must match; the configuration file's by default."""
        self.source = source
        self.schema = schema or Schema.named("config_schema.json")
        self.problems: list[_Problem] = []
        self.lines: dict[KeyPath, int] = {(): 1}
        self.unreadable: set[KeyPath] = set()  # values that failed YAML conversion
        self.invalid: set[KeyPath] = set()  # values the schema already complained about
        self.node_count = 0
        self.constructor = SafeConstructor()

    def formatted(self) -> list[str]:
        """Every problem as ``FILE:LINE: key.path: message``, in file order."""
        name = str(self.source) if self.source is not None else "<string>"
        ordered = sorted(self.problems, key=lambda problem: problem.line)
        return [
            f"{name}:{p.line}: {_format_path(p.path)}: {' '.join(p.message.split())}"
            for p in ordered
        ]

    def problem(self, path: KeyPath, message: str, line: int | None = None) -> None:
        self.problems.append(_Problem(line or self.line_of(path), path, message))

    def line_of(self, path: KeyPath) -> int:
        """Line of the key at ``path``, or of its closest ancestor that has one."""
        while path not in self.lines:
            path = path[:-1]
        return self.lines[path]

    # -- text to plain values --

    def read(self, data: str | bytes) -> dict[str, Any] | None:
        """The document as plain values, checked against the schema; None when unusable.

        Problems are recorded, not raised; a mapping with problems is still returned so
        that building it can report the rest.
        """
        document = self._compose(data)
        if document is _UNUSABLE:
            return None
        if not isinstance(document, dict):
            if document is not None:
                self.problem(
                    (), f"expected a mapping of option names to values, got {_describe(document)}"
                )
                return None
            document = {}
        self._check_schema(document)
        return document

    def _compose(self, data: str | bytes) -> Any:
        if isinstance(data, bytes):
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                line = data.count(b"\n", 0, exc.start) + 1
                self.problem(
                    (), f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})", line
                )
                return _UNUSABLE
        else:
            text = data
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 1
            message = exc.problem or exc.context or "invalid YAML"
            if exc.context and exc.problem and exc.context_mark is not None:
                message += f" ({exc.context} at line {exc.context_mark.line + 1})"
            self.problem((), f"YAML syntax error: {message}", line)
            return _UNUSABLE
        except yaml.reader.ReaderError as exc:
            line = text.count("\n", 0, exc.position) + 1
            self.problem((), f"YAML cannot contain character {exc.character!r}: {exc.reason}", line)
            return _UNUSABLE
        except yaml.YAMLError as exc:
            self.problem((), f"YAML error: {exc}", 1)
            return _UNUSABLE
        except RecursionError:
            self.problem((), f"the document is nested too deeply (the limit is {MAX_DEPTH})", 1)
            return _UNUSABLE
        if root is None:
            return None
        self.lines[()] = root.start_mark.line + 1
        try:
            return self._convert(root, (), 0)
        except _Abort as exc:
            self.problem((), exc.message, exc.line)
            return _UNUSABLE

    def _convert(self, node: Node, path: KeyPath, depth: int) -> Any:
        """Plain Python value of ``node``; records each key's line and counts every node.

        Aliases are expanded, so a "billion laughs" document is caught by the node count
        long before it is built; a recursive alias is caught by the depth limit.
        """
        self.node_count += 1
        line = node.start_mark.line + 1
        if self.node_count > MAX_NODES:
            raise _Abort(
                line,
                f"the document has more than {MAX_NODES} values once YAML "
                "aliases are expanded; refusing to read further",
            )
        if depth > MAX_DEPTH:
            raise _Abort(
                line,
                f"the document is nested more than {MAX_DEPTH} levels deep "
                "(a recursive YAML alias?)",
            )
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if node.tag not in (_MAP_TAG, _SEQ_TAG):
            self.problem(path, f"unsupported YAML tag {node.tag!r}", line)
            self.unreadable.add(path)
            return None
        if isinstance(node, SequenceNode):
            items = []
            for index, item in enumerate(node.value):
                self.lines[(*path, index)] = item.start_mark.line + 1
                items.append(self._convert(item, (*path, index), depth + 1))
            return items
        assert isinstance(node, MappingNode)
        return self._mapping(node, path, depth)

    def _mapping(self, node: MappingNode, path: KeyPath, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        # YAML merge keys ("<<: *defaults"): explicit keys win, earlier merges beat later.
        merges = [value for key, value in node.value if key.tag == _MERGE_TAG]
        for merged_node in reversed(self._merge_sources(merges, path)):
            merged = self._convert(merged_node, path, depth + 1)
            if isinstance(merged, dict):
                result.update(merged)
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key_line = key_node.start_mark.line + 1
            key = self._scalar(key_node, path) if isinstance(key_node, ScalarNode) else None
            if not isinstance(key, str):
                self.problem(path, f"option names must be text, got {_describe(key)}", key_line)
                continue
            if key in seen:
                self.problem(
                    path, f"duplicate key {_short(key)} (first at line {seen[key]})", key_line
                )
                continue
            seen[key] = key_line
            self.lines[(*path, key)] = key_line
            result[key] = self._convert(value_node, (*path, key), depth + 1)
        return result

    def _merge_sources(self, merges: list[Node], path: KeyPath) -> list[MappingNode]:
        sources: list[MappingNode] = []
        for merge in merges:
            candidates = merge.value if isinstance(merge, SequenceNode) else [merge]
            for candidate in candidates:
                if isinstance(candidate, MappingNode):
                    sources.append(candidate)
                else:
                    self.problem(
                        path,
                        "a merge key '<<' needs a mapping or a list of mappings",
                        candidate.start_mark.line + 1,
                    )
        return sources

    def _scalar(self, node: ScalarNode, path: KeyPath) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        # SafeConstructor raises ConstructorError, ValueError, KeyError (!!bool x) and more
        # for malformed tagged scalars; all of them mean "cannot read this value".
        except Exception as exc:
            reason = exc.problem if isinstance(exc, yaml.MarkedYAMLError) else str(exc)
            self.problem(
                path,
                f"cannot read the value {_short(node.value)}: {reason}",
                node.start_mark.line + 1,
            )
            self.unreadable.add(path)
            return None

    # -- schema --

    def _under(self, path: KeyPath, paths: set[KeyPath]) -> bool:
        return any(path[:length] in paths for length in range(len(path) + 1))

    def _check_schema(self, document: dict[str, Any]) -> None:
        for error in self.schema.validator.iter_errors(document):
            path: KeyPath = tuple(error.absolute_path)
            if self._under(path, self.unreadable):
                continue
            for problem_path, message, line in self._explain(error, path):
                self.problem(problem_path, message, line)

    def _explain(self, error: Any, path: KeyPath) -> Iterator[tuple[KeyPath, str, int | None]]:
        """Turn one jsonschema error into (path, message, line) problems a person can act on."""
        kind, instance, schema = error.validator, error.instance, error.schema
        if schema.get("x-secret"):
            # A password hash, or by mistake a password: never echo the value.
            self.invalid.add(path)
            yield path, schema.get("x-message", "invalid value"), None
            return
        if kind == "additionalProperties":
            known = list(schema.get("properties", {}))
            for key in instance:
                if key in known:
                    continue
                self.invalid.add((*path, key))
                matches = difflib.get_close_matches(key, known, n=1) if len(key) < 100 else []
                hint = (
                    f"; did you mean {matches[0]!r}?"
                    if matches
                    else (f"; valid keys here: {', '.join(known)}")
                )
                yield path, f"unknown key {_short(key)}{hint}", self.lines.get((*path, key))
            return
        if kind == "required":
            for key in error.validator_value:
                if key not in instance and (*path, key) not in self.unreadable:
                    yield path, f"missing required key {key!r}", None
            return
        if kind == "oneOf" and "x-message" in schema:
            if not isinstance(instance, dict):
                return  # "required" holds for any non-mapping; the type error says enough
            # Alternatives without "required" (a schedule with growth triggers only)
            # are not keys to name.
            keys = [sub["required"][0] for sub in error.validator_value if "required" in sub]
            present = [key for key in keys if key in instance]
            if any((*path, key) in self.unreadable for key in keys):
                return
            if len(present) > 1:
                last = max(present, key=lambda key: self.lines.get((*path, key), 0))
                yield (*path, last), f"{schema['x-message']}, not both", None
            else:
                yield path, f"{schema['x-message']} (neither is set)", None
            return
        self.invalid.add(path)
        if kind == "type":
            types = error.validator_value
            types = [types] if isinstance(types, str) else types
            expected = _KIND_WORDS.get(schema.get("x-kind", "")) or " or ".join(
                _TYPE_WORDS.get(name, name) for name in types
            )
            hint = ""
            if "string" in types and isinstance(instance, bool | int | float):
                hint = " (put the value in quotes to make it text)"
            yield path, f"expected {expected}, got {_describe(instance)}{hint}", None
        elif "x-message" in schema and kind in ("pattern", "maxLength", "minLength", "enum"):
            yield path, f"{schema['x-message']}, got {_short(instance)}", None
        elif kind == "minimum":
            yield path, f"must be at least {error.validator_value}, got {_short(instance)}", None
        elif kind == "maximum":
            yield path, f"must be at most {error.validator_value}, got {_short(instance)}", None
        elif kind == "minLength":
            yield path, "must not be empty", None
        elif kind == "maxLength":
            yield path, f"must be at most {error.validator_value} characters long", None
        elif kind == "minItems":
            yield path, f"must list at least {error.validator_value} item(s)", None
        else:
            yield path, _short(error.message, 200), None

    # -- parsing values --

    def _raw(self, path: KeyPath, document: dict[str, Any]) -> Any:
        """The value at ``path`` as written, or the schema default when it is absent."""
        value: Any = document
        for part in path:
            if isinstance(part, int) or part in value:
                value = value[part]
            else:
                return self.schema.at(path).get("default")
        return value

    def _value(self, path: KeyPath, document: dict[str, Any]) -> Any:
        """The value at ``path`` parsed as its schema's ``x-kind`` says; None if it is bad.

        Problems are recorded, not raised, so that one load reports all of them.
        """
        if self._under(path, self.unreadable | self.invalid):
            return None
        schema = self.schema.at(path)
        value = self._raw(path, document)
        if value is None:
            return None
        kind = schema.get("x-kind")
        try:
            if kind == "duration":
                parsed: Any = parse_duration(value)
            elif kind == "size":
                is_whole = isinstance(value, float) and value.is_integer()
                parsed = parse_size(int(value) if is_whole else value)
            elif kind == "cron":
                crontab_fields(value)
                parsed = value.strip()
            elif kind == "listen":
                parsed = parse_listen(value)
            elif kind == "path":
                parsed = Path(value)
                if not parsed.is_absolute() and self.source is not None:
                    parsed = self.source.parent / parsed
            elif schema.get("type") == "integer":
                parsed = int(value)
            elif schema.get("type") == "number":
                parsed = float(value)
                if not math.isfinite(parsed):  # .nan passes any JSON Schema "minimum"
                    raise ValueError(f"expected a finite number, got {value!r}")
            else:
                parsed = value
        except ValueError as exc:
            self.problem(path, str(exc))
            self.invalid.add(path)
            return None
        pattern = schema.get("pattern")
        # jsonschema searches with re.search, where a closing "$" also matches before a
        # final newline ("nightly\n" passes); fullmatch does not let that through.
        if pattern is not None and pattern.endswith("$") and not re.fullmatch(pattern, parsed):
            self.problem(path, f"{schema.get('x-message', 'invalid value')}, got {_short(value)}")
            return None
        if schema.get("x-positive") and parsed == 0:
            self.problem(path, "must be more than 0")
            return None
        return parsed
