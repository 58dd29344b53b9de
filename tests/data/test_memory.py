"""Memory does not grow with the dataset: the same run on a set ten times larger peaks at the same RSS.

Each run is its own process (peak RSS is a property of a process), on a tiny system so that the ten-times set still
encodes in seconds. The old data path held every image's pixels and features in RAM (3 x 32 x 32 float32 pixels
alone are 12 KB an image, 54 MB for the 4,500 more images of the larger run); the bound below allows 25 MB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO, report_in_summary

RUN = """
    import json, resource, sys
    from prefixcap.training import run

    size, out = int(sys.argv[1]), sys.argv[2]
    recipe = {
        "encoder": {"name": "siglip", "checkpoint": "tiny"}, "connector": {"name": "mlp", "hidden": 32},
        "decoder": {"name": "smollm", "checkpoint": "tiny"},
        "data": {"name": "shapes", "image_size": 32, "train_size": size, "val_size": 16, "test_size": 16},
        "train": {"steps": 30, "batch_size": 16}, "eval": {"clip_model": None, "batch_size": 16},
        "generate": {"max_new_tokens": 4}, "output": {"tensorboard": False},
    }
    result = run(recipe, run_dir=out, report=lambda row: None)
    print(json.dumps({"examples": result.metrics["train_examples"], "steps": result.steps,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak(size: int, tmp_path) -> dict:
    env = {**os.environ, "PREFIXCAP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(RUN), str(size), str(tmp_path / f"run-{size}")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_the_dataset(tmp_path, request):
    small, large = peak(500, tmp_path), peak(5000, tmp_path)
    assert (small["examples"], large["examples"]) == (500, 5000) and small["steps"] == large["steps"] == 30
    # Both runs built their feature cache (cold), trained 30 steps (one epoch of the small set, a tenth of the
    # large one) and evaluated the same held-out images: what differs is only how much data there is.
    assert large["peak_rss_mb"] <= small["peak_rss_mb"] + 25, (small, large)
    report_in_summary(request.config, f"peak RSS: {small['peak_rss_mb']:.0f} MB with 500 images, "
                                      f"{large['peak_rss_mb']:.0f} MB with 5,000 (bound: +25 MB)")  # fmt: skip
