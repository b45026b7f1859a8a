#!/usr/bin/env bash
# The command for a lent GPU machine: build, test and benchmark dip_fast on CUDA, and end with a verdict.
#
#   set -o pipefail; bash scripts/gpu_check.sh 2>&1 | tee "$OUT/gpu_check.log"            # first call
#   set -o pipefail; bash scripts/gpu_check.sh --second 2>&1 | tee "$OUT/gpu_check.log"   # second call
#
# A GPU window is about 12 minutes of machine time: the first call (the default
# run) gives a verdict within 540 s, build included; the second, right after it
# on the same warm machine and with no carry (the build is reused), runs what
# did not fit. The stages and their budgets are the PLAN tables below, in the
# order they run. Each stage runs under its own budget (`timeout`), cut to
# what is left of the call's (--budget); a stage that no longer fits is "not
# run", one stopped at its budget is "timeout", and a failing stage does not
# stop the next. Every stage writes its results to $OUT as soon as it ends
# (the step JSON after every size), so a call cut off still returns what it
# measured. The last stage writes the verdict table, verdict.json and
# verdict.md: one row per planned stage with its status (pass, fail,
# timeout, not run), seconds and the figure that matters. The exit status is
# non-zero if a stage failed, timed out, or did not fit.
#
# $OUT receives at most 8 files (the lending tool's limit). First call:
# gpu_check.log (the caller's tee), stages.tsv, build_info.json, cuda-steps.json
# (with the kernel profile), cuda-ops.json, cuda-restore.json, verdict.json,
# verdict.md. Test reports and sanitizer logs go to .cache/gpu_check-work
# (read by the verdict, echoed to the log).
#
# Options:
#   --second          the second call's plan (initcheck, the other CUDA tests, parity)
#   --dry-run         print the plan (stages, budgets, their sum) and exit; runs nothing
#   --cpu-only        walk the plan on this machine: no build (unless --build), --device cpu,
#                     toy sizes, no tuning timings (DIP_FAST_TUNING=off); a stage that needs
#                     CUDA reports "not run"; budgets x CPU_SCALE (default 3)
#   --build           with --cpu-only: run the build stage too
#   --only LIST       comma-separated stages of the plan to run (the others are "not run")
#   --budget SECONDS  the call's budget (default: the plan's, 540 first / 220 second)
#   --data DIR        the sample images (default ../shared/data relative to the repository root):
#                     DIR/dip/denoising/F16_GT.png (restore; parity with snail.jpg and
#                     CBSD68/101085.png) and DIR/dip/sr/zebra_GT.png (parity). A lent machine
#                     gets only the repository: copy them into an ignored folder of it with the
#                     same layout, carry that folder, and pass it here.
#   --image PATH      the restore stage's image (default DIR/dip/denoising/F16_GT.png, else
#                     scikit-image's astronaut)
#   PYTHON=...        interpreter (default python3)
set -uo pipefail

# ----------------------------------------------------------------------------------------------
# The plans: stage, budget in seconds (on the GPU), what it does. Budgets sum to at most the
# call's budget; `--dry-run` prints them, tests/test_gpu_check.py holds them to it.
# ----------------------------------------------------------------------------------------------
PLAN_DEFAULT="
env        10  nvidia-smi -L, torch / CUDA / nvcc versions (.cache/gpu_check-work/env.json)
build      90  pip install --no-build-isolation --no-deps -e . for the visible GPU; build_info.json
optests    50  pytest -m cuda tests/test_ops_*.py (the custom ops' CUDA tests)
optable    55  fused ops vs PyTorch at 512² shapes, fp32 and bf16, NCHW and channels_last (cuda-ops.json)
steps      85  steps at 256² and 512²: reference, reference_default, tuned default, graph TF32, graph bf16
restore    85  restore() with its defaults on F16 at 512² (the reference: its step time x 3000)
profile    25  kernel profile of the graph steps (bf16, TF32) at 512², into cuda-steps.json
memcheck   60  compute-sanitizer memcheck on scripts/cuda_op_driver.py
racecheck  60  compute-sanitizer racecheck on scripts/cuda_op_driver.py
verdict     5  the verdict table (verdict.json, verdict.md)
"
PLAN_SECOND="
env        10  versions again; the build of the first call is reused
initcheck  60  compute-sanitizer initcheck on scripts/cuda_op_driver.py
tests      70  pytest -m cuda tests, less the op tests the first call ran
parity     75  step-mode / precision parity with fp32 eager (parity.json; cut where the budget ends)
verdict     5  the verdict table (verdict.json, verdict.md)
"
BUDGET_DEFAULT=540
BUDGET_SECOND=220
# Stages whose work needs CUDA and has no CPU stand-in: --cpu-only reports them "not run".
NEEDS_CUDA=",build,"
CPU_SCALE="${CPU_SCALE:-3}"

usage() { sed -n '2,/^set -uo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }

MODE=default
CPU_ONLY=0
DO_BUILD=0
DRY_RUN=0
ONLY=""
BUDGET=""
DATA=""
IMAGE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --second) MODE=second ;;
    --dry-run) DRY_RUN=1 ;;
    --cpu-only) CPU_ONLY=1 ;;
    --build) DO_BUILD=1 ;;
    --only) ONLY="${2:?--only needs a list of stages}"; shift ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    --data) DATA="${2:?--data needs a folder}"; shift ;;
    --image) IMAGE="${2:?--image needs a path}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if [ "$MODE" = second ]; then PLAN=$PLAN_SECOND; BUDGET="${BUDGET:-$BUDGET_SECOND}"
else PLAN=$PLAN_DEFAULT; BUDGET="${BUDGET:-$BUDGET_DEFAULT}"; fi
STAGES=()
declare -A STAGE_BUDGET STAGE_WHAT
PLANNED=0
while read -r name secs what; do
  [ -n "$name" ] || continue
  STAGES+=("$name"); STAGE_BUDGET[$name]=$secs; STAGE_WHAT[$name]=$what
  PLANNED=$(( PLANNED + secs ))
done <<< "$PLAN"
PLAN_ARG=$(for s in "${STAGES[@]}"; do printf '%s:%s,' "$s" "${STAGE_BUDGET[$s]}"; done)

print_plan() {
  local i=0 s
  echo "gpu_check plan ($MODE call): ${#STAGES[@]} stages, budgets sum to $PLANNED s of $BUDGET s"
  for s in "${STAGES[@]}"; do
    i=$(( i + 1 ))
    printf '%3d  %-10s %4d s  %s\n' "$i" "$s" "${STAGE_BUDGET[$s]}" "${STAGE_WHAT[$s]}"
  done
  if [ "$CPU_ONLY" = 1 ]; then echo "--cpu-only: each stage may take ${CPU_SCALE}x its budget on the CPU"; fi
}

if [ "$DRY_RUN" = 1 ]; then print_plan; exit 0; fi
if [ "$PLANNED" -gt "$BUDGET" ]; then
  echo "the $MODE plan's budgets sum to $PLANNED s, over the call's $BUDGET s" >&2
  exit 2
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-$REPO/.cache/gpu_check}"
WORK="$REPO/.cache/gpu_check-work"
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="$REPO/.cache/inductor"

DATA="${DATA:-$REPO/../shared/data}"
if [ -z "$IMAGE" ]; then
  if [ -f "$DATA/dip/denoising/F16_GT.png" ]; then IMAGE="$DATA/dip/denoising/F16_GT.png"; else IMAGE=astronaut; fi
fi
ZEBRA="$DATA/dip/sr/zebra_GT.png"
# Issue-17 parity set: three shared photographs of different content, 256x256 crops.
PARITY_IMAGES="$DATA/dip/denoising/F16_GT.png $DATA/dip/denoising/snail.jpg $DATA/CBSD68/101085.png"

if [ "$CPU_ONLY" = 1 ]; then
  DEVICE=cpu
  BUDGET=$(( BUDGET * CPU_SCALE ))
  STEP_SIZES="64"            # the network's smallest working size
  # One call per sample and every repetition kept: the dry run checks the plumbing, not the times.
  STEP_ARGS="--repeats 3 --max-repeats 3 --clean-tol 1000 --warmup 1 --min-sample-s 0"
  OP_ARGS="--op-size 64 --op-filter ^bn_act/down1.{2}channels_last.{2}bf16|^upsample_cat/level0$ --copy-mib 16"
  OP_ARGS="$OP_ARGS --repeats 3 --clean-tol 1000 --warmup 1"
  RESTORE_ARGS="--size 64 --iterations 3 --device cpu"
  PROFILE_ARGS="--sizes 64 --rounds 1 --warmup 1"
  PARITY_IMAGES="$DATA/dip/denoising/F16_GT.png"  # one image: the pairing, not the statistics
  PARITY_CROP=64
  PARITY_ITERS="--iterations 3"
  PARITY_MODES="${PARITY_MODES:-fp32:eager bf16:eager}"
  SR_MODES="fp32:eager"
  # The dry run walks the tuned code paths without timing candidates on a shared CPU.
  export DIP_FAST_TUNING=off
else
  DEVICE=cuda
  STEP_SIZES="256 512"
  # Warm-up 5: a graph step's 3 eager steps, its capture and first-replay check, then one replay that
  # sets the calls per sample (cuDNN's benchmark mode also picks its algorithms in the warm-up).
  STEP_ARGS="--repeats 7 --warmup 5 --min-sample-s 0.1"
  # 26 op cases (bn_act and upsample_cat in two dtypes and two layouts, Lanczos x4 and x8).
  OP_ARGS="--op-size 512 --repeats 7 --warmup 3 --min-sample-s 0.05"
  RESTORE_ARGS="--size 512"
  PROFILE_ARGS="--sizes 512 --rounds 5"
  PARITY_CROP=256
  PARITY_ITERS=""  # the preset's step count
  PARITY_MODES="${PARITY_MODES:-fp32:eager fp32:graph tf32:graph bf16:graph}"
  SR_MODES="fp32:graph bf16:graph"
fi

START=$(date +%s)
FAILED=0
printf 'stage\tstatus\trc\tseconds\tbudget\tnote\n' > "$OUT/stages.tsv"

record() {  # record STAGE STATUS RC SECONDS BUDGET NOTE
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$OUT/stages.tsv"
}

# run_stage NAME: run stage_NAME under its budget (cut to what is left of the call's, less the
# verdict's), and record its status.
run_stage() {
  local name=$1 want budget left t0 rc status note=""
  want=${STAGE_BUDGET[$name]}
  [ "$CPU_ONLY" = 1 ] && want=$(( want * CPU_SCALE ))
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    echo "=== $name: not run (not in --only) ==="
    record "$name" "not run" - 0 "$want" "not in --only"
    return
  fi
  if [ "$CPU_ONLY" = 1 ] && [[ "$NEEDS_CUDA" == *",$name,"* ]] && ! { [ "$name" = build ] && [ "$DO_BUILD" = 1 ]; }; then
    echo "=== $name: not run (needs CUDA; --cpu-only) ==="
    record "$name" "not run" - 0 "$want" "needs CUDA (--cpu-only)"
    return
  fi
  left=$(( BUDGET - ($(date +%s) - START) - ${STAGE_BUDGET[verdict]} ))
  budget=$(( want < left ? want : left ))
  if [ "$budget" -lt "$want" ] && [ "$budget" -lt 15 ]; then  # too little left for the stage to say anything
    echo "=== $name: not run, $left s left of the call's budget ==="
    record "$name" "not run" - 0 "$want" "budget spent ($left s left)"
    FAILED=1
    return
  fi
  echo
  echo "=== $name (budget ${budget} s, $(( $(date +%s) - START )) s elapsed): ${STAGE_WHAT[$name]} ==="
  t0=$(date +%s)
  # timeout runs programs, not shell functions: the (exported) function runs in a child bash.
  STAGE_LIMIT=$budget timeout --kill-after=10 "$budget" bash -c "stage_$name"
  rc=$?
  case $rc in
    0) status=pass ;;
    124|137) status=timeout; note="stopped at its ${budget} s budget"; FAILED=1 ;;
    *) status=fail; note="exit status $rc"; FAILED=1 ;;
  esac
  [ "$DEVICE" = cpu ] && [ "$status" = pass ] && note="CPU dry run"
  record "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$budget" "$note"
  echo "=== $name: $status ($(( $(date +%s) - t0 )) s) ==="
}

# ----------------------------------------------------------------------------------------------
# The stages, one function each (run by run_stage in a child bash: everything they read is exported)
# ----------------------------------------------------------------------------------------------
# shellcheck disable=SC2329  # the stage_* functions run through run_stage

stage_env() {
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
  "$PYTHON" - "$WORK/env.json" <<'EOF'
import datetime, json, os, platform, subprocess, sys
import torch
env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
       "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
       "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "cudnn": torch.backends.cudnn.version(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
       "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None),
       "cores": os.cpu_count()}
print(json.dumps(env))
json.dump(env, open(sys.argv[1], "w"), indent=1)
EOF
}

stage_build() {
  # TORCH_CUDA_ARCH_LIST deliberately unset: setup.py then builds for the visible GPU only.
  env -u TORCH_CUDA_ARCH_LIST MAX_JOBS="$(nproc)" "$PYTHON" -m pip install --no-build-isolation --no-deps -e . || return
  "$PYTHON" - "$OUT/build_info.json" <<'EOF'
import json, sys
import dip_fast
info = dip_fast.build_info()
print(json.dumps(info, indent=1, default=str))
json.dump(info, open(sys.argv[1], "w"), indent=1, default=str)
sys.exit(0 if info.get("extension_loaded") else "the extension did not load")
EOF
}

stage_optests() {
  # shellcheck disable=SC2046  # the op test files, as separate arguments
  "$PYTHON" -m pytest -q -m cuda $(ls tests/test_ops_*.py) --tb=short -rfE -p no:cacheprovider \
    --junitxml="$WORK/optests.xml"
}

stage_optable() {
  # shellcheck disable=SC2086  # OP_ARGS holds separate options (arrays do not survive export)
  "$PYTHON" bench/compare.py --device "$DEVICE" --no-steps --op-dtypes fp32 bf16 $OP_ARGS \
    --out "$OUT/$DEVICE-ops.json" --no-markdown
}

stage_steps() {
  # shellcheck disable=SC2086  # STEP_SIZES and STEP_ARGS hold separate words
  "$PYTHON" bench/compare.py --device "$DEVICE" --sizes $STEP_SIZES $STEP_ARGS --no-ops --no-compile --no-probe \
    --variants reference reference_default fast_graph_tf32 fast_graph_bf16 --tuned \
    --out "$OUT/$DEVICE-steps.json" --no-markdown
}

stage_restore() {
  # max_time is a safety net only: a run that would overrun the stage stops with what it has.
  # shellcheck disable=SC2086  # RESTORE_ARGS holds separate options
  "$PYTHON" bench/restore_defaults.py "$IMAGE" $RESTORE_ARGS --max-time $(( STAGE_LIMIT > 40 ? STAGE_LIMIT - 20 : STAGE_LIMIT / 2 )) \
    --steps-json "$OUT/$DEVICE-steps.json" --out "$OUT/$DEVICE-restore.json"
}

stage_profile() {
  # Its own file would be a ninth in $OUT: the profile joins the steps JSON.
  # shellcheck disable=SC2086  # PROFILE_ARGS holds separate options
  "$PYTHON" bench/step_profile.py --device "$DEVICE" $PROFILE_ARGS --merge-into "$OUT/$DEVICE-steps.json"
}

# sanitize TOOL: compute-sanitizer TOOL on the op driver (every op forward and backward, small odd
# shapes, pads 0/1/3, NCHW / channels_last / misaligned, fp32 and bf16). On the CPU: the driver alone.
sanitize() {
  local tool=$1 cuda_home sanitizer="" candidate
  set -o pipefail  # the tool's status, not tee's (a child bash does not inherit the option)
  if [ "$DEVICE" = cpu ]; then
    echo "--- the $tool workload on the CPU, without the sanitizer"
    "$PYTHON" scripts/cuda_op_driver.py --device cpu --no-reference 2>&1 | tee "$WORK/$tool.log"
    return
  fi
  cuda_home="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /nonexistent/bin/nvcc)")")}"
  sanitizer=$(command -v compute-sanitizer || true)
  for candidate in "$cuda_home/bin/compute-sanitizer" "$cuda_home/compute-sanitizer/compute-sanitizer"; do
    if [ -z "$sanitizer" ] && [ -x "$candidate" ]; then sanitizer=$candidate; fi
  done
  if [ -z "$sanitizer" ]; then
    echo "compute-sanitizer: not found (PATH, $cuda_home)" | tee "$WORK/$tool.log"
    return 1
  fi
  # No caching allocator: each tensor is its own allocation (overruns leave it, new memory is uninitialised).
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 1 --print-limit 20 \
    "$PYTHON" scripts/cuda_op_driver.py --no-reference 2>&1 | tee "$WORK/$tool.log"
}
stage_memcheck() { sanitize memcheck; }
stage_racecheck() { sanitize racecheck; }
stage_initcheck() { sanitize initcheck; }

stage_tests() {
  "$PYTHON" -m pytest -q -m cuda tests --ignore-glob='tests/test_ops_*.py' --tb=long -rfE -p no:cacheprovider \
    --junitxml="$WORK/tests.xml"
}

stage_parity() {
  # Each mode's runs go to a JSON under .cache/parity, kept across calls on one machine: a mode
  # whose file already holds every run is not run again. parity.json is rebuilt after each mode.
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
      # shellcheck disable=SC2086  # PARITY_ITERS holds separate options
      "$PYTHON" bench/quality.py --task denoise --crop "$PARITY_CROP" $PARITY_ITERS --seeds 2 --backends fast \
        --device "$DEVICE" --precision "$prec" --step-mode "$mode" --out "$f" --no-markdown "${images[@]}"
    fi
    merge_parity "$dir"/*.json
  done
  if [ -f "$ZEBRA" ]; then
    for pair in $SR_MODES; do
      prec=${pair%:*}; mode=${pair#*:}
      f="$dir/sr-$prec-$mode.json"
      if ! parity_complete "$f" 1; then
        # shellcheck disable=SC2086  # PARITY_ITERS holds separate options
        "$PYTHON" bench/quality.py --task sr --factor 4 --seeds 1 --backends fast --device "$DEVICE" \
          --crop "$PARITY_CROP" $PARITY_ITERS --precision "$prec" --step-mode "$mode" --out "$f" --no-markdown "$ZEBRA"
      fi
      merge_parity "$dir"/*.json
    done
  fi
}

# parity_complete FILE N: whether FILE holds N runs made on this kind of device.
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

# The verdict always runs, whatever is left of the budget: it only reads what the stages wrote.
verdict() {
  timeout 60 "$PYTHON" scripts/gpu_verdict.py --out "$OUT" --work "$WORK" --plan "$PLAN_ARG" \
    --mode "$MODE$([ "$CPU_ONLY" = 1 ] && echo ', cpu-only')" --device "$DEVICE" --budget "$BUDGET" \
    --elapsed "$(( $(date +%s) - START ))"
}

export PYTHON OUT WORK REPO DEVICE IMAGE ZEBRA STEP_SIZES STEP_ARGS OP_ARGS RESTORE_ARGS PROFILE_ARGS
export PARITY_IMAGES PARITY_MODES SR_MODES PARITY_CROP PARITY_ITERS
export -f stage_env stage_build stage_optests stage_optable stage_steps stage_restore stage_profile \
  sanitize stage_memcheck stage_racecheck stage_initcheck stage_tests stage_parity parity_complete merge_parity

print_plan
for stage in "${STAGES[@]}"; do
  [ "$stage" = verdict ] && continue
  run_stage "$stage"
done
echo
echo "=== verdict ($(( $(date +%s) - START )) s elapsed) ==="
verdict || FAILED=1
exit "$FAILED"
