"""The import direction written in docs/architecture.md holds in the code.

The allowed imports are read from the document's `May import:` lines, so the page and
this test cannot disagree; the checker itself is tried on a small package with known
violations, so it cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "daemon" / "virt_trimd"
DOC = ROOT / "docs" / "architecture.md"

# Third-party and standard modules only host/ may import: the hypervisor and programs
# run on guest-controlled images.
HOST_ONLY = frozenset({"libvirt", "libvirt_qemu", "guestfs", "subprocess"})
HOST = "host"


@dataclass(frozen=True)
class Import:
    """One import statement: which file, which line, which module."""

    path: Path
    line: int
    module: str


def parse_rules(text: str) -> dict[str, frozenset[str]]:
    """Part name -> the parts it may import, from `### `part/`` headings and `May import:` lines."""
    rules: dict[str, frozenset[str]] = {}
    part: str | None = None
    for line in text.splitlines():
        heading = re.match(r"^### `([A-Za-z_]+)(?:/|\.py)`", line)
        if heading:
            part = heading.group(1)
            continue
        if line.startswith("May import:") and part is not None:
            rules[part] = frozenset(re.findall(r"`([a-z_.]+)`", line))
            part = None
    return rules


def part_of(path: Path, package: Path) -> str:
    """The part a source file belongs to: its subpackage, or its own name at the top."""
    rel = path.relative_to(package)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports_of(path: Path, package_name: str) -> list[Import]:
    """Every import in the file, nested and TYPE_CHECKING ones included, as absolute names."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(Import(path, node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # Relative imports would hide the part they reach; the package uses none.
                found.append(Import(path, node.lineno, f"<relative level {node.level}>"))
            elif node.module == package_name:
                found.extend(
                    Import(path, node.lineno, f"{package_name}.{alias.name}")
                    for alias in node.names
                )
            elif node.module is not None:
                found.append(Import(path, node.lineno, node.module))
    return found


def violations(package: Path, rules: dict[str, frozenset[str]]) -> list[str]:
    """Every import that the rules do not allow, as `path:line: message`."""
    name = package.name
    problems: list[str] = []
    for path in sorted(package.rglob("*.py")):
        part = part_of(path, package)
        rel = path.relative_to(package.parent)
        if part == "__init__":
            allowed: frozenset[str] = frozenset()
        elif part not in rules:
            problems.append(f"{rel}: part {part!r} has no entry in the architecture document")
            continue
        else:
            allowed = rules[part]
        for imp in imports_of(path, name):
            top = imp.module.split(".")[0]
            if imp.module.startswith("<relative"):
                problems.append(f"{rel}:{imp.line}: relative import; name the part")
            elif top in HOST_ONLY and part != HOST:
                problems.append(f"{rel}:{imp.line}: {part} imports {imp.module} (host only)")
            elif top == name:
                problems.extend(_check_own(rel, imp, name, part, allowed))
    return problems


def _check_own(rel: Path, imp: Import, name: str, part: str, allowed: frozenset[str]) -> list[str]:
    target = imp.module.removeprefix(name).lstrip(".")
    if target in ("", "__version__"):
        return []  # the package root: __version__
    if target.split(".")[0] == part:
        return []  # within one part
    if any(target == a or target.startswith(a + ".") for a in allowed):
        return []
    return [f"{rel}:{imp.line}: {part} may not import {imp.module}"]


def test_the_document_names_every_part_with_its_rules() -> None:
    rules = parse_rules(DOC.read_text())
    parts = {part_of(p, PACKAGE) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert parts == set(rules), parts ^ set(rules)
    assert rules["records"] == rules["units"] == rules["escaping"] == frozenset()
    assert all("cli" not in allowed for part, allowed in rules.items() if part != "__main__")


def test_imports_follow_the_documented_direction() -> None:
    problems = violations(PACKAGE, parse_rules(DOC.read_text()))
    assert problems == []


def test_the_checker_reports_each_kind_of_violation(tmp_path: Path) -> None:
    pkg = tmp_path / "virt_trimd"
    files = {
        "records.py": "from virt_trimd.units import parse_size\n",
        "units.py": "import json\n",
        "engine/__init__.py": "",
        "engine/trim.py": "import libvirt\nfrom virt_trimd.host import agent\n",
        "web/__init__.py": "",
        "web/server.py": (
            "from virt_trimd.engine.trim import x\nfrom virt_trimd.engine.state import y\n"
        ),
        "host/__init__.py": "",
        "host/measure.py": "import subprocess\nfrom virt_trimd.cli.commands import main\n",
        "cli/__init__.py": "",
        "cli/main.py": "from . import x\n",
        "stray.py": "",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    rules = parse_rules(
        "### `records.py`\nMay import: nothing of ours.\n"
        "### `units.py`\nMay import: nothing.\n"
        "### `engine/`\nMay import: `host`.\n"
        "### `web/`\nMay import: `engine.state`.\n"
        "### `host/`\nMay import: `records`.\n"
        "### `cli/`\nMay import: `engine`.\n"
    )
    found = violations(pkg, rules)
    expected = [
        "virt_trimd/cli/main.py:1: relative import; name the part",
        "virt_trimd/engine/trim.py:1: engine imports libvirt (host only)",
        "virt_trimd/host/measure.py:2: host may not import virt_trimd.cli.commands",
        "virt_trimd/records.py:1: records may not import virt_trimd.units",
        "virt_trimd/stray.py: part 'stray' has no entry in the architecture document",
        "virt_trimd/web/server.py:1: web may not import virt_trimd.engine.trim",
    ]
    assert found == expected


def test_pure_parts_do_not_load_libvirt() -> None:
    """Import every module outside host/ and service/ in a fresh interpreter.

    The CLI included: it loads libvirt only inside the commands that connect.
    """
    modules = sorted(
        "virt_trimd." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
        for p in PACKAGE.rglob("*.py")
        if part_of(p, PACKAGE) not in {"host", "service", "__main__", "__init__"}
        and p.name not in ("__init__.py", "__main__.py")
    )
    assert {"virt_trimd.engine.trim", "virt_trimd.web.collector", "virt_trimd.cli.commands"} <= set(
        modules
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m in ('libvirt', 'libvirt_qemu')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(PACKAGE.parent)},
    )
    assert out.stdout.strip() == "[]"


def test_logger_names_are_the_documented_ones() -> None:
    documented = set(re.findall(r"^\| `(virt_trimd\.[a-z_]+)` \|", DOC.read_text(), re.M))
    used: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "getLogger"
                and node.args
            ):
                arg = node.args[0]
                assert isinstance(arg, ast.Constant), f"{path}: logger name must be a literal"
                if isinstance(arg.value, str) and arg.value.startswith("virt_trimd"):
                    used.add(arg.value)
    assert used == documented
