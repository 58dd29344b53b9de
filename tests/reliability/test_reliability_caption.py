"""`prefixcap caption` against hostile file names, odd files and unlucky users (issue 20). Through the real command
and a real trained system (the session's quickstart_short run); nothing is mocked.

1. --out is written beside its name and renamed into place when complete: two commands on one file leave one whole
   result, and an --out that is one of the input images is refused (exit 2) before anything is written.
2. Paths are written so that no file name can forge a row: text output escapes control characters and backslashes
   reversibly, and a file name that is not UTF-8 is written escaped in every format; no image is dropped.
3. A FIFO or a device named as an input is reported and skipped, never waited on.
4. Huge images are captioned in bounded memory, and a 10000x10 image is cropped before it is resized.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO

PREFIXCAP = str(Path(sys.executable).with_name("prefixcap"))
posix_only = pytest.mark.skipif(os.name != "posix", reason="FIFOs, SIGSTOP and non-UTF-8 names are POSIX things")


@pytest.fixture(scope="module")
def model(quickstart_short) -> str:
    return str(quickstart_short.run_dir)


def png(path: Path, colour: str = "red", size: tuple[int, int] = (24, 24)) -> Path:
    Image.new("RGB", size, colour).save(path, format="PNG")
    return path


def caption(*args: str | bytes, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`prefixcap caption ...` with bytes out, so that a non-UTF-8 file name comes back as it was written."""
    return subprocess.run([PREFIXCAP, "caption", *args, "--max-new-tokens", "6"], input=stdin, capture_output=True,
                          env={**os.environ, "COLUMNS": "200"}, cwd=REPO, timeout=timeout)  # fmt: skip


def unescape_text_path(text: str) -> bytes:
    """The file name a `--format text` path cell stands for (the escaping docs/reliability.md documents)."""
    simple = {"\\": b"\\", "t": b"\t", "n": b"\n", "r": b"\r"}

    parts = re.split(r"\\(\\|t|n|r|x[0-9a-f]{2})", text)  # text, escape, text, escape, ..., text
    assert all("\\" not in part for part in parts[::2]), f"a lone backslash in {text!r}"
    return b"".join(os.fsencode(part) if i % 2 == 0 else simple.get(part) or bytes([int(part[1:], 16)])
                    for i, part in enumerate(parts))  # fmt: skip


# --- 1. --out: all or nothing, never over an input ----------------------------------------------------------------


def test_out_naming_an_input_image_is_refused_and_the_image_kept(model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    a, b = png(folder / "a.png"), png(folder / "b.png", "navy")
    os.link(a, tmp_path / "same-as-a.png")  # another name for the same file
    kept = {p: p.read_bytes() for p in (a, b)}
    for inputs, out in (([folder], f"{folder}/./a.png"), ([a, b], tmp_path / "same-as-a.png")):
        result = caption(model, *map(str, inputs), "--out", str(out))
        assert result.returncode == 2, result.stderr
        assert result.stderr.decode().startswith("error: --out") and b"is one of the input images" in result.stderr
        assert {p: p.read_bytes() for p in (a, b)} == kept  # nothing destroyed
        assert sorted(p.name for p in folder.iterdir()) == ["a.png", "b.png"]  # nothing written
    print("--out naming an input (through a folder and a ./ spelling, as a hard link): exit 2, inputs intact")


@posix_only
def test_two_commands_writing_one_out_file_leave_one_whole_result(model, tmp_path):
    first = [png(tmp_path / f"first-{i:02}.png") for i in range(40)]
    second = [png(tmp_path / f"second-{i}.png", "navy") for i in range(2)]
    out = tmp_path / "out" / "captions.jsonl"
    out.parent.mkdir()
    command = [PREFIXCAP, "caption", model, *map(str, first), "--batch-size", "1", "--out", str(out),
               "--max-new-tokens", "6"]  # fmt: skip
    slow = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        # Stop the first command once it has written a row (to --out itself, or to a temporary beside it) ...
        deadline = time.monotonic() + 600  # the model loads first, slowly on a busy machine
        while not any(p.stat().st_size for p in out.parent.iterdir() if p.is_file()):
            assert slow.poll() is None and time.monotonic() < deadline, slow.communicate()
            time.sleep(0.01)
        os.kill(slow.pid, signal.SIGSTOP)
        # ... let a second command write the same file from start to end ...
        fast = caption(model, *map(str, second), "--out", str(out))
        assert fast.returncode == 0, fast.stderr
    finally:
        os.kill(slow.pid, signal.SIGCONT)  # ... and let the first one finish
    _, stderr = slow.communicate(timeout=300)
    assert slow.returncode == 0, stderr
    text = out.read_text(encoding="utf-8")
    assert "\0" not in text, "the two writers interleaved"
    rows = [json.loads(line) for line in text.splitlines()]
    assert [row["path"] for row in rows] == [str(p) for p in first]  # the last to finish, whole
    assert all(row["caption"] and row["error"] is None for row in rows)
    assert [p.name for p in out.parent.iterdir()] == ["captions.jsonl"]  # no temporary left behind
    print(f"two writers on one --out: one stopped after its first row, the other wrote 2 rows; result: the "
          f"{len(rows)} rows of the last to finish, whole")  # fmt: skip


# --- 2. paths that forge rows, names that are not UTF-8 -----------------------------------------------------------


@posix_only
def test_text_output_escapes_control_characters_in_paths(model, tmp_path):
    latin = os.fsdecode(b"caf\xe9.png")  # Latin-1, not UTF-8
    names = ["new\nline.png", "tab\there.png", "cr\rhere.png", "back\\slash\\n.png", "bell\x07.png", "plain.png", latin]
    paths = [png(tmp_path / name) for name in names]
    result = caption(model, *map(str, paths), "--format", "text")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(paths)  # one row per image, no forged ones
    cells = [line.split("\t") for line in lines[:-1]]
    assert all(len(row) == 2 for row in cells)  # PATH<TAB>CAPTION: no tab in a path cell
    assert all("\r" not in row[0] and "\x07" not in row[0] for row in cells)
    assert [unescape_text_path(row[0]) for row in cells] == [os.fsencode(p) for p in paths]  # reversible
    assert cells[0][0] == f"{tmp_path}/new\\nline.png" and cells[3][0] == f"{tmp_path}/back\\\\slash\\\\n.png"
    assert cells[4][0] == f"{tmp_path}/bell\\x07.png" and cells[5][0] == f"{tmp_path}/plain.png"
    assert cells[6][0] == f"{tmp_path}/caf\\xe9.png"
    print(f"{len(names)} names with newline, tab, CR, backslash, BEL, Latin-1: text rows escaped and reversible")


@posix_only
def test_non_utf8_file_names_are_written_escaped_and_none_is_dropped(model, tmp_path):
    folder = os.fsencode(tmp_path)
    latin = folder + b"/caf\xe9.png"  # a name written on a Latin-1 system
    with open(latin, "wb") as f:
        Image.new("RGB", (24, 24), "red").save(f, format="PNG")
    on_stdin = folder + b"/\xff\xfe.png"
    shutil.copyfile(latin, on_stdin)
    later = png(tmp_path / "later.png")
    for fmt in ("csv", "jsonl"):  # text: test_text_output_escapes_control_characters_in_paths
        out = tmp_path / f"captions.{fmt}"
        result = caption(model, latin, "-", str(later), "--format", fmt, "--out", str(out), stdin=on_stdin + b"\n")
        assert result.returncode == 0, result.stderr
        assert b"captioned 3 of 3 images" in result.stderr
        text = out.read_text(encoding="utf-8")  # valid UTF-8 whatever the names were
        if fmt == "csv":
            paths = [row[0] for row in csv.reader(io.StringIO(text, newline=""))][1:]
        else:
            paths = [json.loads(line)["path"] for line in text.splitlines()]
            assert [os.fsencode(p) for p in paths] == [latin, on_stdin, os.fsencode(later)]  # exactly, in Python
        expected = [f"{tmp_path}/caf\\xe9.png", f"{tmp_path}/\\xff\\xfe.png", str(later)]
        if fmt != "jsonl":
            assert paths == expected
    print("non-UTF-8 names as an argument and on stdin: 3 of 3 captioned in csv and jsonl")


# --- 3. files that are not regular files --------------------------------------------------------------------------


@posix_only
def test_fifo_and_devices_named_as_inputs_are_skipped_not_waited_on(model, tmp_path):
    fifo, on_stdin = tmp_path / "pipe.png", tmp_path / "pipe-on-stdin.png"
    os.mkfifo(fifo)
    os.mkfifo(on_stdin)
    good = png(tmp_path / "good.png")
    try:
        result = caption(model, str(fifo), "/dev/zero", "-", str(good), stdin=f"{on_stdin}\n".encode())
    except subprocess.TimeoutExpired:
        pytest.fail("caption waited on a FIFO for 120 s")
    assert result.returncode == 1, result.stderr
    rows = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [row["path"] for row in rows] == [str(fifo), "/dev/zero", str(on_stdin), str(good)]
    assert rows[0]["error"] == rows[2]["error"] == "a FIFO (named pipe), not a regular file"
    assert rows[1]["error"] == "a character device, not a regular file"
    assert rows[3]["caption"] and rows[3]["error"] is None
    assert result.stderr.decode().splitlines()[-1] == "captioned 1 of 4 images; 3 errors"
    print("a FIFO as an argument and on stdin, and /dev/zero: each an error row at once, the image after them "
          "captioned")  # fmt: skip


# --- 4. memory --------------------------------------------------------------------------------------------------

PEAK = """
import resource, subprocess, sys
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(result.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
print(result.stdout + result.stderr)
"""


def test_four_88_megapixel_pngs_are_captioned_in_bounded_memory(model, tmp_path):
    big = [tmp_path / f"big-{i}.png" for i in range(4)]
    Image.new("RGB", (10000, 8800), "red").save(big[0], compress_level=1)  # 88 megapixels in a small file
    for path in big[1:]:
        shutil.copyfile(big[0], path)
    on_disk = sum(p.stat().st_size for p in big)
    command = [PREFIXCAP, "caption", model, *map(str, big), "--max-new-tokens", "6"]
    run = subprocess.run([sys.executable, "-c", PEAK, *command], capture_output=True, text=True, timeout=600)
    status, peak_mib = map(int, run.stdout.split("\n", 1)[0].split())
    output = run.stdout.split("\n", 1)[1]
    assert status == 0, output
    assert "captioned 4 of 4 images" in output
    assert peak_mib < 1536, f"peak RSS {peak_mib} MiB for four 88-megapixel images"
    print(f"four 10000x8800 PNGs ({on_disk / 2**20:.1f} MiB on disk): captioned, peak RSS {peak_mib} MiB")


def test_a_10000x10_image_is_cropped_before_it_is_resized(tmp_path):
    code = textwrap.dedent("""
        import resource
        import numpy as np
        from PIL import Image
        from prefixcap.images import ImageProcessor

        crop = ImageProcessor(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize="crop")
        wide = Image.fromarray(np.tile(np.arange(10000) * 255 // 9999, (10, 1)).astype(np.uint8)).convert("RGB")
        crop.one(Image.new("RGB", (64, 64)))  # torch's own first-call allocations are not the image's
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pixels = crop.one(wide)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
        centre = float(pixels[0, :, 112].mean()) * 0.5 + 0.5
        # what resizing the whole image, then cropping, makes of a smaller one (affordable at 2000x10)
        import torch, torch.nn.functional as F
        small = wide.resize((2000, 10), Image.Resampling.NEAREST)
        x = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        whole = F.interpolate(x, size=(224, 44800), mode="bicubic", antialias=True, align_corners=False)
        reference = (whole[0, :, :, 22288:22512].clamp(0, 1) - 0.5) / 0.5
        off = float((crop.one(small) - reference).abs().max())
        print(tuple(pixels.shape), grown, round(centre, 3), off)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                         cwd=tmp_path)  # fmt: skip
    shape, numbers = run.stdout.split(") ")
    grown, centre, off = map(float, numbers.split())
    assert shape == "(3, 224, 224"
    assert off < 0.02, f"cropping first differs by {off} from resizing the whole image first"
    assert abs(centre - 0.5) < 0.01  # the centre of a left-to-right ramp: the crop is the middle
    assert grown < 64, f"preprocessing one 10000x10 image grew the peak RSS by {grown:.0f} MiB"
    print(f"10000x10 in crop mode: (3, 224, 224), peak RSS grew {grown:.0f} MiB; 2000x10 within {off:.4f} of "
          "resizing it whole")  # fmt: skip
