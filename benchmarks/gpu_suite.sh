#!/usr/bin/env bash
# Every figure issue 26 asks of a GPU, in one command on a machine with a CUDA GPU and no hub (random weights at real
# sizes, the quickstart's shapes world for training), written to one JSON that names the device:
#
#   bash benchmarks/gpu_suite.sh            [OUT_DIR]   CUDA; default OUT_DIR benchmarks/results/gpu_suite
#   bash benchmarks/gpu_suite.sh --smoke    [OUT_DIR]   the same steps on the CPU at the quickstart's sizes, in
#                                                       seconds (tests/test_gpu_suite.py runs it, so it cannot rot)
#
# 1. real sizes, eager: prefix with 196 / 49 / 32 tokens and the cross-attention baseline, training at batch 64 and
#    256 (pixels in, cached features), decoding at batch 1 / 64 / 256, peak memory (benchmarks/real_sizes.py)
# 2. the same compiled (train.compile, generate.compile) for $COMPILED_SYSTEMS, by default the 49-token prefix and
#    the baseline: each compile takes minutes, and the 8-minute budget has room for two
# 3. the decode loop on the quickstart system, generate against prefixcap's loop eager and compiled, at 1 / 64 / 256
#    (benchmarks/decode_loop.py)
# 4. the quickstart bench: `prefixcap bench --compare prefix,crossattn` at $BENCH_STEPS steps
# Then OUT_DIR/gpu_suite.json holds every part's JSON, the device, the git revision and each part's seconds. A part
# that fails is recorded as failed (its exit code and the tail of its log) and the rest still run; the script exits
# non-zero if any failed. A part that ran but missed its target (exit 1 with "met": false in its JSON) did not fail:
# the suite measures, and its JSON says which targets were met. PYTHON chooses the interpreter (default: .venv/bin/python if present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
OUT=${1:-benchmarks/results/gpu_suite$([ $SMOKE = 1 ] && echo _smoke)}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1  # nothing here may reach for the hub

if [ $SMOKE = 1 ]; then
  DEVICE=cpu
  SIZES=(--scale quickstart --systems prefix-16,crossattn --device cpu --batch-sizes 2 --generate-batch-sizes 1,2
         --steps 1 --warmup 1)
  COMPILED_SYSTEMS=${COMPILED_SYSTEMS:-}  # a compile is minutes on a CPU; tests/test_compile.py covers it
  DECODE=(--device cpu --batch-sizes 1 2 --repeats 1 --new-tokens 4)
  BENCH_STEPS=${BENCH_STEPS:-2}
  BENCH=(--set data.train_size=16 --set data.val_size=4 --set data.test_size=4 --set train.batch_size=4
         --set generate.max_new_tokens=4 --set eval.clip_model=null
         --gen-images 2 --matching-images 4 --pointing-images 4)
else
  DEVICE=cuda
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --smoke on a CPU')" || exit 2
  SIZES=(--scale real --device cuda --batch-sizes 64,256 --generate-batch-sizes 1,64,256 --steps 10 --warmup 3)
  COMPILED_SYSTEMS=${COMPILED_SYSTEMS:-prefix-49,crossattn}
  DECODE=(--device cuda --batch-sizes 1 64 256 --repeats 11 --compile)
  BENCH_STEPS=${BENCH_STEPS:-500}
  BENCH=()
fi

: > "$OUT/parts.tsv"
part() {  # part NAME JSON COMMAND...: run it, log it, record its status and seconds
  local name=$1 json=$2; shift 2
  local start=$SECONDS
  echo "== $name" >&2
  rm -f "$json"  # a JSON left in OUT_DIR by an earlier suite must not pass for this run's
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  if [ $rc != 0 ]; then echo "$name exited $rc; the end of $OUT/$name.log:" >&2; tail -5 "$OUT/$name.log" >&2; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$json" "$rc" "$((SECONDS - start))" >> "$OUT/parts.tsv"
}

part real_sizes "$OUT/real_sizes.json" "$PYTHON" benchmarks/real_sizes.py "${SIZES[@]}" --out "$OUT/real_sizes.json"
if [ -n "$COMPILED_SYSTEMS" ]; then
  part real_sizes_compiled "$OUT/real_sizes_compiled.json" "$PYTHON" benchmarks/real_sizes.py "${SIZES[@]}" \
    --compile --systems "$COMPILED_SYSTEMS" --out "$OUT/real_sizes_compiled.json"
fi
part decode_loop "$OUT/decode_loop.json" "$PYTHON" benchmarks/decode_loop.py "${DECODE[@]}" --out "$OUT/decode_loop.json"
part bench "$OUT/bench/bench.json" "$PYTHON" -m prefixcap bench --compare prefix,crossattn --steps "$BENCH_STEPS" \
  "${BENCH[@]}" --set output.tensorboard=false --out "$OUT/bench"

"$PYTHON" - "$OUT" "$DEVICE" <<'EOF'
import json, sys, time
from pathlib import Path

from prefixcap.bench_report import git_revision, machine

out, device = Path(sys.argv[1]), sys.argv[2]
if device == "cuda":
    import torch
    device = torch.cuda.get_device_name()
parts = {}
for line in (out / "parts.tsv").read_text().splitlines():
    name, path, rc, seconds = line.split("\t")
    found = Path(path)
    result = json.loads(found.read_text()) if found.exists() else None
    met = result.get("met") if isinstance(result, dict) else None
    missed = rc == "1" and met is False  # it ran, and measured a miss: a figure, not a failure
    parts[name] = {"exit_code": int(rc), "failed": rc != "0" and not missed, "target_met": met,
                   "seconds": int(seconds), "result": result if rc == "0" or missed else None,
                   "log_tail": None if rc == "0" else (out / f"{name}.log").read_text()[-2000:]}
report = {"benchmark": "gpu_suite", "date": time.strftime("%Y-%m-%d"), "device": device, "machine": machine(),
          "git_revision": git_revision(), "seconds": sum(p["seconds"] for p in parts.values()), "parts": parts}
(out / "gpu_suite.json").write_text(json.dumps(report, indent=2) + "\n")
failed = sum(p["failed"] for p in parts.values())
missed = [name for name, p in parts.items() if p["target_met"] is False]
print(f"wrote {out / 'gpu_suite.json'}: {device}, {report['seconds']} s, {failed} of {len(parts)} parts failed"
      + (f"; targets missed: {', '.join(missed)}" if missed else ""))
sys.exit(1 if failed else 0)
EOF
