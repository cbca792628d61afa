"""Benchmark 3, measurement cost: a census of many image files.

Generates sparse raw and qcow2 images (half each), then measures what one census costs
in CPU (this process plus its waited-for children, so qemu-img runs count):

* virt-trimd's path: `Measurer.allocation()` for every file, cold (first census, one
  qemu-img per qcow2) and warm (virtual sizes cached; raw never needs qemu-img);
* the naive path: `qemu-img info --output=json` for every file, every time.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
from pathlib import Path

from bench.common import BenchResult, Row, at_most, measure_cpu, row
from virt_trimd.host.measure import Measurer, qemu_img_info_argv

MIB = 1 << 20


def make_images(directory: Path, count: int, virtual_mib: int = 1024) -> list[tuple[str, str]]:
    """`count` images in directory, alternating raw and qcow2: [(path, format)].

    Raw files are sparse with a few MiB written; qcow2 files are copies of one
    `qemu-img create` template (a fresh inode each, like separate guests' images).
    """
    directory.mkdir(parents=True, exist_ok=True)
    template = directory / "template.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(template), f"{virtual_mib}M"],
        check=True,
        capture_output=True,
    )
    block = b"\xa5" * (64 * 1024)
    images: list[tuple[str, str]] = []
    for i in range(count):
        if i % 2 == 0:
            path = directory / f"img{i:05d}.raw"
            with path.open("wb") as fh:
                fh.truncate(virtual_mib * MIB)
                for off in (0, virtual_mib * MIB // 3, virtual_mib * MIB // 2):
                    fh.seek(off)
                    fh.write(block)
            images.append((str(path), "raw"))
        else:
            path = directory / f"img{i:05d}.qcow2"
            shutil.copyfile(template, path)
            images.append((str(path), "qcow2"))
    return images


def census(measurer: Measurer, images: list[tuple[str, str]]) -> int:
    """What the daemon's census does per image file; returns the summed allocation."""
    total = 0
    for path, fmt in images:
        total += measurer.allocation(path, fmt).allocated_bytes
    return total


def qemu_img_each_time(images: list[tuple[str, str]]) -> int:
    """The naive census: one `qemu-img info` per image, every time; summed virtual size."""
    total = 0
    for path, fmt in images:
        out = subprocess.run(
            list(qemu_img_info_argv(path, fmt)),
            capture_output=True,
            text=True,
            check=True,
            stdin=subprocess.DEVNULL,
        ).stdout
        total += int(json.loads(out)["virtual-size"])
    return total


def run(workdir: Path, smoke: bool) -> BenchResult:
    count = 100 if smoke else 1000
    warm_reps = 5 if smoke else 15
    naive_reps = 1 if smoke else 3
    res = BenchResult("census")
    images = make_images(workdir / "census", count)
    try:
        measurer = Measurer()
        with measure_cpu() as cold:
            census(measurer, images)
        cold_runs = measurer.qemu_img_runs
        warm: list[dict[str, float]] = []
        for _ in range(warm_reps):
            with measure_cpu() as m:
                census(measurer, images)
            warm.append(m)
        assert measurer.qemu_img_runs == cold_runs, "warm census ran qemu-img"
        naive: list[dict[str, float]] = []
        for _ in range(naive_reps):
            with measure_cpu() as m:
                qemu_img_each_time(images)
            naive.append(m)
    finally:
        shutil.rmtree(workdir / "census", ignore_errors=True)
    what = f"{count} images ({count // 2} raw, {count - count // 2} qcow2)"
    target = at_most(100.0, "<= 100 ms CPU") if count == 1000 else None
    warm_cpu = [m["cpu_s"] for m in warm]
    naive_cpu = [m["cpu_s"] for m in naive]
    res.rows = [
        row(
            "census",
            f"warm census CPU, {what}",
            "ms",
            warm_cpu,
            scale=1000,
            target=target,
            note="Measurer: stat + cached virtual size; no qemu-img",
        ),
        row(
            "census",
            "warm census wall",
            "ms",
            [m["wall_s"] for m in warm],
            scale=1000,
        ),
        Row(
            "census",
            f"cold census CPU (first run, {cold_runs} qemu-img)",
            "ms",
            cold["cpu_s"] * 1000,
            "once",
            n=1,
            note=f"children {cold['children_s'] * 1000:.0f} ms, wall {cold['wall_s']:.2f} s",
        ),
        row(
            "census",
            f"qemu-img info each time, {what}",
            "ms",
            naive_cpu,
            scale=1000,
            note=f"wall median {statistics.median(m['wall_s'] for m in naive):.1f} s",
        ),
        Row(
            "census",
            "qemu-img each time / warm census (CPU)",
            "x",
            statistics.median(naive_cpu) / max(statistics.median(warm_cpu), 1e-9),
            "ratio of medians",
        ),
    ]
    res.samples = {
        "images": count,
        "cold": cold,
        "warm": warm,
        "qemu_img_each_time": naive,
        "cold_qemu_img_runs": cold_runs,
        "cpus": os.cpu_count(),
    }
    return res
