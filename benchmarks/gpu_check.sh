#!/usr/bin/env bash
# benchmarks/gpu_check.sh: the GPU paths in one command, on a CUDA machine (no network needed when torch and the
# dependencies are installed; no Hub: the models are random, built from configs).
#
#   bash benchmarks/gpu_check.sh                       # about 8 minutes at most; prints one table at the end
#   GPU_CHECK_BUDGET=300 bash benchmarks/gpu_check.sh  # a shorter overall budget (seconds)
#
# Steps, each under its own timeout inside the overall budget (a hung step cannot eat the rest):
#   1. a CUDA GPU? Without one it says so and exits 0 at once.
#   2. torch: a CUDA build is used as found, never reinstalled; without torch, `pip install torch==2.13.0`.
#   3. the project's dependencies: when some are missing, `pip install -e ".[dev]"` with torch pinned to the
#      installed build; llm2diff itself runs from this checkout (PYTHONPATH), installed or not.
#   4. flash-attn, only from a prebuilt wheel (`--only-binary`); no wheel: skipped with a message.
#   5. `python -m pytest -m gpu` on the test files that hold GPU tests (tests/test_gpu.py, tests/test_backends.py).
#   6. batch-1 generation rows in bfloat16 on a random SmolLM2-shaped model, sdpa and flash_attention_2: the AR
#      parent's generate against the block sampler, verified decoding and lossless mode
#      (`benchmarks/random_model.py generation`).
#   7. the cost of one cached pass over 1-32 new positions, float32 against bfloat16 (`random_model.py passes`).
#   8. the block sampler with the static cache and torch.compile (`random_model.py generation --compile`).
# Logs and JSON rows go to $GPU_CHECK_LOGS (default: $OUT/llm2diff-gpu-check when $OUT is set, else
# /tmp/llm2diff-gpu-check). Exit status: 0 when no step failed (skipped steps do not count), 1 otherwise.
# GPU_CHECK_DRY_RUN=1 runs the same steps on the CPU (a tiny model in float32, no installs, no compile row): a
# check of this script itself on a machine without a GPU.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
DRY=${GPU_CHECK_DRY_RUN:-0}

if [ "$DRY" = 1 ]; then
    echo "gpu_check: dry run on the CPU (GPU_CHECK_DRY_RUN=1): a tiny model in float32, nothing installed."
    DEVICE=cpu SHAPE=tiny DTYPE=float32
elif command -v nvidia-smi >/dev/null 2>&1; then
    if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        echo "gpu_check: no CUDA GPU on this machine (nvidia-smi lists none): nothing to check."
        exit 0
    fi
elif ! compgen -G "/dev/nvidia[0-9]*" >/dev/null; then
    echo "gpu_check: no CUDA GPU on this machine (no nvidia-smi, no /dev/nvidia*): nothing to check."
    exit 0
fi
DEVICE=${DEVICE:-cuda} SHAPE=${SHAPE:-smollm2-135m} DTYPE=${DTYPE:-bfloat16}

BUDGET=${GPU_CHECK_BUDGET:-480}
LOGS=${GPU_CHECK_LOGS:-${OUT:-/tmp}/llm2diff-gpu-check}
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
mkdir -p "$LOGS"
: >"$LOGS/steps.tsv"
rm -f "$LOGS/generation.json" "$LOGS/passes.json" "$LOGS/compiled.json"  # no rows from an earlier run
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
FAILED=0

record() {  # step, result: one row of the final table
    printf '%s\t%s\n' "$1" "$2" >>"$LOGS/steps.tsv"
}

# run_step NAME CAP CMD...: CMD under a timeout of CAP seconds or what is left of the budget, whichever is less;
# its output in $LOGS/NAME.log (the last lines echoed). Sets STEP_RC (124: timed out; "skip": no time left).
run_step() {
    local name=$1 cap=$2 left start
    shift 2
    left=$((BUDGET - SECONDS))
    ((left < cap)) && cap=$left
    if ((cap < 15)); then
        STEP_RC=skip
        echo "== $name: skipped, the ${BUDGET}s budget is spent =="
        return
    fi
    echo "== $name (at most ${cap}s) =="
    start=$SECONDS
    timeout --kill-after=10 "$cap" "$@" >"$LOGS/$name.log" 2>&1
    STEP_RC=$?
    STEP_S=$((SECONDS - start))
    tail -n 30 "$LOGS/$name.log"
}

outcome() {  # a step's result in words, from STEP_RC
    case $STEP_RC in
        0) echo "ok (${STEP_S}s)" ;;
        skip) echo "skipped: no time left in the ${BUDGET}s budget" ;;
        124 | 137) echo "TIMED OUT after ${STEP_S}s (log: $LOGS/$1.log)" ;;
        *) echo "FAILED, exit $STEP_RC after ${STEP_S}s (log: $LOGS/$1.log)" ;;
    esac
}

note_failure() {  # a check that failed or timed out makes the exit status 1
    case $STEP_RC in 0 | skip) ;; *) FAILED=1 ;; esac
}

if [ "$DRY" = 1 ]; then
    record "GPU" "none: dry run on the CPU"
else
    record "GPU" "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
fi

# -- torch --------------------------------------------------------------------------------------------------------
torch_state() {
    "$PY" - <<'EOF' 2>/dev/null || echo "broken"
try:
    import torch
except ImportError:
    print("missing")
else:
    state = "cuda" if torch.cuda.is_available() else ("cpu-build" if torch.version.cuda is None else "no-device")
    print(state, torch.__version__, torch.version.cuda)
EOF
}
read -r STATE TORCH_VERSION TORCH_CUDA <<<"$(torch_state)"
if [ "$STATE" = missing ]; then
    run_step install-torch 240 "$PY" -m pip install --retries 1 --timeout 20 torch==2.13.0
    read -r STATE TORCH_VERSION TORCH_CUDA <<<"$(torch_state)"
fi
[ "$DRY" = 1 ] && [ "$STATE" != missing ] && [ "$STATE" != broken ] && STATE=cuda  # the dry run takes any torch
case $STATE in
    cuda) record "torch" "$TORCH_VERSION (CUDA $TORCH_CUDA), used as found" ;;
    cpu-build)
        echo "gpu_check: torch $TORCH_VERSION is a CPU build and cannot use this GPU. Install a CUDA build, e.g." \
             "pip install --force-reinstall torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128," \
             "and run this again."
        exit 1 ;;
    no-device)
        echo "gpu_check: torch $TORCH_VERSION (CUDA $TORCH_CUDA) sees no GPU although the machine has one: check" \
             "the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, and run this again."
        exit 1 ;;
    *)
        echo "gpu_check: torch could not be installed or imported ($PY -c 'import torch' fails; see" \
             "$LOGS/install-torch.log if an install was tried)."
        exit 1 ;;
esac
printf 'torch==%s\n' "$TORCH_VERSION" >"$LOGS/torch-constraint.txt"  # pip must keep the CUDA build

# -- dependencies ---------------------------------------------------------------------------------------------------
missing_modules() {
    "$PY" -c "import importlib.util as u
print(' '.join(m for m in ('transformers', 'peft', 'trl', 'accelerate', 'datasets', 'safetensors', 'yaml', 'tqdm',
                           'tokenizers', 'pytest') if u.find_spec(m) is None))"
}
MISSING=$(missing_modules)
if [ -z "$MISSING" ]; then
    record "dependencies" "present: nothing installed (llm2diff runs from this checkout)"
elif [ "$DRY" = 1 ]; then
    echo "gpu_check: missing $MISSING (a dry run installs nothing)."
    exit 1
else
    PIP_CONSTRAINT="$LOGS/torch-constraint.txt" run_step install-project 240 \
        "$PY" -m pip install --retries 1 --timeout 20 -e ".[dev]"
    MISSING=$(missing_modules)
    if [ -n "$MISSING" ]; then
        record "dependencies" "MISSING: $MISSING (pip install -e \".[dev]\" failed: no network?)"
        echo "gpu_check: cannot run without $MISSING; install them (pip install -e \".[dev]\") and run this again."
        cat "$LOGS/steps.tsv"
        exit 1
    fi
    record "dependencies" "installed: pip install -e \".[dev]\" ($(outcome install-project))"
fi
record "hardware" "$("$PY" -c "from llm2diff.hardware import describe; print(describe(device='$DEVICE'))" 2>&1 | tail -n 1)"

# -- flash-attn (optional) ------------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
    record "flash-attn" "skipped: dry run"
elif "$PY" -c "import flash_attn" >/dev/null 2>&1; then
    record "flash-attn" "present: $("$PY" -c 'import flash_attn; print(flash_attn.__version__)' 2>&1)"
else
    PIP_CONSTRAINT="$LOGS/torch-constraint.txt" run_step install-flash-attn 90 \
        "$PY" -m pip install --retries 0 --timeout 15 --only-binary=:all: --no-build-isolation flash-attn
    if [ "$STEP_RC" = 0 ] && "$PY" -c "import flash_attn" >/dev/null 2>&1; then
        record "flash-attn" "installed from a prebuilt wheel (${STEP_S}s)"
    else
        "$PY" -m pip uninstall -y flash-attn >/dev/null 2>&1  # a wheel that does not import would fail the tests
        record "flash-attn" "skipped: no prebuilt wheel could be installed (the flash rows and tests skip)"
    fi
fi

# -- tests and tables -----------------------------------------------------------------------------------------------
mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py)
run_step pytest-gpu 240 "$PY" -m pytest -m gpu -rfEs -p no:cacheprovider "${GPU_TESTS[@]}"
SUMMARY=$(grep -E "[0-9]+ (passed|failed|skipped|errors?)|no tests ran" "$LOGS/pytest-gpu.log" 2>/dev/null | tail -n 1)
note_failure
record "pytest -m gpu (${GPU_TESTS[*]})" "$(outcome pytest-gpu); ${SUMMARY:-no summary line}"

run_step generation 150 "$PY" benchmarks/random_model.py generation --device "$DEVICE" --dtype "$DTYPE" \
    --shape "$SHAPE" --attn sdpa,flash_attention_2 --json "$LOGS/generation.json"
note_failure
record "generation rows ($SHAPE, $DTYPE, batch 1)" "$(outcome generation)"

run_step passes 60 "$PY" benchmarks/random_model.py passes --device "$DEVICE" --shape "$SHAPE" --repeats 20 \
    --json "$LOGS/passes.json"
note_failure
record "pass cost (float32, bfloat16)" "$(outcome passes)"

if [ "$DRY" = 1 ]; then
    record "static cache + torch.compile" "skipped: dry run"
else
    run_step compiled 120 "$PY" benchmarks/random_model.py generation --device "$DEVICE" --dtype "$DTYPE" \
        --shape "$SHAPE" --rows "one step per block" --compile --repeats 3 --json "$LOGS/compiled.json"
    note_failure
    record "static cache + torch.compile" "$(outcome compiled)"
fi

record "total" "${SECONDS}s of the ${BUDGET}s budget; logs in $LOGS"

# -- the table ------------------------------------------------------------------------------------------------------
"$PY" - "$LOGS" <<'EOF'
import json, sys
from pathlib import Path

logs = Path(sys.argv[1])


def rows_of(name: str) -> list[list[str]]:
    """The rows a step wrote as JSON, as (check, result) pairs."""
    path = logs / f"{name}.json"
    out = []
    for r in json.loads(path.read_text()) if path.is_file() else []:
        if name == "passes":
            n = r["positions"]
            out.append([f"  pass over {n} new position{'s' if n > 1 else ''}", ", ".join(
                f"{k[:-3]} {v:.2f} ms" for k, v in r.items() if k.endswith("_ms"))])
        elif "error" in r:
            out.append([f"  {r['attn']}: {r['row']}", f"FAILED: {r['error'][:150]}"])
        elif name == "generation" or "compile" in r["row"]:
            note = {True: ", output = parent's", False: ", output differs from the parent's"}.get(
                r.get("identical_to_parent"), "")
            out.append([f"  {r['attn']}: {r['row']}", f"{r['tokens_per_s']:.1f} tokens/s, {r['ratio']:.2f}x the "
                        f"parent, {r['passes_per_token']:.3f} passes/token{note}"])
    return out


steps = {"generation rows": "generation", "pass cost": "passes", "static cache": "compiled"}
print("\n== llm2diff GPU check ==\n\n| check | result |\n|---|---|")
for line in (logs / "steps.tsv").read_text().splitlines():
    check, _, result = line.partition("\t")
    table = [[check, result]] + next((rows_of(n) for prefix, n in steps.items() if check.startswith(prefix)), [])
    for check, result in table:
        print(f"| {check} | {result.replace('|', '/')} |")
EOF
exit $FAILED
