"""Any bytes as a config file give a Config or a ConfigError, never another exception."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virt_trimd.config.model import Config, ConfigError, example_config_yaml, parse_config

ERROR_LINE = re.compile(r"^.+:\d+: \S+: .+")
EXAMPLE = example_config_yaml()
EXAMPLE_LINES = EXAMPLE.splitlines(keepends=True)
SOURCE = Path("/etc/virt-trimd/fuzz.yaml")

# Values that break things in interesting ways when they land where an option belongs.
NASTY_VALUES = [
    "",
    "~",
    "[]",
    "{}",
    "-1",
    "0",
    "1e400",
    ".nan",
    "yes",
    "'",
    '"',
    "*a",
    "&a x",
    "&a [*a]",
    "!!binary x",
    "!!bool x",
    "!!int x",
    "!!python/object:os.system x",
    "!x y",
    "<<: 1",
    "? [a]",
    "2001-02-30",
    "1:30",
    "0x1f",
    "\t",
    "|",
    ">-",
    "%YAML 1.1",
    "---",
    "...",
    "[::1]:9742",
    "@reboot",
    "0 0 31 2 *",
    "9" * 5000,
    "\x00",
    "\ud800",
    "é",
]


def assert_config_or_config_error(data: str | bytes) -> None:
    try:
        config = parse_config(data, SOURCE)
    except ConfigError as exc:
        assert exc.errors, "a ConfigError must say what is wrong"
        for error in exc.errors:
            assert ERROR_LINE.match(error), error
            assert error.startswith(f"{SOURCE}:")
            assert "\n" not in error
    else:
        assert isinstance(config, Config)


@st.composite
def mutated_example(draw: st.DrawFn) -> str:
    lines = list(EXAMPLE_LINES)
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["delete", "duplicate", "value", "insert", "chars"]))
        if action == "delete":
            del lines[index]
        elif action == "duplicate":
            lines.insert(index, lines[index])
        elif action == "value" and ":" in lines[index]:
            key = lines[index].split(":", 1)[0]
            lines[index] = f"{key}: {draw(st.sampled_from(NASTY_VALUES))}\n"
        elif action == "insert":
            lines.insert(index, draw(st.sampled_from(NASTY_VALUES)) + "\n")
        else:
            line = lines[index]
            position = draw(st.integers(0, len(line)))
            lines[index] = line[:position] + draw(st.text(max_size=5)) + line[position:]
        if not lines:
            break
    return "".join(lines)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_example())
def test_mutations_of_the_example(text: str) -> None:
    assert_config_or_config_error(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text(text: str) -> None:
    assert_config_or_config_error(text)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    assert_config_or_config_error(data)


YAMLISH = st.text(alphabet=st.sampled_from(list("ab:-[]{},&*!#|>'\"?~ \n\t0129.")), max_size=200)


@settings(max_examples=300, deadline=None)
@given(YAMLISH)
def test_yaml_punctuation_soup(text: str) -> None:
    assert_config_or_config_error(text)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(
        [
            "libvirt:\n  uri: {}\n",
            "metrics:\n  listen: {}\n",
            "metrics:\n  web_config_file: {}\n",
            "state_dir: {}\n",
            "census_interval: {}\n",
            "effectiveness:\n  min_residual: {}\n  residual_ratio: {}\n",
            "qemu_img:\n  cpu_seconds: {}\n  address_space: {}\n",
            "schedules:\n  - name: {}\n    cron: {}\n",
            "schedules:\n  - name: a\n    every: {}\n    window: {}\n",
            "schedules:\n  - name: a\n    every: 1h\n    domains: {}\n    minimum: {}\n",
        ]
    ),
    st.lists(st.one_of(st.sampled_from(NASTY_VALUES), st.text(max_size=12)), min_size=2),
)
def test_nasty_values_in_every_slot(template: str, values: list[str]) -> None:
    assert_config_or_config_error(template.format(*values))
