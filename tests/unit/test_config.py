"""Config validation: every problem at once, each with file, line and key path."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from virt_trimd.config.model import (
    MAX_FILE_BYTES,
    Config,
    ConfigError,
    ScheduleConfig,
    config_schema,
    example_config_yaml,
    load_config,
    parse_config,
    parse_listen,
    schema_reference_markdown,
)

ERROR_LINE = re.compile(r"^.+:\d+: \S+: .+")


def write(tmp_path: Path, text: str | bytes, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def errors_of(tmp_path: Path, text: str | bytes) -> list[str]:
    """The errors of loading ``text``, with the file name shortened to F."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "\n".join(info.value.errors)
    assert all(ERROR_LINE.match(error) for error in info.value.errors), info.value.errors
    return [error.replace(str(path), "F", 1) for error in info.value.errors]


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


# -- defaults ---------------------------------------------------------------------------


def test_defaults() -> None:
    config = Config.default()
    assert config.libvirt_uri == "qemu:///system"
    assert (config.metrics.listen_host, config.metrics.listen_port) == ("127.0.0.1", 9742)
    assert config.metrics.web_config_file is None
    assert config.state_dir == Path("/var/lib/virt-trimd")
    assert config.census_interval_seconds == 300.0
    assert config.shutdown_grace_seconds == 120.0
    assert config.agent_timeout_seconds == 600.0
    assert config.effectiveness.min_residual_bytes == 64 * 2**20
    assert config.effectiveness.residual_ratio == 0.1
    assert config.qemu_img.timeout_seconds == 30.0
    assert config.qemu_img.cpu_seconds == 10
    assert config.qemu_img.address_space_bytes == 2**30
    assert config.schedules == ()
    assert config.source is None


@pytest.mark.parametrize("text", ["", "\n", "# nothing here\n", "---\n", "~\n", "{}\n"])
def test_an_empty_file_means_all_defaults(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert load_config(path) == dataclasses.replace(Config.default(), source=path)


def test_config_is_frozen() -> None:
    config = Config.default()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.libvirt_uri = "test:///default"  # type: ignore[misc]


# -- a full configuration -----------------------------------------------------------------

FULL = """
libvirt:
  uri: qemu+ssh://root@host/system
metrics:
  listen: "[::1]:9100"
  web_config_file: web.yml
state_dir: state
census_interval: 0
shutdown_grace: 90
agent_timeout: 1h30m
effectiveness:
  min_residual: 1G
  residual_ratio: 0.25
qemu_img:
  timeout: 1m
  cpu_seconds: 20
  address_space: 2GiB
schedules:
  - name: nightly
    cron: "30 2 * * *"
    window: 1h
    domains: ["web-*", "db-?"]
    exclude: ["*-scratch"]
    concurrency: 3
    minimum: 1MiB
    min_interval: 12h
  - name: often.check_2
    every: 6h
    timeout: 5m
"""


def test_full_config(tmp_path: Path) -> None:
    config = load(tmp_path, FULL)
    assert config.libvirt_uri == "qemu+ssh://root@host/system"
    assert (config.metrics.listen_host, config.metrics.listen_port) == ("::1", 9100)
    # Relative paths are relative to the configuration file, not to the daemon's cwd.
    assert config.metrics.web_config_file == tmp_path / "web.yml"
    assert config.state_dir == tmp_path / "state"
    assert config.census_interval_seconds == 0.0
    assert config.shutdown_grace_seconds == 90.0
    assert config.agent_timeout_seconds == 5400.0
    assert config.effectiveness.min_residual_bytes == 2**30
    assert config.effectiveness.residual_ratio == 0.25
    assert config.qemu_img.timeout_seconds == 60.0
    assert config.qemu_img.cpu_seconds == 20
    assert config.qemu_img.address_space_bytes == 2 * 2**30
    assert config.source == tmp_path / "c.yaml"
    nightly, often = config.schedules
    assert nightly == ScheduleConfig(
        name="nightly",
        cron="30 2 * * *",
        every_seconds=None,
        window_seconds=3600.0,
        domains=("web-*", "db-?"),
        exclude=("*-scratch",),
        concurrency=3,
        timeout_seconds=5400.0,  # agent_timeout
        minimum_bytes=2**20,
        min_interval_seconds=43200.0,
    )
    assert often == ScheduleConfig(
        name="often.check_2",
        cron=None,
        every_seconds=21600.0,
        window_seconds=0.0,
        domains=("*",),
        exclude=(),
        concurrency=1,
        timeout_seconds=300.0,
        minimum_bytes=0,
        min_interval_seconds=0.0,
    )


def test_integral_floats_are_accepted_for_integers(tmp_path: Path) -> None:
    config = load(tmp_path, "qemu_img: {cpu_seconds: 20.0, address_space: 1073741824.0}\n")
    assert config.qemu_img.cpu_seconds == 20 and isinstance(config.qemu_img.cpu_seconds, int)
    assert config.qemu_img.address_space_bytes == 2**30


def test_schedule_matches_globs_minus_excludes() -> None:
    schedule = ScheduleConfig(
        name="s",
        cron="@daily",
        every_seconds=None,
        window_seconds=0,
        domains=("web-*", "db"),
        exclude=("*-scratch", "web-old?"),
        concurrency=1,
        timeout_seconds=1,
        minimum_bytes=0,
        min_interval_seconds=0,
    )
    assert schedule.matches("web-1")
    assert schedule.matches("db")
    assert not schedule.matches("db2")
    assert not schedule.matches("web-scratch")
    assert not schedule.matches("web-old1")
    assert schedule.matches("web-old12")
    assert not schedule.matches("WEB-1")  # libvirt names are case-sensitive


# -- every error at once, with lines ------------------------------------------------------

MANY_ERRORS = """
libvirt:
  uri: qemu:///system
  urii: x
metrics:
  listen: "::1:9742"
census_interval: 5x
agent_timeout: 0
schedules:
  - name: nightly
    cron: "0 3 1 * 1"
    every: 6h
  - name: nightly
    window: 2h
    every: 1h
    concurency: 2
  - name: bad name
  - cron: "*/5 * * * *"
    window: 10m
    name: x
    timeout: -1
  - 5
state_dirr: /x
qemu_img: {cpu_seconds: 0, address_space: 0}
effectiveness:
  residual_ratio: yes
  min_residual: 64 MiB
  min_residual: 1
"""


def test_every_error_is_reported_at_once_with_its_line(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, MANY_ERRORS)
    located = [error.split(": ", 2)[:2] for error in errors]
    assert located == [
        ["F:3", "libvirt"],
        ["F:5", "metrics.listen"],
        ["F:6", "census_interval"],
        ["F:7", "agent_timeout"],
        ["F:10", "schedules[0].cron"],
        ["F:11", "schedules[0].every"],
        ["F:12", "schedules[1].name"],
        ["F:13", "schedules[1].window"],
        ["F:15", "schedules[1]"],
        ["F:16", "schedules[2]"],
        ["F:16", "schedules[2].name"],
        ["F:18", "schedules[3].window"],
        ["F:20", "schedules[3].timeout"],
        ["F:21", "schedules[4]"],
        ["F:22", "(root)"],
        ["F:23", "qemu_img.cpu_seconds"],
        ["F:23", "qemu_img.address_space"],
        ["F:25", "effectiveness.residual_ratio"],
        ["F:27", "effectiveness"],
    ]
    text = "\n".join(errors)
    for fragment in [
        "unknown key 'urii'; did you mean 'uri'?",
        "put an IPv6 address in brackets",
        "cannot read duration '5x'",
        "agent_timeout: must be more than 0",
        "restrict only one of day-of-month and day-of-week",
        "set exactly one of 'cron' or 'every', not both",
        "duplicate schedule name 'nightly' (also used at line 9)",
        "window 2h must be shorter than the time between runs (every: 1h)",
        "unknown key 'concurency'; did you mean 'concurrency'?",
        "set exactly one of 'cron' or 'every' (neither is set)",
        "got 'bad name'",
        "can run 5m apart",
        "duration -1 is negative",
        "expected a mapping, got an integer (5)",
        "unknown key 'state_dirr'; did you mean 'state_dir'?",
        "must be at least 1, got 0",
        "address_space: must be more than 0",
        "expected a number, got a boolean (true)",
        "duplicate key 'min_residual' (first at line 26)",
    ]:
        assert fragment in text


def test_unknown_key_without_a_close_match_lists_the_valid_ones(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "metrics:\n  listen: 127.0.0.1:1\n  zzz: 1\n")
    assert errors == ["F:3: metrics: unknown key 'zzz'; valid keys here: listen, web_config_file"]


def test_unknown_key_in_a_schedule(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """
        schedules:
          - name: a
            every: 1h
            domain: ["x"]
        """,
    )
    assert errors == ["F:4: schedules[0]: unknown key 'domain'; did you mean 'domains'?"]


def test_type_errors_name_what_was_expected(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """
        libvirt: qemu:///system
        metrics:
          listen: 9742
        schedules:
          - name: 123
            every: [1]
            domains: "web-*"
            concurrency: "2"
        """,
    )
    assert errors == [
        "F:1: libvirt: expected a mapping, got a string ('qemu:///system')",
        "F:3: metrics.listen: expected host:port, got an integer (9742) "
        "(put the value in quotes to make it text)",
        "F:5: schedules[0].name: expected a string, got an integer (123) "
        "(put the value in quotes to make it text)",
        "F:6: schedules[0].every: expected a duration such as 10m, got a list",
        "F:7: schedules[0].domains: expected a list, got a string ('web-*')",
        "F:8: schedules[0].concurrency: expected an integer, got a string ('2')",
    ]


def test_null_values_are_type_errors_not_defaults(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "census_interval:\nstate_dir: ~\n")
    assert errors == [
        "F:1: census_interval: expected a duration such as 10m, got an empty value (null)",
        "F:2: state_dir: expected a path, got an empty value (null)",
    ]


@pytest.mark.parametrize(
    ("yaml_text", "fragment"),
    [
        ("schedules:\n  - name: a\n", "schedules[0]: set exactly one of 'cron' or 'every'"),
        ("schedules:\n  - every: 1h\n", "schedules[0]: missing required key 'name'"),
        ("schedules:\n  - {name: a, every: 0}\n", "schedules[0].every: must be more than 0"),
        ("schedules:\n  - {name: a, every: 1h, timeout: 0}\n", "timeout: must be more than 0"),
        ("schedules:\n  - {name: a, every: 1h, domains: []}\n", "at least 1 item"),
        ("schedules:\n  - {name: a, every: 1h, domains: ['']}\n", "must not be empty"),
        ("schedules:\n  - {name: a, every: 1h, concurrency: 0}\n", "at least 1, got 0"),
        ("schedules:\n  - {name: a, every: 1h, minimum: 1x}\n", "cannot read size '1x'"),
        ("schedules:\n  - {name: a, cron: '61 * * * *'}\n", "minute field: 61 is out of range"),
        ("schedules:\n  - {name: a, cron: '@reboot'}\n", "@reboot"),
        ("schedules:\n  - {name: a, every: 1h, window: 1h}\n", "window 1h must be shorter"),
        ("schedules:\n  - {name: a, cron: '@hourly', window: 2h}\n", "can run 1h apart"),
        ("schedules:\n  - {name: 'nightly\\n', every: 1h}\n", "letters, digits"),
        ("schedules:\n  - {name: '" + "a" * 65 + "', every: 1h}\n", "1 to 64 letters"),
        ("schedules: {name: a}\n", "schedules: expected a list, got a mapping"),
        ("libvirt:\n  uri: system\n", "expected a libvirt URI such as qemu:///system"),
        ("effectiveness:\n  residual_ratio: -0.5\n", "must be at least 0"),
        ("effectiveness:\n  residual_ratio: .nan\n", "expected a finite number, got nan"),
        ("effectiveness:\n  residual_ratio: .inf\n", "expected a finite number, got inf"),
        ("census_interval: .nan\n", "not a finite number"),
        ("effectiveness:\n  min_residual: 1.5\n", "expected a size such as 64MiB"),
        ("qemu_img:\n  cpu_seconds: 100000\n", "must be at most 86400"),
        ("shutdown_grace: -1s\n", "duration '-1s' is negative"),
        ("census_interval: 1h1h\n", "largest first"),
        ("metrics:\n  listen: localhost\n", "expected host:port"),
    ],
)
def test_single_problems(tmp_path: Path, yaml_text: str, fragment: str) -> None:
    errors = errors_of(tmp_path, yaml_text)
    assert len(errors) == 1, errors
    assert fragment in errors[0]


def test_window_must_be_shorter_than_every(tmp_path: Path) -> None:
    config = load(tmp_path, "schedules:\n  - {name: a, every: 1h, window: 59m}\n")
    assert config.schedules[0].window_seconds == 59 * 60


def test_schedule_timeout_defaults_to_agent_timeout(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        agent_timeout: 3m
        schedules:
          - {name: a, every: 1h}
          - {name: b, every: 1h, timeout: 20s}
        """,
    )
    assert [s.timeout_seconds for s in config.schedules] == [180.0, 20.0]


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:9742", "127.0.0.1", 9742),
        ("0.0.0.0:1", "0.0.0.0", 1),
        ("[::1]:9742", "::1", 9742),
        ("[::]:65535", "::", 65535),
        ("[fe80::1%eth0]:9100", "fe80::1%eth0", 9100),
        ("localhost:9100", "localhost", 9100),
        ("metrics.example.org:443", "metrics.example.org", 443),
    ],
)
def test_listen_addresses(text: str, host: str, port: int) -> None:
    assert parse_listen(text) == (host, port)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("::1:9742", "brackets"),
        ("127.0.0.1", "expected host:port"),
        (":9742", "give a host"),
        ("127.0.0.1:0", "from 1 to 65535"),
        ("127.0.0.1:65536", "from 1 to 65535"),
        ("127.0.0.1:http", "from 1 to 65535"),
        ("127.0.0.1:", "from 1 to 65535"),
        ("[::1]9742", "expected ':port'"),
        ("[::1:9742", "missing ']'"),
        ("[nope]:9742", "not an IPv6 address"),
        ("999.0.0.1:80", "neither an IP address nor a host name"),
        ("bad_host:80", "neither an IP address nor a host name"),
        ("-x:80", "neither"),
    ],
)
def test_listen_errors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_listen(text)


def test_ipv6_listen_in_a_file(tmp_path: Path) -> None:
    config = load(tmp_path, 'metrics:\n  listen: "[::1]:9742"\n')
    assert (config.metrics.listen_host, config.metrics.listen_port) == ("::1", 9742)


# -- YAML itself ---------------------------------------------------------------------------


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "libvirt:\n  uri: qemu:///system\n bad: [\n")
    assert len(errors) == 1
    assert errors[0].startswith("F:3: (root): YAML syntax error")


def test_unclosed_flow_sequence(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "schedules: [\n  {name: a, every: 1h},\n")
    assert len(errors) == 1 and errors[0].startswith("F:3: (root): YAML syntax error")


def test_more_than_one_document(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "census_interval: 1m\n---\ncensus_interval: 2m\n")
    assert len(errors) == 1 and errors[0].startswith("F:2: (root): YAML syntax error")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("- a\n- b\n", "expected a mapping of option names to values, got a list"),
        ("just text\n", "got a string ('just text')"),
        ("42\n", "got an integer (42)"),
    ],
)
def test_the_top_level_must_be_a_mapping(tmp_path: Path, text: str, fragment: str) -> None:
    errors = errors_of(tmp_path, text)
    assert len(errors) == 1
    assert errors[0].startswith("F:1: (root): expected a mapping of option names to values")
    assert errors[0].endswith(fragment)


def test_not_utf8(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, b"census_interval: 1m\nstate_dir: /var/\xff\n")
    assert len(errors) == 1
    assert errors[0].startswith("F:2: (root): the file is not UTF-8 text")


def test_control_characters(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "census_interval: 1m\nstate_dir: \x07\n")
    assert len(errors) == 1
    assert errors[0].startswith("F:2: (root): YAML cannot contain character")


def test_utf8_bom_is_fine(tmp_path: Path) -> None:
    path = write(tmp_path, "\ufeffcensus_interval: 1m\n".encode())
    assert load_config(path).census_interval_seconds == 60.0


def test_python_tags_are_never_constructed(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """
        state_dir: !!python/object/apply:os.system ["touch /tmp/pwned"]
        census_interval: !!python/name:os.system x
        shutdown_grace: !custom 2m
        agent_timeout: !!bool maybe
        """,
    )
    assert [e.split(": ", 2)[:2] for e in errors] == [
        ["F:1", "state_dir"],
        ["F:2", "census_interval"],
        ["F:3", "shutdown_grace"],
        ["F:4", "agent_timeout"],
    ]
    assert "unsupported YAML tag" in errors[0]
    assert all("cannot read the value" in e for e in errors[1:])


def test_non_text_keys(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "1: a\n? [x]\n: b\nyes: c\n")
    assert errors == [
        "F:1: (root): option names must be text, got an integer (1)",
        "F:2: (root): option names must be text, got an empty value (null)",
        "F:4: (root): option names must be text, got a boolean (true)",
    ]


def test_merge_keys_share_schedule_settings(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        schedules:
          - &base
            name: nightly
            cron: "0 2 * * *"
            concurrency: 4
            exclude: ["scratch-*"]
          - <<: *base
            name: weekly
            cron: "0 4 * * 0"
        """,
    )
    nightly, weekly = config.schedules
    assert (weekly.name, weekly.cron, weekly.concurrency) == ("weekly", "0 4 * * 0", 4)
    assert weekly.exclude == nightly.exclude == ("scratch-*",)


def test_errors_in_merged_keys_point_at_the_anchor(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """
        schedules:
          - &base
            name: a
            every: 1h
            concurrency: 0
          - <<: *base
            name: b
        """,
    )
    assert [e.split(": ", 2)[:2] for e in errors] == [
        ["F:5", "schedules[0].concurrency"],
        ["F:5", "schedules[1].concurrency"],
    ]


def test_billion_laughs_is_refused(tmp_path: Path) -> None:
    levels = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for index in range(1, 12):
        previous, name = chr(ord("a") + index - 1), chr(ord("a") + index)
        levels.append(f"{name}: &{name} [{', '.join(['*' + previous] * 9)}]")
    errors = errors_of(tmp_path, "\n".join(levels) + "\n")
    assert len(errors) == 1
    assert "more than 10000 values once YAML aliases are expanded" in errors[0]


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "schedules: &loop [*loop]\n")
    assert len(errors) == 1 and "nested more than" in errors[0]


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "state_dir: " + "[" * 5000 + "]" * 5000 + "\n")
    assert len(errors) == 1 and "nested" in errors[0]


def test_files_over_the_size_limit_are_refused(tmp_path: Path) -> None:
    padding = "# " + "x" * 78 + "\n"
    path = write(tmp_path, padding * (MAX_FILE_BYTES // len(padding) + 1))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [
        f"{path}:1: (root): cannot read the configuration file: No such file or directory"
    ]


def test_a_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration file: Is a directory"):
        load_config(tmp_path)


def test_parse_config_names_its_source() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("census_interval: x\n")
    assert info.value.errors[0].startswith("<string>:1: census_interval: ")


# -- the schema as data, and what is generated from it -----------------------------------


def _properties(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    properties = schema.get("properties", {})
    assert isinstance(properties, dict)
    for key, sub in properties.items():
        found.append((f"{path}{key}", sub))
        found += _properties(sub, f"{path}{key}.")
        items = sub.get("items")
        if isinstance(items, dict):
            found += _properties(items, f"{path}{key}[].")
    return found


def test_schema_is_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(config_schema())


def test_every_option_has_a_description_and_an_example_or_default() -> None:
    for path, sub in _properties(config_schema()):
        assert sub.get("description"), path
        if sub.get("type") != "object":
            assert "examples" in sub or "default" in sub, path


def test_no_unknown_keys_anywhere_in_the_schema() -> None:
    def objects(schema: dict[str, Any]) -> list[dict[str, Any]]:
        found = [schema] if schema.get("type") == "object" else []
        for sub in [*schema.get("properties", {}).values(), schema.get("items")]:
            if isinstance(sub, dict):
                found += objects(sub)
        return found

    assert all(obj.get("additionalProperties") is False for obj in objects(config_schema()))


def test_schema_examples_and_defaults_are_valid_values(tmp_path: Path) -> None:
    """Each example and default, placed alone in a file, loads without complaint."""
    for path, sub in _properties(config_schema()):
        if sub.get("type") == "object" or "[]" in path:
            continue
        for value in [*sub.get("examples", []), sub.get("default")]:
            document: dict[str, Any] = {}
            node = document
            *parents, leaf = path.split(".")
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
            load(tmp_path, yaml.safe_dump(document))


def test_example_is_generated_from_the_schema() -> None:
    example = example_config_yaml()
    for path, sub in _properties(config_schema()):
        key = path.rsplit(".", 1)[-1].removesuffix("[]")
        assert re.search(rf"^\s*(- |# )?{re.escape(key)}:", example, re.M), path
        description = str(sub["description"])
        # Each description appears as a comment (wrapped, so compare the first words).
        first_words = " ".join(description.split()[:5])
        assert first_words in " ".join(example.replace("#", " ").split()), path
    assert "\n    # every: 6h\n" in example  # the alternative to cron, commented out


def test_example_loads_with_one_schedule() -> None:
    config = parse_config(example_config_yaml())
    assert [s.name for s in config.schedules] == ["nightly"]
    assert dataclasses.replace(config, schedules=()) == Config.default()


def test_example_every_alternative_loads_when_swapped_in() -> None:
    example = example_config_yaml()
    swapped = re.sub(r'\n    cron: "[^"]*"\n', "\n", example).replace("# every: 6h", "every: 6h")
    config = parse_config(swapped)
    assert (config.schedules[0].cron, config.schedules[0].every_seconds) == (None, 21600.0)


def test_markdown_reference_lists_every_option() -> None:
    markdown = schema_reference_markdown()
    rows = [line for line in markdown.splitlines() if line.startswith("| `")]
    keys = [row.split("`")[1] for row in rows]
    assert "metrics.listen" in keys
    assert "schedules[].cron" in keys
    assert "schedules[].min_interval" in keys
    leaf_paths = [p for p, sub in _properties(config_schema()) if sub.get("type") != "object"]
    assert keys == leaf_paths
    assert "| `census_interval` | duration | `5m` |" in markdown
    assert "| `schedules[].name` | string | required |" in markdown
    assert "| `schedules[].timeout` | duration | `agent_timeout` |" in markdown
    assert all(row.count(" | ") == 3 for row in rows)  # no unescaped pipes in cells
