"""The benchmark harness (tests/bench) produces well-formed results, quickly, without guests.

Runs `python3 -m bench --smoke --no-guests --only census,scrape,startup,scale --json FILE`
as a subprocess (real qemu-img, real webserver, real daemon start-up on libvirt's
test:///default driver, the real daemon over 100 stand-in domains) and checks the shape
of what comes out. No timing is asserted:
benchmarks report numbers, tests do not judge them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "daemon"), str(ROOT / "tests"), env.get("PYTHONPATH", "")]
    )
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            "--no-guests",
            "--only",
            "census,scrape,startup,scale",
            "--json",
            str(out),
            "--workdir",
            str(out.parent / "work"),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text()), proc.stdout


def test_json_has_machine_facts_and_the_selected_benchmarks(
    smoke: tuple[dict[str, Any], str],
) -> None:
    doc, _ = smoke
    assert doc["smoke"] is True
    machine = doc["machine"]
    assert machine["cpus"] >= 1
    assert len(machine["loadavg_at_start"]) == 3
    assert [r["name"] for r in doc["results"]] == ["census", "scrape", "startup", "scale"]
    for res in doc["results"]:
        assert res["error"] is None, res
        assert res["skipped"] is None
        assert res["rows"], f"{res['name']} produced no rows"
        assert len(res["load_before"]) == 3 and len(res["load_after"]) == 3


def test_every_row_is_a_finite_number_with_unit_spread_and_verdict(
    smoke: tuple[dict[str, Any], str],
) -> None:
    doc, _ = smoke
    for res in doc["results"]:
        for r in res["rows"]:
            assert r["bench"] == res["name"]
            assert r["metric"] and r["unit"], r
            assert isinstance(r["value"], float) and math.isfinite(r["value"]), r
            assert r["n"] >= 1
            if r["low"] is not None:
                assert r["low"] <= r["high"], r
            # A row with a target has a verdict; a row without one has none.
            assert (r["target"] is None) == (r["passed"] is None), r


def test_census_counts_the_files_it_made_and_warm_runs_no_qemu_img(
    smoke: tuple[dict[str, Any], str],
) -> None:
    doc, _ = smoke
    census = next(r for r in doc["results"] if r["name"] == "census")
    assert census["samples"]["images"] == 100
    # Half of the images are qcow2: the cold census asks qemu-img once for each.
    assert census["samples"]["cold_qemu_img_runs"] == 50
    assert len(census["samples"]["warm"]) >= 3
    assert all(m["cpu_s"] >= 0 and m["wall_s"] > 0 for m in census["samples"]["warm"])


def test_scrape_covers_every_request_kind_and_regime(smoke: tuple[dict[str, Any], str]) -> None:
    doc, _ = smoke
    scrape = next(r for r in doc["results"] if r["name"] == "scrape")
    samples = scrape["samples"]
    assert samples["domains"] == 50 and samples["disks"] == 200
    assert samples["series"] > samples["disks"] * 5
    regimes = [k for k in samples if " / " in k]
    assert len(regimes) == 6
    for key in regimes:
        m = samples[key]
        assert m["latencies_s"] and all(x > 0 for x in m["latencies_s"])
        assert m["body_bytes"] > 0 and m["wire_bytes"] > 0


def test_startup_measured_ready_for_both_uris(smoke: tuple[dict[str, Any], str]) -> None:
    doc, _ = smoke
    startup = next(r for r in doc["results"] if r["name"] == "startup")
    for key in ("test:///default", "qemu:///system", "python -c pass", "virt-trimd --version"):
        assert len(startup["samples"][key]) == 3, key


def test_scale_measured_every_path_at_100_domains(smoke: tuple[dict[str, Any], str]) -> None:
    doc, _ = smoke
    scale = next(r for r in doc["results"] if r["name"] == "scale")
    samples = scale["samples"]
    assert samples["sizes"] == [100]
    m = samples["100"]
    assert m["domains"] == 100 and m["disks"] == 400
    assert len(m["censuses"]) == 2 and len(m["sweeps"]) == 1
    # Every trim of the sweep was appended to the history, and timed.
    assert len(m["history_append_wall_s"]) == 100
    # ping + fstrim + get-fsinfo per trim, get-fsinfo per domain per census.
    assert m["agent_calls"] == 100 * 3 + 100 * 2
    assert m["year"]["trims"] == 365 * 100
    assert m["year"]["census_samples"] == 400 * m["year"]["census_samples_per_disk"]
    for key in [k for k in m if " / " in k and not k.endswith("body_bytes")]:
        assert m[key] and all(x > 0 for x in m[key]), key
    assert m["status_inproc_s"] and m["status_cli_s"] and m["page_s"]
    metrics = {r["metric"] for r in scale["rows"]}
    assert any("first after a change" in x for x in metrics)


def test_table_lists_every_row_and_the_load(smoke: tuple[dict[str, Any], str]) -> None:
    doc, table = smoke
    assert "load" in table.splitlines()[0]
    for res in doc["results"]:
        for r in res["rows"]:
            assert r["metric"][:40] in table


def test_scrape_server_reuses_the_body_until_the_state_changes() -> None:
    """The harness's server is wired like the daemon: same bytes until a change."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.scrape_server", "--domains", "3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = json.loads(proc.stdout.readline())["port"]

        def get() -> bytes:
            url = f"http://127.0.0.1:{port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as resp:
                return bytes(resp.read())

        first, second = get(), get()
        assert first == second
        assert b'virt_trimd_next_run_timestamp_seconds{schedule="nightly"}' in first
        proc.stdin.write("change\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ok"
        third = get()
        assert third != first
        nightly = b'virt_trimd_next_run_timestamp_seconds{schedule="nightly"}'
        line = next(x for x in third.splitlines() if x.startswith(nightly))
        assert line not in first.splitlines()
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(10)
