"""The browser page (`prefixcap export --web`) with a tampered export, and what an export gives away.

a. Every URL the page takes from manifest.json must be a relative path inside the export folder: an absolute URL
   (another origin), a scheme URL (data:, blob:, javascript:), a protocol-relative //host, a /rooted path or a ..
   escape (also spelled %2e%2e) is refused with a clear error on the page, before anything is loaded. Checked in
   headless Chromium (web/e2e.mjs) on a page whose manifest.json was tampered with, served from a folder that also
   holds an evil/ sibling of the export: what the browser requested, blocked (other origins) and what a second
   server on another port received.
b. index.html carries a Content-Security-Policy: scripts, styles, fetches and images from the page's own origin only
   (WebAssembly compilation allowed, no inline script or style, no eval), no plugins, no <base>; and the page
   still captions images under it, with no violation reported.
c. The export's manifest.json does not record the exporting machine's absolute path as its `source`.

Needs Chromium and web/node_modules, as tests/test_web_demo.py (whose fixtures b and c reuse).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from prefixcap.web_demo import ORT_DIR, ORT_FILES, find_ort

from test_web_demo import CHROMIUM, REPO, WEB, browse, browser_problem, run_caption_js
from test_web_demo import artifacts, exported, images, server  # noqa: F401  (fixtures)

PAGE = REPO / "prefixcap" / "web"


def start_server(directory: Path) -> tuple[subprocess.Popen, str]:
    """`python -m http.server` on ``directory`` with its request log on stderr: the process and its URL."""
    process = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "-d",
                                str(directory)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    line = process.stdout.readline()
    assert "port" in line, line
    return process, f"http://127.0.0.1:{line.split(' port ')[1].split()[0]}/"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A folder holding export/ (the page's files and onnxruntime-web, no model: the page must refuse before it
    would need one) and evil/ (a module that would fetch /pwned-...), served; and a second server on another port
    serving evil/ too. Yields (root folder, root URL, other URL)."""
    if problem := browser_problem():
        pytest.fail(f"the browser test cannot run: {problem}")
    root = tmp_path_factory.mktemp("tampered")
    export = root / "export"
    (export / ORT_DIR).mkdir(parents=True)
    for path in filter(Path.is_file, PAGE.iterdir()):
        shutil.copyfile(path, export / path.name)
    dist, _ = find_ort()
    for name in ORT_FILES:
        shutil.copyfile(dist / name, export / ORT_DIR / name)
    (root / "evil").mkdir()
    (root / "evil" / "evil.mjs").write_text("fetch('/pwned-evil-module'); export const env = { wasm: {} };\n")
    main, url = start_server(root)
    other, other_url = start_server(root / "evil")
    try:
        yield root, url, other_url
    finally:
        for process in (main, other):
            process.terminate()
            process.wait()


def manifest(**web) -> dict:
    runtime = {"package": "onnxruntime-web", "version": "test", "module": f"{ORT_DIR}/{ORT_FILES[0]}",
               "wasm_paths": f"{ORT_DIR}/", "threads": 1}  # fmt: skip
    graphs = {"encoder": {"file": web.pop("graph", "encoder.onnx")}}
    runtime.update({k: web.pop(k) for k in ("module", "wasm_paths") if k in web})
    return {"format": "prefixcap-onnx/1", "system": "prefix", "graphs": graphs, "files": {},
            "web": {"graphs": "fp32", "tokens": web.pop("tokens", "tokens.web.json"), "runtime": runtime}}  # fmt: skip


# (field the page reports, manifest override); {url}: the page's server, {other}: the second server.
TAMPERED = {
    "data-module": ("web.runtime.module", {"module": "data:text/javascript,fetch('{url}pwned-data-module')"}),
    "other-origin-module": ("web.runtime.module", {"module": "{other}evil.mjs"}),
    "protocol-relative-module": ("web.runtime.module", {"module": "//{other_host}/evil.mjs"}),
    "backslash-module": ("web.runtime.module", {"module": "\\\\{other_host}/evil.mjs"}),
    "dotdot-module": ("web.runtime.module", {"module": "../evil/evil.mjs"}),
    "encoded-dotdot-module": ("web.runtime.module", {"module": "ort/%2e%2e/%2E%2E/evil/evil.mjs"}),
    "rooted-module": ("web.runtime.module", {"module": "/evil/evil.mjs"}),
    "spaced-data-module": ("web.runtime.module", {"module": " data:text/javascript,fetch('{url}pwned-spaced')"}),
    "blob-module": ("web.runtime.module", {"module": "blob:{url}0b1c4f7e-0000-4000-8000-000000000000"}),
    "javascript-module": ("web.runtime.module", {"module": "javascript:fetch('{url}pwned-javascript')"}),
    "other-origin-wasm": ("web.runtime.wasm_paths", {"wasm_paths": "{other}"}),
    "dotdot-wasm": ("web.runtime.wasm_paths", {"wasm_paths": "../evil/"}),
    "other-origin-graph": ("encoder", {"graph": "{other}encoder.onnx"}),
    "dotdot-graph": ("encoder", {"graph": "../evil/encoder.onnx"}),
    "data-tokens": ("web.tokens", {"tokens": "data:application/json,{{}}"}),
    "dotdot-tokens": ("web.tokens", {"tokens": "../evil/tokens.web.json"}),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_manifest_urls_are_refused_and_nothing_is_loaded(case, servers, tmp_path):
    root, url, other = servers
    field, override = TAMPERED[case]
    values = {"url": url, "other": other, "other_host": other.split("/")[2]}
    (root / "export" / "manifest.json").write_text(json.dumps(manifest(**{
        k: v.format(**values) for k, v in override.items()})))  # fmt: skip
    command = ["node", str(WEB / "e2e.mjs"), "--url", url + "export/", "--chromium", str(CHROMIUM),
               "--screenshot", str(tmp_path / f"{case}.png")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"web/e2e.mjs failed (exit {done.returncode}):\n{done.stderr}"
    report = json.loads(done.stdout)
    # a clear error on the page, naming the field
    assert "results" not in report, report  # the page did not get ready
    assert "manifest.json" in report["status"] and "refused" in report["status"], report["status"]
    assert field in report["status"], report["status"]
    # nothing but the page itself and its manifest was requested: not the runtime, not a graph, not evil/
    page = {"", "index.html", "app.js", "caption.js", "style.css", "manifest.json"}
    fetched = [u.removeprefix(url + "export/") if u.startswith(url + "export/") else u for u in report["requests"]]
    assert set(fetched) <= page, fetched
    assert report["blocked"] == [], report["blocked"]  # e2e.mjs aborts (and lists) requests to any other origin
    assert not [f for f in report["failed"] if "pwned" in f or "evil" in f], report["failed"]


# what the page's check itself accepts and refuses, in Node (fast): caption.js's exportUrl
GOOD = ["encoder.onnx", "decoder.int8.onnx", "decoder.onnx.data", "ort/ort.wasm.min.mjs", "a-b_c/d.e"]
BAD = ["", " encoder.onnx", "encoder.onnx ", "/encoder.onnx", "//evil.example/x.mjs", "\\\\evil.example/x.mjs",
       "http://evil.example/x.mjs", "https://evil.example/x.mjs", "HTTP://evil.example/x.mjs", "data:text/javascript,1",
       "blob:http://127.0.0.1:1/x", "javascript:alert(1)", "file:///etc/passwd", "../x.mjs", "ort/../../x.mjs",
       "%2e%2e/x.mjs", "ort/.%2E/.%2e/x.mjs", "./x.mjs", "ort//x.mjs", "ort/", "x.mjs?y", "x.mjs#y", "x\\..\\..\\y",
       "\tdata:text/javascript,1", "java\nscript:alert(1)", "ort/\u2024\u2024/x.mjs", None, 7, ["x.mjs"]]


def test_export_url_accepts_only_paths_inside_the_folder():
    code = """
const base = new URL('http://127.0.0.1:8000/exports/page/');
const check = (path, folder) => { try { return js.exportUrl(base, 'field', path, { folder }); }
                                  catch (error) { return 'refused: ' + error.message; } };
output = input.map(([path, folder]) => check(path, folder));
"""
    cases = [(p, False) for p in GOOD + BAD] + [("ort/", True), ("ort", True), ("../", True), ("//x/", True),
                                                ("http://x/", True), ("", True), ("/", True)]  # fmt: skip
    got = dict(zip(map(repr, cases), run_caption_js(code, cases)))
    for path in GOOD:
        assert got[repr((path, False))] == "http://127.0.0.1:8000/exports/page/" + path
    assert got[repr(("ort/", True))] == "http://127.0.0.1:8000/exports/page/ort/"
    refused = [(p, False) for p in BAD] + [("ort", True), ("../", True), ("//x/", True), ("http://x/", True),
                                          ("", True), ("/", True)]  # fmt: skip
    for case in refused:
        assert got[repr(case)].startswith("refused: manifest.json is refused: field is "), (case, got[repr(case)])


CSP_REQUIRED = {
    "default-src": {"'self'"},
    "script-src": {"'self'", "'wasm-unsafe-eval'"},
    "style-src": {"'self'"},
    "connect-src": {"'self'"},
    "img-src": {"'self'", "blob:"},
    "object-src": {"'none'"},
    "base-uri": {"'none'"},
}


def csp_of(html: str) -> dict[str, set[str]]:
    tags = re.findall(r'<meta\s+http-equiv="Content-Security-Policy"\s+content="([^"]*)"', html, re.IGNORECASE)
    assert len(tags) == 1, "index.html has no (or more than one) Content-Security-Policy meta tag"
    policy = {}
    for directive in filter(None, (d.strip() for d in tags[0].split(";"))):
        name, *sources = directive.split()
        policy[name] = set(sources)
    return policy


def test_index_html_has_a_strict_csp_and_the_page_works_under_it(exported, server, images, artifacts):  # noqa: F811
    html = urllib.request.urlopen(server).read().decode()
    policy = csp_of(html)
    for name, sources in CSP_REQUIRED.items():
        assert policy.get(name) == sources, (name, policy.get(name))
    loose = {"'unsafe-inline'", "'unsafe-eval'", "*", "data:", "http:", "https:"}
    assert not any(loose & sources for name, sources in policy.items() if name != "img-src"), policy
    assert "<script>" not in html and "<style" not in html and " style=" not in html  # nothing inline to allow
    # and under it the page captions (browse fails on any console error, which is where Chromium reports a
    # violation) and reports no securitypolicyviolation event
    report = browse(server, images[:2], artifacts / "web-demo-csp.png")
    assert report["csp"] == [], report["csp"]
    assert "int8 graphs" in report["status"]


def test_manifest_source_does_not_record_the_absolute_path(exported, quickstart_short):  # noqa: F811
    manifest = json.loads((exported / "manifest.json").read_text())
    saved = (quickstart_short.run_dir / "final").resolve()
    source = manifest["source"]
    assert not Path(source).is_absolute(), source
    assert str(saved.parent.parent) not in source and str(Path.home()) not in source, source
    assert source == f"{quickstart_short.run_dir.name}/final", source  # the run's name and the saved system in it


def test_source_is_relative_to_the_current_directory_or_names_only(tmp_path, monkeypatch):
    from prefixcap.export import source_name

    final = tmp_path / "runs" / "quickstart" / "final"
    saved = tmp_path / "systems" / "mine"
    (tmp_path / "elsewhere").mkdir()
    for path in (final, saved):
        path.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert source_name(final) == "runs/quickstart/final" and source_name(Path("runs/quickstart/final/")) == (
        "runs/quickstart/final")  # fmt: skip
    assert source_name(saved) == "systems/mine"
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert source_name(final) == "quickstart/final" and source_name(Path("../runs/quickstart/final")) == (
        "quickstart/final")  # fmt: skip
    assert source_name(saved) == "mine"
    monkeypatch.chdir(final)
    assert source_name(final) == "quickstart/final" and source_name(Path(".")) == "quickstart/final"
