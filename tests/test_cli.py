"""The CLI as a user runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import json
import re

from conftest import PLUGIN_DIST, REPO, run_cli


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("plugins", "recipes", "validate"):
        assert command in result.stdout


def test_plugins_table_shows_builtins_with_distribution_and_version():
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "│" in line]
    cells = [[c.strip() for c in row.strip("│").split("│")] for row in rows]
    assert ["decoder", "smollm", "prefixcap", "0.1.0"] in [c[:4] for c in cells]
    assert {c[0] for c in cells} == {"encoder", "connector", "decoder", "loss", "system", "dataset"}


def test_plugins_kind_filter_and_json():
    table = run_cli("plugins", "--kind", "decoder")
    assert table.returncode == 0 and "smollm" in table.stdout and "siglip" not in table.stdout
    data = json.loads(run_cli("plugins", "--json").stdout)
    assert any({"kind": "system", "name": "prefix"}.items() <= c.items() for c in data["components"])
    assert data["broken"] == []
    bad = run_cli("plugins", "--kind", "decoders")
    assert bad.returncode == 2 and "Invalid value for '--kind'" in bad.stderr


def test_plugins_shows_third_party_and_broken_rows(plugin_site):
    env = {"PYTHONPATH": str(plugin_site), "PREFIXCAP_LOAD_PLUGINS": PLUGIN_DIST}
    result = run_cli("plugins", env=env)
    assert result.returncode == 1, result.stderr  # a broken plugin: exit 1, each one named
    assert result.stderr.strip() == (f"4 broken plugins: {PLUGIN_DIST} 0.3.1 (broken_import, clash, bad_registration, "
                                     "raising_hook). Fix or uninstall them, or leave them out with "
                                     "PREFIXCAP_LOAD_PLUGINS")  # fmt: skip
    lines = result.stdout.splitlines()
    assert any("scaled-linear" in line and PLUGIN_DIST in line and "0.3.1" in line for line in lines)
    broken = [line for line in lines if line.startswith("│ broken")]
    assert len(broken) == 4
    assert any("broken_import" in line and "this plugin needs libfoo" in line for line in broken)
    done = run_cli("plugins", "--json", env=env)
    assert done.returncode == 1
    data = json.loads(done.stdout)  # still valid JSON
    assert {b["plugin"] for b in data["broken"]} == {"broken_import", "raising_hook", "clash", "bad_registration"}


def test_recipes_lists_the_bundled_recipes_from_any_directory(tmp_path):
    result = run_cli("recipes", cwd=tmp_path)
    assert result.returncode == 0
    assert "quickstart" in result.stdout and "siglip-smollm135" in result.stdout
    mine = tmp_path / "recipes"
    mine.mkdir()
    (mine / "mine.yaml").write_text("description: my own\nencoder: {name: siglip, checkpoint: tiny}\n")
    listed = json.loads(run_cli("recipes", "--json", cwd=tmp_path).stdout)
    assert {"name": "mine", "path": str(mine / "mine.yaml"), "description": "my own"} in listed


def test_validate_prints_parameter_counts():
    result = run_cli("validate", "quickstart", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["prefix_tokens"] == 16
    assert report["total_params"] == sum(c["total"] for c in report["components"])
    table = run_cli("validate", str(REPO / "recipes" / "siglip-smollm135.yaml"))
    assert table.returncode == 0, table.stderr
    assert "LoRA targets: q_proj, k_proj, v_proj, o_proj" in table.stdout


def test_validate_set_overrides():
    result = run_cli("validate", "quickstart", "--json", "--set", "connector.pool=avg", "--set", "connector.factor=4")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["prefix_tokens"] == 4  # 8 x 8 patch tokens, 4 x 4 blocks averaged


def test_bad_recipe_exits_2_with_a_clear_message_and_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("encoder: {name: siglip, checkpoint: tiny}\nconnector: mpl\ndecoder: smollm\n")
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {path}:2: connector.name: unknown connector 'mpl'; did you mean 'mlp'?")
    assert "Traceback" not in result.stderr
    override = run_cli("validate", "quickstart", "--set", "train.lr=fast")
    assert override.returncode == 2 and "--set train.lr: train.lr: Input should be a valid number" in override.stderr
    missing = run_cli("validate", "no-such-recipe")
    assert missing.returncode == 2 and "no such recipe file or name" in missing.stderr


def test_listing_benchmark_script_writes_its_report(tmp_path):
    """The timing bound lives in the benchmark, not in a timed test; here only that the script works."""
    import subprocess
    import sys

    out = tmp_path / "listing.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "plugins_listing.py"), "--runs", "2", "--out",
                    str(out)], capture_output=True, text=True, timeout=120)  # fmt: skip
    report = json.loads(out.read_text())
    assert report["bound_s"] == 1.0 and report["pass"] == all(r["median_s"] < 1.0 for r in report["results"].values())
    assert report["results"]["prefixcap plugins"]["runs"] == 2


def test_run_trains_and_prints_a_summary(tmp_path):
    args = ["run", "quickstart", "--out", str(tmp_path / "run"), "--set", "data.name=shapes",
            "--set", "data.train_size=32", "--set", "data.val_size=4", "--set", "data.test_size=4",
            "--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "generate.max_new_tokens=4"]  # fmt: skip
    result = run_cli(*args, env={"PREFIXCAP_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert "step      2  loss" in result.stdout and "test_oracle_accuracy" in result.stdout
    assert re.search(r"samples/s  data \d+ images/s", result.stdout)  # what training takes beside what data gives
    # The cold cache: a bar on stderr (drawn once at the end when stderr is not a terminal), then the size line.
    assert re.search(r"caching encoder features .* 32/32 images .* ETA", result.stderr), result.stderr
    assert re.search(r"feature cache \S+: 32 images, [\d.]+ MiB fp32, encoded 32 images in", result.stdout)
    assert (tmp_path / "run" / "final" / "manifest.json").exists()
    again = run_cli(*args, env={"PREFIXCAP_CACHE": str(tmp_path / "cache")})  # finished run: resumes, re-evaluates
    assert again.returncode == 0 and "resume:" in again.stdout
    assert "complete, reused" in again.stdout and "caching encoder features" not in again.stderr
    # (a run that cannot start exits 2 with one line: tests/reliability/test_reliability_training.py runs those)
