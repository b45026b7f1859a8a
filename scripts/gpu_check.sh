#!/usr/bin/env bash
# The single command for a lent GPU machine: build, test and benchmark dip_fast on CUDA.
#
#   set -o pipefail; bash scripts/gpu_check.sh 2>&1 | tee "$OUT/gpu_check.log"
#
# Stages, in order of value, each under its own time budget (`timeout`), all
# under one overall budget (--budget, default 570 s, inside a 10-minute call):
#
#   env      nvidia-smi -L, torch / CUDA / nvcc versions
#   build    pip install --no-build-isolation --no-deps -e .   (TORCH_CUDA_ARCH_LIST unset:
#            setup.py builds for the GPU it sees)
#   kernels  the custom ops first (under 2 minutes, so under 3 with the build): their CUDA
#            tests (pytest -m cuda tests/test_ops_*.py); compute-sanitizer memcheck,
#            racecheck and initcheck on scripts/cuda_op_driver.py (every op forward and
#            backward, small odd shapes, pads 0/1/3, NCHW / channels_last / misaligned,
#            fp32 and bf16); the op table with bandwidth columns (cuda-ops.json, which the
#            ops stage rewrites with its profile)
#   tests    pytest -q -m cuda tests, failures in full
#   steps    bench/compare.py: reference, fast (NCHW and channels_last) eager steps and
#            the fast CUDA-graph steps in fp32, TF32 and bf16, interleaved, at 256, 512,
#            1024, with the card's measured matmul peak (FLOP/s per variant against it)
#   profile  bench/step_profile.py: a kernel-level profile of the CUDA-graph step (bf16 and TF32)
#            at 512 and 256, device time grouped into convolution, bn_act, upsample_cat, loss,
#            Adam and other by kernel name (on the CPU: the eager step's ops), added to the
#            steps JSON under kernel_profile
#   compile  bench/compare.py again with torch.compile(reference) in the rotation
#            (--autotune: compile_autotune, mode max-autotune, beside it); written after each size
#   ops      bench/compare.py --no-steps: fused BN-act, upsample_cat (and Lanczos, if built) vs PyTorch,
#            plus a torch.profiler breakdown of fast and reference steps at the op size
#   e2e      one paper-size restoration, 512x512 denoising, 3000 steps, fast then
#            reference: wall time and PSNR (bench/quality.py; restore() when it exists)
#   summary  a short table of everything above
#
# Not in the default set (name them with --only, e.g. in a second call):
#
#   parity   step-mode / precision parity with eager fp32 (bench/quality.py): denoising
#            256x256 centre crops of three shared images (F16, snail, CBSD68 101085) x 2
#            seeds at the preset's step count, in each of $PARITY_MODES (default fp32:eager
#            fp32:graph tf32:graph bf16:graph), then zebra x4 super-resolution in fp32 and
#            bf16 graph. parity.json gives, per mode, the mean paired PSNR difference to
#            fp32 eager with its standard error (parity: |mean| <= 0.15 dB on the returned,
#            averaged output). About 10 minutes of H200 time in all: runs are kept in
#            .cache/parity (the machine's disk), so a second call finishes a cut-off one.
#   packed   bench/packed.py: images per hour of K = 1, 4, 16 packed networks at 256x256 (log only)
#   earlystop bench/early_stop.py on the F16 image at 512x512: ES-WMV's detected step
#            against the PSNR peak, and the share of the fixed run it takes. Writes
#            early-stop.json.
#
# Every stage writes its results to $OUT as soon as it ends (the JSON files are
# rewritten after every size or run inside a stage), so a run cut off by the
# machine's limit still returns what it measured. A failing stage does not
# stop the next one; the exit status is non-zero if any stage failed.
#
# $OUT receives at most 8 files (the lending tool's limit): gpu_check.log (the
# caller's tee), stages.tsv, build_info.json, cuda-steps.json, cuda-compile.json,
# cuda-ops.json, e2e.json, summary.md.
#
# Options:
#   --cpu-only        run the CPU-capable parts on this machine (no build unless --build,
#                     tiny sizes, --device cpu): a dry run of the script itself
#   --build           with --cpu-only: run the build stage too
#   --autotune        also torch.compile(mode="max-autotune") in the compile stage
#   --image PATH      the e2e image (default ../shared/data/dip/denoising/F16_GT.png
#                     relative to the repository root, else scikit-image's astronaut)
#   --budget SECONDS  overall time budget (default 570; 1200 with --cpu-only)
#   --only LIST       comma-separated stages to run (default env,build,kernels,tests,steps,profile,compile,ops,e2e;
#                     the others: parity, earlystop). A fresh machine needs env,build first.
#   --data DIR        the sample images (default ../shared/data relative to the repository root):
#                     DIR/dip/denoising/F16_GT.png and DIR/dip/sr/zebra_GT.png are used. A lent
#                     machine gets only the repository: copy those two files into an ignored
#                     folder of it with the same layout, carry that folder, and pass it here.
#   PYTHON=...        interpreter (default python3)
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }

CPU_ONLY=0
DO_BUILD=1
AUTOTUNE=()
IMAGE=""
BUDGET=""
ONLY="env,build,kernels,tests,steps,profile,compile,ops,e2e"
DATA=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-only) CPU_ONLY=1 ;;
    --build) DO_BUILD=2 ;;
    --autotune) AUTOTUNE=(--autotune) ;;
    --image) IMAGE="${2:?--image needs a path}"; shift ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    --only) ONLY="${2:?--only needs a list of stages}"; shift ;;
    --data) DATA="${2:?--data needs a folder}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-$REPO/.cache/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Persistent within this machine's life only, but keeps Inductor off the
# system temp dir and lets the compile stage reuse what the steps stage built.
export TORCHINDUCTOR_CACHE_DIR="$REPO/.cache/inductor"

if [ "$CPU_ONLY" = 1 ]; then
  DEVICE=cpu
  BUDGET="${BUDGET:-1200}"
  [ "$DO_BUILD" = 2 ] || DO_BUILD=0
  STEP_SIZES=(64)
  PROFILE_SIZES=(64)
  PROFILE_ROUNDS=2
  COMPILE_SIZES=(64)
  OP_SIZE=64
  PACK_SIZE=64
  E2E_CROP=64
  E2E_ITERS=20
  SR_LIMITS="--crop 64 --iterations 20"
  REPEATS=3
  WARMUP=1
  # The dry run times two small op cases against a small copy: enough to exercise the table.
  KERNEL_OPS_ARGS="--op-filter down1|lanczos/x4 --copy-mib 16 --min-sample-s 0.01"
  PARITY_CROP=64
  PARITY_ITERS="--iterations 5"
else
  DEVICE=cuda
  BUDGET="${BUDGET:-570}"
  STEP_SIZES=(256 512 1024)
  PROFILE_SIZES=(512 256)
  PROFILE_ROUNDS=5
  COMPILE_SIZES=(256 512 1024)
  OP_SIZE=512
  PACK_SIZE=256
  E2E_CROP=512
  E2E_ITERS=3000
  SR_LIMITS=""  # the whole zebra image at the preset's step count
  REPEATS=7
  # cudnn.benchmark autotunes on each shape's first call: keep it out of the calibration.
  WARMUP=3
  KERNEL_OPS_ARGS="--min-sample-s 0.05"
  PARITY_CROP=256
  PARITY_ITERS=""  # the preset's step count
fi

DATA="${DATA:-$REPO/../shared/data}"
if [ -z "$IMAGE" ]; then
  if [ -f "$DATA/dip/denoising/F16_GT.png" ]; then
    IMAGE="$DATA/dip/denoising/F16_GT.png"
  else
    IMAGE=astronaut
  fi
fi
ZEBRA="$DATA/dip/sr/zebra_GT.png"
# Issue-17 parity set: three shared photographs of different content, 256x256 crops.
PARITY_IMAGES="$DATA/dip/denoising/F16_GT.png $DATA/dip/denoising/snail.jpg $DATA/CBSD68/101085.png"
PARITY_MODES="${PARITY_MODES:-fp32:eager fp32:graph tf32:graph bf16:graph}"

START=$(date +%s)
FAILED=0
printf 'stage\trc\tseconds\tbudget\n' > "$OUT/stages.tsv"

# Seconds a stage may take: its own budget, cut to what is left of the overall one.
stage_budget() {
  local want=$1 left
  left=$(( BUDGET - ($(date +%s) - START) - 10 ))
  if [ "$left" -lt "$want" ]; then want=$left; fi
  echo "$want"
}

# run_stage NAME BUDGET CMD...: run CMD under timeout, log its status to stages.tsv.
run_stage() {
  local name=$1 want=$2 budget t0 rc
  shift 2
  case ",$ONLY," in
    *",$name,"*) ;;
    *) return ;;
  esac
  budget=$(stage_budget "$want")
  if [ "$budget" -lt 15 ]; then
    echo "=== $name: skipped, $budget s left of the overall budget ==="
    printf '%s\tskipped\t0\t%s\n' "$name" "$budget" >> "$OUT/stages.tsv"
    FAILED=1
    return
  fi
  echo
  echo "=== $name (budget ${budget} s, $(( $(date +%s) - START )) s elapsed) ==="
  t0=$(date +%s)
  if declare -F "$1" >/dev/null; then
    # timeout runs programs, not shell functions: hand the (exported) function to a child bash.
    timeout --kill-after=15 "$budget" bash -c '"$@"' "$name" "$@"
  else
    timeout --kill-after=15 "$budget" "$@"
  fi
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$budget" >> "$OUT/stages.tsv"
  if [ "$rc" -ne 0 ]; then
    FAILED=1
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      echo "=== $name: stopped at its ${budget} s budget (results so far are in $OUT) ==="
    else
      echo "=== $name: exit status $rc ==="
    fi
  fi
}

# shellcheck disable=SC2329  # run through run_stage (exported, in a child bash)
env_info() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L
    # Read-only query: the clocks and power the card is found at.
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  if command -v nvcc >/dev/null 2>&1; then nvcc --version | tail -n 2; else echo "nvcc: not found"; fi
  echo "cpu: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) cores"
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "gpu available", torch.cuda.is_available())'
}

# shellcheck disable=SC2329  # run through run_stage (exported, in a child bash)
build() {
  # TORCH_CUDA_ARCH_LIST deliberately unset: setup.py then builds for the visible GPU only.
  env -u TORCH_CUDA_ARCH_LIST MAX_JOBS="$(nproc)" "$PYTHON" -m pip install --no-build-isolation --no-deps -e . || return
  "$PYTHON" - "$OUT/build_info.json" <<'EOF'
import json, sys
import dip_fast
info = dip_fast.build_info()
print(json.dumps(info, indent=1, default=str))
with open(sys.argv[1], "w") as fh:
    json.dump(info, fh, indent=1, default=str)
if not info.get("extension_loaded"):
    sys.exit("the extension did not load")
EOF
}

# The custom ops' checks, each part under its own limit so that one hang cannot eat the rest.
# shellcheck disable=SC2329  # run through run_stage (exported, in a child bash)
kernels() {
  local rc=0 sanitizer="" cuda_home
  sanitize() {
    echo "--- compute-sanitizer $1"
    # No caching allocator: each tensor is its own allocation (overruns leave it, new memory is uninitialised).
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 "$sanitizer" --tool "$1" --error-exitcode 1 --print-limit 20 \
      "$PYTHON" scripts/cuda_op_driver.py --no-reference
  }
  echo "--- op tests on $DEVICE"
  # shellcheck disable=SC2046  # the op test files, as separate arguments
  timeout 60 "$PYTHON" -m pytest -q -m cuda $(ls tests/test_ops_*.py) --tb=short -rfE -p no:cacheprovider || rc=1
  if [ "$DEVICE" = cuda ]; then
    cuda_home="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /nonexistent/bin/nvcc)")")}"
    sanitizer=$(command -v compute-sanitizer || true)
    for candidate in "$cuda_home/bin/compute-sanitizer" "$cuda_home/compute-sanitizer/compute-sanitizer"; do
      if [ -z "$sanitizer" ] && [ -x "$candidate" ]; then sanitizer=$candidate; fi
    done
    if [ -z "$sanitizer" ]; then
      echo "compute-sanitizer: not found (PATH, $cuda_home)"
      rc=1
    else
      sanitize memcheck || rc=1
      sanitize racecheck || rc=1
    fi
  else
    echo "--- op driver on the CPU (what the sanitizers run on a GPU)"
    timeout 120 "$PYTHON" scripts/cuda_op_driver.py --device cpu || rc=1
  fi
  echo "--- op bandwidth table"
  # shellcheck disable=SC2086  # KERNEL_OPS_ARGS holds separate options (arrays do not survive export)
  timeout 120 "$PYTHON" bench/compare.py --device "$DEVICE" --no-steps --op-size "$OP_SIZE" --repeats 5 \
    --warmup "$WARMUP" $KERNEL_OPS_ARGS --out "$OUT/$DEVICE-ops.json" --no-markdown || rc=1
  # Last, so that a stage cut at its budget loses the check the issue did not ask for.
  if [ -n "$sanitizer" ]; then sanitize initcheck || rc=1; fi
  return "$rc"
}

# shellcheck disable=SC2329  # run through run_stage (exported, in a child bash)
parity() {
  # Each mode's runs go to a JSON under .cache/parity, kept across calls on one machine: a mode
  # whose file already holds every run is not run again. One folder per device and settings, so
  # that only comparable runs are paired. parity.json is rebuilt after each mode.
  local dir pair prec mode f images=() img
  dir="$REPO/.cache/parity/$DEVICE-crop$PARITY_CROP-$(echo "${PARITY_ITERS:-preset}" | tr -dc 'a-z0-9')"
  mkdir -p "$dir"
  for img in $PARITY_IMAGES; do [ -f "$img" ] && images+=("$img"); done
  if [ "${#images[@]}" -eq 0 ]; then
    echo "parity: none of the images found ($PARITY_IMAGES); pass --data"
    return 1
  fi
  for pair in $PARITY_MODES; do
    prec=${pair%:*}; mode=${pair#*:}
    f="$dir/denoise-$prec-$mode.json"
    if ! parity_complete "$f" $(( ${#images[@]} * 2 )); then
      # shellcheck disable=SC2086  # PARITY_ITERS holds separate options (arrays do not survive export)
      "$PYTHON" bench/quality.py --task denoise --crop "$PARITY_CROP" $PARITY_ITERS --seeds 2 --backends fast \
        --device "$DEVICE" --precision "$prec" --step-mode "$mode" --out "$f" --no-markdown "${images[@]}"
    fi
    merge_parity "$dir"/*.json
  done
  if [ -f "$ZEBRA" ]; then
    for pair in fp32:graph bf16:graph; do
      prec=${pair%:*}; mode=${pair#*:}
      f="$dir/sr-$prec-$mode.json"
      if ! parity_complete "$f" 1; then
        # shellcheck disable=SC2086  # SR_LIMITS holds separate options (arrays do not survive export)
        "$PYTHON" bench/quality.py --task sr --factor 4 --seeds 1 --backends fast --device "$DEVICE" \
          $SR_LIMITS --precision "$prec" --step-mode "$mode" --out "$f" --no-markdown "$ZEBRA"
      fi
      merge_parity "$dir"/*.json
    done
  fi
}

# parity_complete FILE N: whether FILE holds N runs made on this kind of device.
# shellcheck disable=SC2329  # called by parity
parity_complete() {
  [ -f "$1" ] && "$PYTHON" - "$1" "$2" "$DEVICE" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
# quality.py records the GPU's name or "cpu" as the device.
same_kind = (r["environment"].get("device") == "cpu") == (sys.argv[3] == "cpu")
sys.exit(0 if same_kind and len(r["runs"]) >= int(sys.argv[2]) else 1)
EOF
}

# The paired comparison: each mode's runs against fp32 eager's on the same image and seed.
# shellcheck disable=SC2329  # called by parity
merge_parity() {
  [ -e "$1" ] || return 0
  "$PYTHON" - "$OUT/parity.json" "$@" <<'EOF'
import json, math, statistics, sys

TOL_DB = 0.15
runs = [json.load(open(p)) for p in sys.argv[2:]]
base = next((r for r in runs if (r["config"]["task"], r["config"]["precision"], r["config"]["step_mode"])
             == ("denoise", "fp32", "eager")), None)
paired = []
for r in runs:
    c = r["config"]
    if base is None or r is base or c["task"] != "denoise" or c["crop"] != base["config"]["crop"]:
        continue
    ref = {(x["image"], x["seed"]): x for x in base["runs"] if x["backend"] == "fast"}
    entry = {"precision": c["precision"], "step_mode": c["step_mode"], "crop": c["crop"]}
    for key in ("psnr", "psnr_avg", "wall_s"):
        d = [x[key] - ref[(x["image"], x["seed"])][key] for x in r["runs"]
             if (x["image"], x["seed"]) in ref and key in x]
        if d:
            se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
            entry[key] = {"mean": statistics.mean(d), "se": se, "n": len(d)}
    # The returned image is the exponential average where the preset keeps one.
    judged = entry.get("psnr_avg") or entry.get("psnr")
    entry["parity"] = bool(judged and abs(judged["mean"]) <= TOL_DB)
    paired.append(entry)
json.dump({"schema": "dip_fast-gpu-parity/2", "baseline": "denoise fp32 eager", "tolerance_db": TOL_DB,
           "paired": paired, "runs": runs}, open(sys.argv[1], "w"), indent=1)
for r in runs:
    c, s = r["config"], r["summary"]["backends"]["fast"]
    avg = s.get("psnr_avg", s["psnr"])["mean"]
    print(f"{c['task']:8s} {c['precision']:5s} {c['step_mode']:6s}: {len(r['runs'])} runs, "
          f"PSNR {s['psnr']['mean']:.2f} dB, avg {avg:.2f} dB, {s['wall_s']['mean']:.1f} s per run")
for e in paired:
    cells = ", ".join(f"{k} {e[k]['mean']:+.3f} +- {e[k]['se']:.3f} (n={e[k]['n']})"
                      for k in ("psnr", "psnr_avg", "wall_s") if k in e)
    print(f"vs fp32 eager: {e['precision']} {e['step_mode']}: {cells}: {'parity' if e['parity'] else 'NO parity'}")
EOF
}

# shellcheck disable=SC2329  # run through run_stage (exported, in a child bash)
earlystop() {
  "$PYTHON" bench/early_stop.py --crop "$E2E_CROP" --iterations "$E2E_ITERS" --device "$DEVICE" \
    --out "$OUT/early-stop.json" "$IMAGE"
}

summary() {
  "$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
lines = []

def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else None

def r(d, key):
    x = d.get("speedup", {}).get(key)
    return f"{x['median']:.2f}x" if x else "-"

def ms(d, key):
    v = d.get("median_s", {}).get(key)
    return f"{v * 1e3:.2f}" if v else "-"

for name in ("cuda-steps.json", "cuda-compile.json", "cpu-steps.json", "cpu-compile.json"):
    res = load(name)
    if not res or not res.get("steps"):
        continue
    env = res["environment"]
    if env.get("device") != "cpu":  # the GPU table: every variant, its speed-ups and FLOP rate
        sys.path.insert(0, "bench")
        import compare
        lines += [f"### {name}: {env.get('gpu')}, torch {env['torch']}, commit {env['commit']}", ""]
        lines += compare._render_device_steps(res)
        continue
    lines += [f"### {name}: {env.get('gpu') or env.get('cpu_model')}, torch {env['torch']}, commit {env['commit']}", "",
              "| size | fast ms | fast_cl ms | ref ms | compile ms | ref/fast | ref/fast_cl | compile/fast | compile/fast_cl | conv bound / best fast |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for size, d in res["steps"].items():
        b = d.get("conv_bound")
        eff = f"{b['efficiency'] * 100:.0f}%" if b else "-"
        lines.append(f"| {size} | {ms(d, 'fast')} | {ms(d, 'fast_cl')} | {ms(d, 'reference')} | {ms(d, 'compile')} | "
                     f"{r(d, 'reference/fast')} | {r(d, 'reference/fast_cl')} | {r(d, 'compile/fast')} | {r(d, 'compile/fast_cl')} | {eff} |")
    lines.append("")
for name in ("cuda-steps.json", "cpu-steps.json"):
    res = load(name)
    if res and res.get("kernel_profile", {}).get("sizes"):
        sys.path.insert(0, "bench")
        import step_profile  # the category table, as step_profile.py prints it
        lines += [f"### {name}: kernel_profile", ""] + step_profile.render(res["kernel_profile"]) + [""]
for name in ("cuda-ops.json", "cpu-ops.json"):
    res = load(name)
    if not res or not res.get("ops"):
        continue
    sys.path.insert(0, "bench")
    import compare  # the op table with its bandwidth columns, as compare.py prints it
    lines += [f"### {name} (shapes of a {res['ops']['image_size']}² image)", ""] + compare._render_ops(res["ops"])
    lines += [""] + [f"Not measured: {n}" for n in res["ops"].get("notes", [])] + [""]
res = load("e2e.json")
if res and res.get("runs"):
    cfg = res["config"]
    lines += [f"### e2e: {cfg['task']} {cfg['iterations']} steps, {', '.join(cfg['images'])} crop {cfg['crop']}, via {cfg.get('via', 'solve')}", "",
              "| backend | wall s | PSNR dB | PSNR avg dB | SSIM |", "|---|---|---|---|---|"]
    for run in res["runs"]:
        avg = f"{run['psnr_avg']:.2f}" if "psnr_avg" in run else "-"
        lines.append(f"| {run['backend']} | {run['wall_s']:.1f} | {run['psnr']:.2f} | {avg} | {run['ssim']:.4f} |")
    lines.append("")
text = "\n".join(lines) if lines else "no results to summarise\n"
(out / "summary.md").write_text(text + "\n")
print(text)
EOF
}

export PYTHON OUT
export IMAGE ZEBRA DEVICE E2E_CROP E2E_ITERS SR_LIMITS OP_SIZE WARMUP KERNEL_OPS_ARGS
export REPO PARITY_IMAGES PARITY_MODES PARITY_CROP PARITY_ITERS
export -f env_info build kernels parity parity_complete merge_parity earlystop

# Whether dip_fast.restore exists in this checkout (the e2e stage prefers it).
VIA=solve
if "$PYTHON" -c 'import dip_fast, sys; sys.exit(0 if hasattr(dip_fast, "restore") else 1)' 2>/dev/null; then
  VIA=restore
fi

run_stage env 60 env_info
if [ "$DO_BUILD" != 0 ]; then
  run_stage build 200 build
  # The first import check above ran before the build; ask again now.
  if "$PYTHON" -c 'import dip_fast, sys; sys.exit(0 if hasattr(dip_fast, "restore") else 1)' 2>/dev/null; then VIA=restore; fi
else
  echo "=== build: skipped (--cpu-only without --build); would run: pip install --no-build-isolation --no-deps -e . ==="
  printf 'build\tskipped\t0\t0\n' >> "$OUT/stages.tsv"
fi
run_stage kernels 130 kernels
run_stage tests 120 "$PYTHON" -m pytest -q -m cuda tests --tb=long -rfE -p no:cacheprovider
run_stage steps 150 "$PYTHON" bench/compare.py --device "$DEVICE" --sizes "${STEP_SIZES[@]}" --no-compile \
  --no-ops --repeats "$REPEATS" --warmup "$WARMUP" --out "$OUT/$DEVICE-steps.json" --no-markdown
# Its own file would be a ninth in $OUT: the profile joins the steps JSON.
run_stage profile 90 "$PYTHON" bench/step_profile.py --device "$DEVICE" --sizes "${PROFILE_SIZES[@]}" \
  --rounds "$PROFILE_ROUNDS" --merge-into "$OUT/$DEVICE-steps.json"
run_stage compile 200 "$PYTHON" bench/compare.py --device "$DEVICE" --sizes "${COMPILE_SIZES[@]}" \
  --compile-sizes "${COMPILE_SIZES[@]}" "${AUTOTUNE[@]}" --no-ops --repeats "$REPEATS" --warmup "$WARMUP" \
  --out "$OUT/$DEVICE-compile.json" --no-markdown
# 10 op cases (both layouts, upsample_cat, Lanczos) with up to 4 variants: 0.1 s samples keep it near 40 s.
run_stage ops 90 "$PYTHON" bench/compare.py --device "$DEVICE" --no-steps --op-size "$OP_SIZE" \
  --repeats "$REPEATS" --warmup "$WARMUP" --min-sample-s 0.1 --profile --profile-size "$OP_SIZE" \
  --out "$OUT/$DEVICE-ops.json" --no-markdown
# Packed networks (#16): images per hour against K; the table goes to the log (no file: $OUT is full).
run_stage packed 60 "$PYTHON" bench/packed.py --device "$DEVICE" --size "$PACK_SIZE" --ks 1 4 16 --steps 20 \
  --rounds 3
run_stage parity 560 parity
run_stage earlystop 300 earlystop
run_stage e2e 200 "$PYTHON" bench/quality.py --task denoise --crop "$E2E_CROP" --iterations "$E2E_ITERS" \
  --seeds 1 --device "$DEVICE" --via "$VIA" --out "$OUT/e2e.json" --no-markdown "$IMAGE"
echo
echo "=== summary ($(( $(date +%s) - START )) s elapsed) ==="
summary
echo
cat "$OUT/stages.tsv"
exit "$FAILED"
