"""The YAML configuration: schema-checked, parsed into frozen dataclasses, every error at once.

The schema (``config_schema.json``) is the single source of option names, types,
defaults, descriptions and examples; the example configuration and the Markdown
reference are generated from it. Custom ``x-`` keywords in the schema drive what JSON
Schema cannot express: ``x-kind`` (duration, size, cron, listen, path) picks the parser
for a value, ``x-positive`` rejects zero, ``x-message`` replaces jsonschema's wording.

Loading composes the YAML into nodes first (never ``yaml.load``) so that every key
path has a line number, aliases can be counted, and no Python object is ever built
from a tag. Errors come out as ``FILE:LINE: key.path: message``.

Regenerate the example: ``python3 -m virt_trimd.config > config/virt-trimd.example.yaml``;
the Markdown reference: ``python3 -m virt_trimd.config --markdown``.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib.resources
import ipaddress
import json
import math
import os
import re
import stat
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .crontab import crontab_fields, shortest_period_seconds
from .units import format_duration, parse_duration, parse_size

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "Config",
    "ConfigError",
    "EffectivenessConfig",
    "MetricsConfig",
    "QemuImgConfig",
    "ScheduleConfig",
    "check_file_permissions",
    "config_schema",
    "example_config_yaml",
    "load_config",
    "load_optional_config",
    "parse_config",
    "parse_listen",
    "schema_reference_markdown",
]

DEFAULT_CONFIG_PATH = Path("/etc/virt-trimd/config.yaml")
# A real configuration is a few KiB; the caps keep hostile files (alias bombs, megabytes
# of nesting) from costing more than a moment of CPU and a little memory.
MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 10_000
MAX_DEPTH = 32

KeyPath = tuple[str | int, ...]

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class ConfigError(Exception):
    """The configuration cannot be used; ``errors`` lists every problem found.

    Each entry reads ``FILE:LINE: key.path: message``; ``str()`` joins them with newlines.
    """

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


@dataclass(frozen=True)
class MetricsConfig:
    """Where /metrics is served and how it is protected."""

    listen_host: str  # IPv6 without brackets
    listen_port: int
    web_config_file: Path | None


@dataclass(frozen=True)
class EffectivenessConfig:
    """A disk is ineffective when allocated_after - guest_used >= max(min_residual, ratio*used)."""

    min_residual_bytes: int
    residual_ratio: float


@dataclass(frozen=True)
class QemuImgConfig:
    """Limits for each qemu-img run."""

    timeout_seconds: float
    cpu_seconds: int
    address_space_bytes: int


@dataclass(frozen=True)
class ScheduleConfig:
    """One schedule: when (cron or every) and which domains, with its trim options."""

    name: str
    cron: str | None
    every_seconds: float | None
    window_seconds: float
    domains: tuple[str, ...]
    exclude: tuple[str, ...]
    concurrency: int
    timeout_seconds: float
    minimum_bytes: int
    min_interval_seconds: float

    def matches(self, domain_name: str) -> bool:
        """True if a ``domains`` glob matches the name and no ``exclude`` glob does.

        Case-sensitive, like libvirt domain names.
        """
        return any(fnmatch.fnmatchcase(domain_name, glob) for glob in self.domains) and not any(
            fnmatch.fnmatchcase(domain_name, glob) for glob in self.exclude
        )


@dataclass(frozen=True)
class Config:
    """The whole validated configuration; ``source`` is the file it came from, if any."""

    libvirt_uri: str
    metrics: MetricsConfig
    state_dir: Path
    census_interval_seconds: float
    shutdown_grace_seconds: float
    agent_timeout_seconds: float
    effectiveness: EffectivenessConfig
    qemu_img: QemuImgConfig
    schedules: tuple[ScheduleConfig, ...]
    source: Path | None = None

    @classmethod
    def default(cls) -> Config:
        """Every option at its schema default, no schedules."""
        return parse_config("", None)


# -- schema ---------------------------------------------------------------------------


@functools.cache
def config_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the configuration file. Do not mutate."""
    text = importlib.resources.files("virt_trimd").joinpath("config_schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.cache
def _validator() -> Any:
    return jsonschema.Draft202012Validator(config_schema())


def _schema_at(path: KeyPath) -> dict[str, Any]:
    """The subschema describing the value at ``path`` (which must exist in the schema)."""
    schema = config_schema()
    for part in path:
        schema = schema["items"] if isinstance(part, int) else schema["properties"][part]
    return schema


# -- public entry points ----------------------------------------------------------------


def load_config(path: Path) -> Config:
    """Read, validate and parse the YAML file at ``path``.

    Raises ConfigError listing every problem (unreadable file, YAML syntax, unknown
    keys, wrong types, bad durations, duplicate schedule names, ...).
    """
    path = Path(path)
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            [f"{path}:1: (root): cannot read the configuration file: {reason}"]
        ) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(
            [f"{path}:1: (root): the file is larger than {MAX_FILE_BYTES} bytes; wrong file?"]
        )
    return parse_config(data, path)


def load_optional_config(path: Path | None) -> Config:
    """``load_config(path)``, or all defaults when no file is given (the one-shot CLI)."""
    return Config.default() if path is None else load_config(path)


def parse_config(data: str | bytes, source: Path | None = None) -> Config:
    """Validate and parse configuration text; ``source`` names it in errors.

    Relative paths in the configuration are taken relative to ``source``'s directory.
    Raises ConfigError listing every problem.
    """
    loader = _Loader(source)
    config = loader.run(data)
    if loader.problems or config is None:
        raise ConfigError(loader.formatted())
    return config


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


def check_file_permissions(path: Path) -> list[str]:
    """Problems that should stop the daemon from trusting the file at ``path``.

    The daemon runs as root and the file decides which guests it touches and where it
    writes, so the file and its directory must be writable by nobody but root (or the
    user running virt-trimd). Returns an empty list when all is well.
    """
    path = Path(path)
    try:
        resolved = path.resolve(strict=True)
        file_stat = resolved.stat()
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return [f"{path}: cannot check the permissions: {reason}"]
    problems = _ownership_problems(path, file_stat, "the configuration file")
    # Whoever can write to a directory can replace the file in it; the sticky bit (as
    # on /tmp) stops that for files owned by someone else.
    directories = dict.fromkeys([path.absolute().parent, resolved.parent])
    for directory in directories:
        try:
            dir_stat = directory.stat()
        except OSError as exc:
            problems.append(f"{directory}: cannot check the permissions: {exc.strerror}")
            continue
        if not dir_stat.st_mode & stat.S_ISVTX:
            problems.extend(_ownership_problems(directory, dir_stat, "the directory"))
    return problems


def _ownership_problems(path: Path, st: os.stat_result, what: str) -> list[str]:
    problems: list[str] = []
    writable_by = [
        who
        for who, bit in (("group", stat.S_IWGRP), ("other users", stat.S_IWOTH))
        if st.st_mode & bit
    ]
    if writable_by:
        problems.append(
            f"{path}: {what} is writable by {' and '.join(writable_by)} "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to trust it. "
            f"Fix with: chmod go-w {path}"
        )
    if st.st_uid not in (0, os.geteuid()):
        problems.append(
            f"{path}: {what} is owned by uid {st.st_uid}, not by root or the user running "
            f"virt-trimd, who could rewrite it. Fix with: chown root {path}"
        )
    return problems


# -- loading ----------------------------------------------------------------------------


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


class _Loader:
    """One load: YAML nodes -> plain values with lines -> schema -> semantic checks -> Config."""

    def __init__(self, source: Path | None) -> None:
        self.source = source
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

    def run(self, data: str | bytes) -> Config | None:
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
        return self._build(document)

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
        for error in _validator().iter_errors(document):
            path: KeyPath = tuple(error.absolute_path)
            if self._under(path, self.unreadable):
                continue
            for problem_path, message, line in self._explain(error, path):
                self.problem(problem_path, message, line)

    def _explain(self, error: Any, path: KeyPath) -> Iterator[tuple[KeyPath, str, int | None]]:
        """Turn one jsonschema error into (path, message, line) problems a person can act on."""
        kind, instance, schema = error.validator, error.instance, error.schema
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
            keys = [sub["required"][0] for sub in error.validator_value]
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
        elif "x-message" in schema and kind in ("pattern", "maxLength", "minLength"):
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

    # -- semantic checks and building --

    def _raw(self, path: KeyPath, document: dict[str, Any]) -> Any:
        """The value at ``path`` as written, or the schema default when it is absent."""
        value: Any = document
        for part in path:
            if isinstance(part, int) or part in value:
                value = value[part]
            else:
                return _schema_at(path).get("default")
        return value

    def _value(self, path: KeyPath, document: dict[str, Any]) -> Any:
        """The value at ``path`` parsed as its schema's ``x-kind`` says; None if it is bad.

        Problems are recorded, not raised, so that one load reports all of them.
        """
        if self._under(path, self.unreadable | self.invalid):
            return None
        schema = _schema_at(path)
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

    def _build(self, document: dict[str, Any]) -> Config | None:
        # Parse every option before giving up, so that one load reports every problem.
        top = {path: self._value(path, document) for path in _leaf_paths(config_schema(), ())}
        schedules: list[ScheduleConfig] = []
        raw_schedules = document.get("schedules")
        if isinstance(raw_schedules, list) and not self._under(("schedules",), self.invalid):
            names: dict[str, int] = {}
            for index, item in enumerate(raw_schedules):
                if isinstance(item, dict) and not self._under(("schedules", index), self.invalid):
                    schedules.append(
                        self._schedule(index, document, top[("agent_timeout",)], names)
                    )
        if self.problems:
            return None
        listen_host, listen_port = top[("metrics", "listen")]
        return Config(
            libvirt_uri=top[("libvirt", "uri")],
            metrics=MetricsConfig(
                listen_host=listen_host,
                listen_port=listen_port,
                web_config_file=top[("metrics", "web_config_file")],
            ),
            state_dir=top[("state_dir",)],
            census_interval_seconds=top[("census_interval",)],
            shutdown_grace_seconds=top[("shutdown_grace",)],
            agent_timeout_seconds=top[("agent_timeout",)],
            effectiveness=EffectivenessConfig(
                min_residual_bytes=top[("effectiveness", "min_residual")],
                residual_ratio=top[("effectiveness", "residual_ratio")],
            ),
            qemu_img=QemuImgConfig(
                timeout_seconds=top[("qemu_img", "timeout")],
                cpu_seconds=top[("qemu_img", "cpu_seconds")],
                address_space_bytes=top[("qemu_img", "address_space")],
            ),
            schedules=tuple(schedules),
            source=self.source,
        )

    def _schedule(
        self,
        index: int,
        document: dict[str, Any],
        agent_timeout: float | None,
        names: dict[str, int],
    ) -> ScheduleConfig:
        """Parse and cross-check one schedule; its fields are None where problems were found."""
        path: KeyPath = ("schedules", index)
        item_schema = _schema_at(path)
        v = {key: self._value((*path, key), document) for key in item_schema["properties"]}
        name, cron, every, window = v["name"], v["cron"], v["every"], v["window"]
        if isinstance(name, str):
            if name in names:
                self.problem(
                    (*path, "name"),
                    f"duplicate schedule name {name!r} (also used at line {names[name]})",
                )
            else:
                names[name] = self.line_of((*path, "name"))
        period = shortest_period_seconds(cron) if cron is not None else every
        if window is not None and period is not None and window >= period:
            how = (
                f"every: {format_duration(period)}"
                if cron is None
                else f"cron {cron!r} can run {format_duration(period)} apart"
            )
            self.problem(
                (*path, "window"),
                f"window {format_duration(window)} must be shorter than the time between "
                f"runs ({how})",
            )
        timeout = v["timeout"]
        if "timeout" not in document["schedules"][index]:
            timeout = agent_timeout
        return ScheduleConfig(
            name=name,
            cron=cron,
            every_seconds=every,
            window_seconds=window,
            domains=tuple(v["domains"] or ()),
            exclude=tuple(v["exclude"] or ()),
            concurrency=v["concurrency"],
            timeout_seconds=timeout,
            minimum_bytes=v["minimum"],
            min_interval_seconds=v["min_interval"],
        )


def _leaf_paths(schema: dict[str, Any], prefix: KeyPath) -> Iterator[KeyPath]:
    """Key paths of every option outside lists, e.g. ("metrics", "listen")."""
    for key, sub in schema["properties"].items():
        if sub.get("type") == "object":
            yield from _leaf_paths(sub, (*prefix, key))
        elif sub.get("type") != "array" or sub["items"].get("type") != "object":
            yield (*prefix, key)


# -- generated documentation --------------------------------------------------------------

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
            lines.append(f"{pad}{key}:")
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


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        sys.stdout.write(schema_reference_markdown())
    else:
        sys.stdout.write(example_config_yaml())
