"""Headless Chromium (Debian's `chromium`) for looking at the status page as operators do."""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

# Offline, no first-run or update traffic, no sandbox (tests run as root in CI).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--hide-scrollbars",
)


def chromium_binary() -> str:
    """Path of chromium; AssertionError with advice when it is missing (never a skip)."""
    found = shutil.which("chromium")
    assert found, "chromium is not installed: run .ci/install-deps.sh (apt-get install chromium)"
    return found


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    with tempfile.TemporaryDirectory(prefix="vtrimd-chromium-") as profile:
        return subprocess.run(
            [chromium_binary(), *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            timeout=timeout,
            check=True,
        )


def screenshot(url: str, out: Path, width: int = 1200, height: int = 1600) -> Path:
    """Render `url` and write a PNG of the viewport to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--screenshot={out}", f"--window-size={width},{height}", url], timeout=120)
    assert out.is_file() and out.stat().st_size > 0, f"chromium wrote no {out}"
    return out


def rendered_dom(url: str) -> str:
    """The DOM after Chromium parsed and laid out the page (what the browser made of it)."""
    return _run(["--dump-dom", url], timeout=120).stdout.decode()


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB or RGBA PNG (what Chromium writes): width, height, rows."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), f"unsupported PNG {depth=} {colour=}"
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        row_filter, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = prev[i]
            corner = prev[i - channels] if i >= channels else 0
            if row_filter == 1:
                line[i] = (line[i] + left) & 0xFF
            elif row_filter == 2:
                line[i] = (line[i] + up) & 0xFF
            elif row_filter == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif row_filter == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (
                    line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)
                ) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def distinct_colours(path: Path, step: int = 4) -> int:
    """How many RGB colours a sample of every `step`-th pixel holds (1 for a blank page)."""
    width, _, rows = png_pixels(path)
    channels = len(rows[0]) // width if rows else 3
    colours = set()
    for row in rows[::step]:
        for x in range(0, width, step):
            colours.add(row[x * channels : x * channels + 3])
    return len(colours)
