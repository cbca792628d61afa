"""The Ansible role in deploy/ansible: ansible-lint clean, a playbook that parses, an
argument spec for every default, and a template that renders a config check-config takes.

Debian's ansible-core and ansible-lint (.ci/install-deps.sh); missing, the tests fail.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "deploy" / "ansible"
ROLE = ANSIBLE / "roles" / "virt_trimd"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is missing: run .ci/install-deps.sh (Debian's ansible-core, ansible-lint)"
        )
    return path


def _run(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"), "NO_COLOR": "1"}  # fmt: skip
    return subprocess.run(
        argv, cwd=ANSIBLE, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def test_ansible_lint_is_clean(tmp_path: Path) -> None:
    proc = _run([_tool("ansible-lint"), "--offline", "-q"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_playbook_parses(tmp_path: Path) -> None:
    proc = _run(
        [_tool("ansible-playbook"), "--syntax-check", "-i", "inventory.example.yml", "site.yml"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_default_has_an_argument_spec() -> None:
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    spec = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    options = spec["argument_specs"]["main"]["options"]
    assert set(defaults) == set(options)
    assert all(str(o.get("description", "")).strip() for o in options.values())


def test_the_template_renders_a_config_check_config_accepts(tmp_path: Path) -> None:
    """ansible's own template engine, in a local play, on the example inventory's hv02."""
    out = tmp_path / "config.yaml"
    play = [
        {
            "name": "render",
            "hosts": "hv02",
            "connection": "local",
            "gather_facts": False,
            "vars": {"dest": str(out)},
            "tasks": [
                {
                    "name": "render",
                    "ansible.builtin.template": {
                        "src": str(ROLE / "templates" / "config.yaml.j2"),
                        "dest": "{{ dest }}",
                        "mode": "0600",
                    },
                    "vars": yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
                    | {"virt_trimd_storage_group": "ceph_a"},
                }
            ],
        }
    ]
    playbook = tmp_path / "render.yml"
    playbook.write_text(yaml.safe_dump(play))
    inventory = ANSIBLE / "inventory.example.yml"
    proc = _run([_tool("ansible-playbook"), "-i", str(inventory), str(playbook)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rendered = yaml.safe_load(out.read_text())
    assert rendered["storage_group"] == {
        "name": "ceph_a",
        "members": ["hv01", "hv02", "hv03"],
        "host": "hv02",
        "at_once": 1,
    }

    from virt_trimd.config.model import load_config

    config = load_config(out)
    assert config.storage_group.host == "hv02" and len(config.storage_group.members) == 3
