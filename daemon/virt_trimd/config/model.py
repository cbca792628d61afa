"""The YAML configuration: schema-checked, parsed into frozen dataclasses, every error at once.

The schema (``config_schema.json``) is the single source of option names, types,
defaults, descriptions and examples; the example configuration and the Markdown
reference are generated from it. Custom ``x-`` keywords in the schema drive what JSON
Schema cannot express: ``x-kind`` (duration, size, cron, listen, path) picks the parser
for a value, ``x-positive`` rejects zero, ``x-message`` replaces jsonschema's wording.

The loading machinery is in ``configload``, the schema lookups in ``configschema`` and
the generated documentation in ``configdoc``; this module holds the dataclasses, the
public entry points and the cross-checks that build a ``Config``.

Regenerate the example: ``python3 -m virt_trimd.config > config/virt-trimd.example.yaml``;
the Markdown reference: ``python3 -m virt_trimd.config --markdown``.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virt_trimd.config.cron import shortest_period_seconds
from virt_trimd.config.generate import example_config_yaml, schema_reference_markdown
from virt_trimd.config.load import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_NODES,
    DocumentLoader,
    UnreadableDocument,
    parse_listen,
    read_document,
)
from virt_trimd.config.schema import KeyPath, config_schema, schema_at
from virt_trimd.records import QemuImgLimits, SparsifyLimits
from virt_trimd.units import format_duration

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "Config",
    "ConfigError",
    "EffectivenessConfig",
    "MetricsConfig",
    "OfflineConfig",
    "QemuImgLimits",
    "ScheduleConfig",
    "StorageGroupConfig",
    "check_file_permissions",
    "config_schema",
    "example_config_yaml",
    "load_config",
    "matches_globs",
    "parse_config",
    "parse_listen",
    "schema_reference_markdown",
]

DEFAULT_CONFIG_PATH = Path("/etc/virt-trimd/config.yaml")


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
class OfflineConfig:
    """virt-sparsify runs: their limits, and how many at once across all schedules."""

    limits: SparsifyLimits = field(default_factory=SparsifyLimits)
    concurrency: int = 1


def matches_globs(name: str, include: Sequence[str], exclude: Sequence[str] = ()) -> bool:
    """True if an `include` glob matches `name` and no `exclude` glob does.

    Case-sensitive (fnmatchcase), like libvirt domain names, on every platform.
    """
    return any(fnmatch.fnmatchcase(name, g) for g in include) and not any(
        fnmatch.fnmatchcase(name, g) for g in exclude
    )


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
    offline: bool = False  # also sparsify the shut-off domains it matches
    growth_bytes: int | None = None  # trigger: allocation grew this much since the last trim
    reclaimable_bytes: int | None = None  # trigger: census measured this much reclaimable

    @property
    def timed(self) -> bool:
        """True when the schedule fires on time (cron or every), not only on triggers."""
        return self.cron is not None or self.every_seconds is not None

    @property
    def triggered(self) -> bool:
        """True when a census may fire it for one domain (growth or reclaimable)."""
        return self.growth_bytes is not None or self.reclaimable_bytes is not None

    def matches(self, domain_name: str) -> bool:
        """True if a ``domains`` glob matches the name and no ``exclude`` glob does.

        Case-sensitive, like libvirt domain names.
        """
        return matches_globs(domain_name, self.domains, self.exclude)


@dataclass(frozen=True)
class StorageGroupConfig:
    """Hosts sharing one storage; inactive (no name, no members) by default."""

    name: str | None = None
    members: tuple[str, ...] = ()
    host: str | None = None  # this host's name in members; None: the hostname
    at_once: int = 1

    @property
    def label(self) -> str:
        """The group's name, "default" when unset: it seeds the ring order."""
        return self.name or "default"


@dataclass(frozen=True)
class Config:
    """The whole validated configuration; ``source`` is the file it came from, if any."""

    libvirt_uri: str
    metrics: MetricsConfig
    state_dir: Path
    history_retention_seconds: float
    census_interval_seconds: float
    shutdown_grace_seconds: float
    agent_timeout_seconds: float
    effectiveness: EffectivenessConfig
    qemu_img: QemuImgLimits
    schedules: tuple[ScheduleConfig, ...]
    source: Path | None = None
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    storage_group: StorageGroupConfig = StorageGroupConfig()

    @classmethod
    def default(cls) -> Config:
        """Every option at its schema default, no schedules."""
        return parse_config("", None)


# -- public entry points ----------------------------------------------------------------


def load_config(path: Path) -> Config:
    """Read, validate and parse the YAML file at ``path``.

    Raises ConfigError listing every problem (unreadable file, YAML syntax, unknown
    keys, wrong types, bad durations, duplicate schedule names, ...).
    """
    path = Path(path)
    try:
        data = read_document(path, "configuration file")
    except UnreadableDocument as exc:
        raise ConfigError([str(exc)]) from None
    return parse_config(data, path)


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


# -- building ---------------------------------------------------------------------------


class _Loader(DocumentLoader):
    """One load: YAML nodes -> plain values with lines -> schema -> semantic checks -> Config."""

    def run(self, data: str | bytes) -> Config | None:
        document = self.read(data)
        return None if document is None else self._build(document)

    # -- semantic checks and building --

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
        group = StorageGroupConfig(
            name=top[("storage_group", "name")],
            members=tuple(top[("storage_group", "members")] or ()),
            host=top[("storage_group", "host")],
            at_once=top[("storage_group", "at_once")] or 1,
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
            history_retention_seconds=top[("history_retention",)],
            census_interval_seconds=top[("census_interval",)],
            shutdown_grace_seconds=top[("shutdown_grace",)],
            agent_timeout_seconds=top[("agent_timeout",)],
            effectiveness=EffectivenessConfig(
                min_residual_bytes=top[("effectiveness", "min_residual")],
                residual_ratio=top[("effectiveness", "residual_ratio")],
            ),
            qemu_img=QemuImgLimits(
                timeout_seconds=top[("qemu_img", "timeout")],
                cpu_seconds=top[("qemu_img", "cpu_seconds")],
                address_space_bytes=top[("qemu_img", "address_space")],
            ),
            schedules=tuple(schedules),
            source=self.source,
            offline=OfflineConfig(
                limits=SparsifyLimits(
                    timeout_seconds=top[("offline", "timeout")],
                    cpu_seconds=top[("offline", "cpu_seconds")],
                    nice=top[("offline", "nice")],
                    memory_bytes=top[("offline", "memory")],
                    runner=top[("offline", "runner")],
                    environment=tuple(
                        (name, value)
                        for name, _, value in (
                            item.partition("=") for item in top[("offline", "environment")] or ()
                        )
                    ),
                ),
                concurrency=top[("offline", "concurrency")],
            ),
            storage_group=group,
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
        item_schema = schema_at(path)
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
            offline=bool(v["offline"]),
            growth_bytes=v["growth"],
            reclaimable_bytes=v["reclaimable"],
        )


def _leaf_paths(schema: dict[str, Any], prefix: KeyPath) -> Iterator[KeyPath]:
    """Key paths of every option outside lists, e.g. ("metrics", "listen")."""
    for key, sub in schema["properties"].items():
        if sub.get("type") == "object":
            yield from _leaf_paths(sub, (*prefix, key))
        elif sub.get("type") != "array" or sub["items"].get("type") != "object":
            yield (*prefix, key)
