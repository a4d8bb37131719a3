#!/usr/bin/env bash
# shellcheck disable=SC2317  # the step_* functions and the trap handler are called indirectly
# Check the GPU path of landmark in under 10 minutes and print one Markdown table.
#
# usage: benchmarks/gpu_check.sh [-h] [STEP...]
#
# Steps, run in this order (default: all of them); `table` always runs last and builds the
# table from whatever results the results folder holds, so the steps can be split over
# several invocations (e.g. `gpu_check.sh env kernels ask`, then `gpu_check.sh passkey
# finetune bench`). Each step runs under `timeout` with its own limit; a failed step does
# not stop the next one. Limits on cuda (on cpu, in brackets):
#   env       20 s  [60]   GPU name, torch / triton / transformers versions, CUDA available
#   kernels  120 s  [600]  pytest of the two Triton kernels on DEVICE (interpreted on cpu)
#   ask      100 s  [900]  `landmark ask` on examples/lantern_bay.pdf with a cold store, then
#                          cached, then cached with --kernels torch and --kernels triton
#   passkey  135 s  [900]  `landmark passkey` at PASSKEY_LENGTHS, PASSKEY_TRIALS per length
#   finetune  70 s  [600]  a FINETUNE_STEPS-step `landmark finetune` on examples/
#   bench    125 s  [-]    benchmarks/bench_kernels.py (needs CUDA: skipped on cpu)
#   (570 s in all on cuda; at most 600 s with timeout's 5 s kill grace per step)
#
# Environment (all optional):
#   DEVICE      auto | cpu | cuda[:N]  (default: cuda if `nvidia-smi -L` works, else cpu)
#   PYTHON      the interpreter that imports landmark_cli (default python3)
#   LANDMARK    the landmark command (default landmark)
#   RESULTS     results folder (default $OUT, else benchmarks/results/gpu_check)
#   LIMIT_ENV, LIMIT_KERNELS, LIMIT_ASK, LIMIT_PASSKEY, LIMIT_FINETUNE, LIMIT_BENCH: seconds
#   KERNEL_TESTS  the test files of the kernels step (default: tests/test_kernel_retrieval_attention.py
#               tests/test_kernel_landmark_attention.py; e.g. add tests/test_device.py)
#   KERNELS_K   a pytest -k expression for the kernel tests (default: all of them)
#   ASK_ARGS    more options for every `landmark ask`, e.g. "--dtype bfloat16"
#   PASSKEY_LENGTHS (32768,131072; cpu 4096)  PASSKEY_TRIALS (5; cpu 2)
#   PASSKEY_METHODS (the CLI's default: landmark,full,truncate)
#   FINETUNE_STEPS (50; cpu 2)  FINETUNE_CONTEXT (512; cpu 256)  FINETUNE_BATCH (8; cpu 1)
#   FINETUNE_WARMUP (10; cpu 1)
#   BENCH_ARGS  options of bench_kernels.py (default none: the full run, whose T=8192
#               forward and 64-block decode rows are the ones the targets are stated for;
#               --quick times T=2048 and a small decode only)
#   SCRATCH     where the LANDMARK_HOMEs go (default: the results folder; they are removed at
#               the end, but a killed run leaves GBs there: point it elsewhere when the results
#               folder is copied back, e.g. SCRATCH=/tmp/gpu_check)
#   KEEP_SCRATCH=1  keep the LANDMARK_HOMEs (converted model, KV caches) and the checkpoint
#
# Files in the results folder: STEP.status (rc, seconds, limit), STEP.cmd, STEP.log
# (stderr, or all output), STEP.out (stdout), env.json, passkey.json, bench_kernels.json,
# ft/ (the fine-tune's train_state.json) and gpu_check.md (the table).
# Exit status: 0 if every step run in this invocation passed, 1 otherwise, 2 on bad usage.

set -u
export LC_ALL=C  # a '.' in $EPOCHREALTIME and in printf's numbers

ALL_STEPS=(env kernels ask passkey finetune bench)
DOC=examples/lantern_bay.pdf
QUESTION="In what year was the company's first steamer, the Marigold, launched?"

usage() {
    sed -n '3,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

# ---- arguments and settings --------------------------------------------------------------
steps=()
for a in "$@"; do
    case $a in
        -h|--help) usage; exit 0 ;;
        env|kernels|ask|passkey|finetune|bench|table) steps+=("$a") ;;
        *) echo "gpu_check.sh: unknown step '$a' (steps: ${ALL_STEPS[*]} table)" >&2
           echo "usage: benchmarks/gpu_check.sh [-h] [env] [kernels] [ask] [passkey] [finetune] [bench] [table]" >&2
           exit 2 ;;
    esac
done
[[ ${#steps[@]} -eq 0 ]] && steps=("${ALL_STEPS[@]}")

# A command given by a relative path (.venv/bin/python) is resolved before the cd below.
abs_cmd() {
    case $1 in
        /*|"") printf '%s' "$1" ;;
        */*) printf '%s/%s' "$PWD" "$1" ;;
        *) printf '%s' "$1" ;;
    esac
}
PYTHON=$(abs_cmd "${PYTHON:-python3}")
LANDMARK=$(abs_cmd "${LANDMARK:-landmark}")

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
R=${RESULTS:-${OUT:-}}
if [[ -z $R ]]; then
    R=$ROOT/benchmarks/results/gpu_check
elif [[ $R != /* ]]; then
    R=$PWD/$R
fi
mkdir -p "$R" || exit 2
R=$(cd "$R" && pwd)
cd "$ROOT" || exit 2

if [[ -z ${DEVICE:-} || $DEVICE == auto ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=cuda; else DEVICE=cpu; fi
fi
is_cuda() { [[ $DEVICE == cuda* ]]; }

if is_cuda; then
    : "${LIMIT_ENV:=20}" "${LIMIT_KERNELS:=120}" "${LIMIT_ASK:=100}" "${LIMIT_PASSKEY:=135}"
    : "${LIMIT_FINETUNE:=70}" "${LIMIT_BENCH:=125}"
    : "${PASSKEY_LENGTHS:=32768,131072}" "${PASSKEY_TRIALS:=5}"
    : "${FINETUNE_STEPS:=50}" "${FINETUNE_CONTEXT:=512}" "${FINETUNE_BATCH:=8}" "${FINETUNE_WARMUP:=10}"
else
    : "${LIMIT_ENV:=60}" "${LIMIT_KERNELS:=600}" "${LIMIT_ASK:=900}" "${LIMIT_PASSKEY:=900}"
    : "${LIMIT_FINETUNE:=600}" "${LIMIT_BENCH:=60}"
    : "${PASSKEY_LENGTHS:=4096}" "${PASSKEY_TRIALS:=2}"
    : "${FINETUNE_STEPS:=2}" "${FINETUNE_CONTEXT:=256}" "${FINETUNE_BATCH:=1}" "${FINETUNE_WARMUP:=1}"
fi
: "${KERNEL_TESTS:=tests/test_kernel_retrieval_attention.py tests/test_kernel_landmark_attention.py}"
: "${PASSKEY_METHODS:=}" "${KERNELS_K:=}" "${ASK_ARGS:=}" "${BENCH_ARGS:=}" "${KEEP_SCRATCH:=0}"
read -ra ask_extra <<<"$ASK_ARGS"
read -ra bench_extra <<<"$BENCH_ARGS"
SCRATCH=${SCRATCH:-$R}
mkdir -p "$SCRATCH" || exit 2
SCRATCH=$(cd "$SCRATCH" && pwd)
HOME_DIR=$SCRATCH/home  # LANDMARK_HOME of passkey and finetune (the converted default model lives here)
ASK_HOME=$SCRATCH/ask_home  # ask's, fresh at every run of the step (its models/ is HOME_DIR's)

# ---- running one command -----------------------------------------------------------------
CHILD=""
CURRENT=""
failed=0  # set by run() when a command fails
on_signal() {
    trap - INT TERM
    if [[ -n $CHILD ]]; then
        kill -TERM "$CHILD" 2>/dev/null
        wait "$CHILD" 2>/dev/null
    fi
    [[ -n $CURRENT ]] && printf 'rc=interrupted seconds=0 limit=0\n' >"$R/$CURRENT.status"
    echo "gpu_check.sh: interrupted; the table so far:" >&2
    build_table
    exit 130
}
trap on_signal INT TERM

elapsed_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# clear NAME...: forget the results of earlier runs of these parts
clear_results() {
    local n
    for n in "$@"; do rm -f "$R/$n.status" "$R/$n.cmd" "$R/$n.log" "$R/$n.out"; done
}

# skip NAME REASON
skip() { printf 'skipped=%s\n' "$2" >"$R/$1.status"; }

# run NAME LIMIT [--merge] CMD...: CMD under `timeout LIMIT`, stdout to NAME.out and stderr
# to NAME.log (both to NAME.log with --merge); NAME.status gets its exit status and seconds.
run() {
    local name=$1 limit=$2 merge=0 rc t0
    shift 2
    if [[ ${1:-} == --merge ]]; then merge=1; shift; fi
    printf '%q ' "$@" >"$R/$name.cmd"; echo >>"$R/$name.cmd"
    if (( limit < 1 )); then
        printf 'rc=no-time seconds=0 limit=0\n' >"$R/$name.status"
        failed=1
        return 1
    fi
    printf 'rc=running seconds=0 limit=%s\n' "$limit" >"$R/$name.status"
    CURRENT=$name
    t0=$EPOCHREALTIME
    if (( merge )); then
        timeout -k 5 "$limit" "$@" </dev/null >"$R/$name.log" 2>&1 &
    else
        timeout -k 5 "$limit" "$@" </dev/null >"$R/$name.out" 2>"$R/$name.log" &
    fi
    CHILD=$!
    wait "$CHILD"; rc=$?
    CHILD=""
    CURRENT=""
    printf 'rc=%s seconds=%s limit=%s\n' "$rc" "$(elapsed_since "$t0")" "$limit" >"$R/$name.status"
    (( rc == 0 )) || failed=1
    echo "  $name: exit $rc after $(elapsed_since "$t0") s" >&2
    return "$rc"
}

# seconds left of a step that started at $1 with limit $2
left() { awk -v a="$1" -v b="$EPOCHREALTIME" -v l="$2" 'BEGIN { x = int(l - (b - a)); print (x > 0 ? x : 0) }'; }

# ---- the steps -----------------------------------------------------------------------------
ENV_PY=$(cat <<'EOF'
import importlib, json, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(0)
except Exception as e:  # noqa: BLE001
    info["torch"] = f"not importable: {type(e).__name__}: {e}"
for name in ("triton", "transformers", "landmark_cli"):
    try:
        info[name] = getattr(importlib.import_module(name), "__version__", "installed")
    except Exception as e:  # noqa: BLE001
        info[name] = f"not importable: {type(e).__name__}: {e}"
print(json.dumps(info))
EOF
)

step_env() {
    clear_results env
    rm -f "$R/env_gpu.txt" "$R/env_git.txt" "$R/env.json"
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
            >"$R/env_gpu.txt" 2>&1 || echo "no GPU (nvidia-smi failed: $(head -c 200 "$R/env_gpu.txt"))" >"$R/env_gpu.txt"
    else
        echo "no GPU" >"$R/env_gpu.txt"
    fi
    { git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "unknown"
      git -C "$ROOT" status --porcelain 2>/dev/null | wc -l; } >"$R/env_git.txt"
    run env "$LIMIT_ENV" "$PYTHON" -c "$ENV_PY" && cp "$R/env.out" "$R/env.json"
}

step_kernels() {
    clear_results kernels
    local tests
    read -ra tests <<<"$KERNEL_TESTS"
    local args=(-m pytest -q -ra -p no:cacheprovider "${tests[@]}")
    [[ -n $KERNELS_K ]] && args+=(-k "$KERNELS_K")
    if is_cuda; then
        run kernels "$LIMIT_KERNELS" --merge env -u TRITON_INTERPRET LANDMARK_TEST_DEVICE="$DEVICE" \
            "$PYTHON" "${args[@]}"
    else
        run kernels "$LIMIT_KERNELS" --merge env TRITON_INTERPRET=1 LANDMARK_TEST_DEVICE="$DEVICE" \
            "$PYTHON" "${args[@]}"
    fi
}

step_ask() {
    local t0=$EPOCHREALTIME home=$ASK_HOME
    clear_results ask_cold ask_warm ask_torch ask_triton ask_cold_torch
    rm -rf "${home:?}"
    mkdir -p "$home" "$HOME_DIR/models"
    ln -s "$HOME_DIR/models" "$home/models"  # a cold store, but the model converted once
    local cmd=(env LANDMARK_HOME="$home" "$LANDMARK" ask "$DOC" "$QUESTION" --device "$DEVICE" --json
               "${ask_extra[@]}")
    run ask_cold "$(left "$t0" "$LIMIT_ASK")" "${cmd[@]}"
    run ask_warm "$(left "$t0" "$LIMIT_ASK")" "${cmd[@]}"
    run ask_torch "$(left "$t0" "$LIMIT_ASK")" "${cmd[@]}" --kernels torch
    if is_cuda; then
        run ask_triton "$(left "$t0" "$LIMIT_ASK")" "${cmd[@]}" --kernels triton
    else
        skip ask_triton "needs CUDA (device $DEVICE)"
    fi
    rm -rf "${home:?}/store"  # read again, with PyTorch's attention: reading speed of both kernels
    run ask_cold_torch "$(left "$t0" "$LIMIT_ASK")" "${cmd[@]}" --kernels torch
}

step_passkey() {
    clear_results passkey
    rm -f "$R/passkey.json"
    mkdir -p "$HOME_DIR"
    local args=(passkey --lengths "$PASSKEY_LENGTHS" --trials "$PASSKEY_TRIALS" --device "$DEVICE"
                --json "$R/passkey.json")
    [[ -n $PASSKEY_METHODS ]] && args+=(--methods "$PASSKEY_METHODS")
    printf '%s %s %s\n' "$PASSKEY_LENGTHS" "$PASSKEY_TRIALS" "${PASSKEY_METHODS:-landmark,full,truncate}" \
        >"$R/passkey.settings"
    run passkey "$LIMIT_PASSKEY" env LANDMARK_HOME="$HOME_DIR" "$LANDMARK" "${args[@]}"
}

step_finetune() {
    clear_results finetune
    rm -rf "${R:?}/ft"
    mkdir -p "$HOME_DIR"
    run finetune "$LIMIT_FINETUNE" env LANDMARK_HOME="$HOME_DIR" "$LANDMARK" finetune --data examples \
        --out "$R/ft" --steps "$FINETUNE_STEPS" --device "$DEVICE" --context "$FINETUNE_CONTEXT" \
        --batch "$FINETUNE_BATCH" --warmup "$FINETUNE_WARMUP" --save-every "$FINETUNE_STEPS" --restart
    printf '%s %s %s\n' "$FINETUNE_STEPS" "$FINETUNE_CONTEXT" "$FINETUNE_BATCH" >"$R/finetune.settings"
    if [[ $KEEP_SCRATCH != 1 && -d $R/ft ]]; then  # the weights and optimizer state: GBs on a GPU run
        find "$R/ft" -name '*.safetensors' -delete
    fi
}

step_bench() {
    clear_results bench
    rm -f "$R/bench_kernels.json"
    if ! is_cuda; then
        skip bench "needs CUDA (device $DEVICE)"
        return 0
    fi
    local gpu=()  # bench_kernels.py runs on "cuda": cuda:N is made the only visible GPU
    [[ $DEVICE == cuda:* ]] && gpu=(env CUDA_VISIBLE_DEVICES="${DEVICE#cuda:}")
    run bench "$LIMIT_BENCH" "${gpu[@]}" "$PYTHON" benchmarks/bench_kernels.py "${bench_extra[@]}" \
        --json "$R/bench_kernels.json"
}

# ---- the table ---------------------------------------------------------------------------
TABLE_PY=$(cat <<'EOF'
import json, os, re, sys
from pathlib import Path

R, device = Path(sys.argv[1]), sys.argv[2]
rows = []  # (check, value, target, status)


def row(check, value, target="", status=""):
    rows.append(tuple(str(x).replace("|", "\\|").replace("\n", " ") for x in (check, value, target, status)))


def read(name):
    try:
        return (R / name).read_text(errors="replace")
    except OSError:
        return None


def last_line(name, n=110):
    """The log's last line that says something (the error), for the table."""
    text = read(name) or ""
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.startswith("reading:")
             and not re.fullmatch(r"[.FEsxX]+( +\[ *\d+%\])?", l.strip())]
    keep = [l for l in lines if re.search(r"error|Error|MISMATCH|Traceback|No such|Invalid|not supported|"
                                           r"Killed|failed|FAILED", l)]
    line = (keep or lines or [""])[-1]
    line = re.sub(r"[│╭╰─╮╯]+", " ", line).strip()
    line = re.sub(r"\s+", " ", line)
    return line if len(line) <= n else line[: n - 3] + "..."


def status_of(name):
    """(state, info): state is 'not run', 'skipped', 'ok', 'failed'; info a dict or text."""
    text = read(f"{name}.status")
    if text is None:
        return "not run", {}
    if text.startswith("skipped="):
        return "skipped", text.split("=", 1)[1].strip()
    info = dict(kv.split("=", 1) for kv in text.split() if "=" in kv)
    rc = info.get("rc")
    return ("ok" if rc == "0" else "failed"), info


def failure(name):
    """The status cell of a failed part: why, and which log to read."""
    _, info = status_of(name)
    rc = info.get("rc")
    log = f"{name}.log"
    why = {"124": f"timed out after {info.get('limit')} s", "137": f"killed after {info.get('limit')} s",
           "running": "interrupted", "interrupted": "interrupted",
           "no-time": "not started: no time left in the step"}.get(rc, f"exit {rc}")
    tail = last_line(log) if rc not in ("no-time",) else ""
    return f"FAILED: {why} (see {log})" + (f": {tail}" if tail else "")


def secs(name):
    _, info = status_of(name)
    try:
        return float(info.get("seconds"))
    except (TypeError, ValueError):
        return None


def simple(check, name, target=""):
    """A row for a part that is not run, skipped or failed (and nothing to parse); True if ok."""
    state, info = status_of(name)
    if state == "not run":
        row(check, "", target, "not run")
    elif state == "skipped":
        row(check, "", target, f"skipped: {info}")
    elif state == "failed":
        return False
    return state == "ok"


def fmt_s(x):
    return "?" if x is None else f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


# ---- env
gpu = (read("env_gpu.txt") or "").strip()
if not gpu:
    import shutil, subprocess
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip() if shutil.which("nvidia-smi") else ""
    except (OSError, subprocess.SubprocessError):
        gpu = ""
    gpu = gpu or "no GPU"
state, info = status_of("env")
if state in ("not run", "skipped"):
    row("environment", "", "", state)
else:
    try:
        env = json.loads(read("env.json") or read("env.out") or "")
    except ValueError:
        env = None
    if env is None:
        row("environment", "", "", failure("env"))
    else:
        row("GPU (nvidia-smi)", gpu.replace("\n", "; "), "a CUDA GPU" if device.startswith("cuda") else "", "info")
        row("torch / triton / transformers",
            f"{env.get('torch')} / {env.get('triton')} / {env.get('transformers')} (python {env.get('python')})",
            "", "info")
        cuda = env.get("cuda_available")
        value = f"{cuda}" + (f" (CUDA {env.get('torch_cuda')}, {env.get('cuda_device')}, {env.get('capability')})"
                             if cuda else "")
        if device.startswith("cuda"):
            row("torch.cuda.is_available()", value, "True", "ok" if cuda else "FAILED")
        else:
            row("torch.cuda.is_available()", value, f"(device {device})", "info")
        git = (read("env_git.txt") or "unknown\n0").split("\n")
        dirty = int(git[1]) if len(git) > 1 and git[1].strip().isdigit() else 0
        row("code", f"commit {git[0].strip()}" + (f", {dirty} files changed or untracked" if dirty else ""),
            "", "info")

# ---- kernels
target = "0 failed, 0 errors"
state, info = status_of("kernels")
if state in ("not run", "skipped"):
    simple(f"kernel tests ({device})", "kernels", target)
else:
    log = read("kernels.log") or ""
    summary = [l for l in log.splitlines() if re.search(r"\b(passed|failed|error|errors|skipped|deselected|"
                                                        r"no tests ran)\b", l) and " in " in l]
    counts = {}
    if summary:
        for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)",
                                  summary[-1]):
            counts[what.rstrip("s") if what.startswith(("error", "warning")) else what] = int(n)
    if counts:
        value = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("passed", "failed", "skipped"))
    else:  # cut short: count pytest's progress characters
        marks = "".join(l.split(" [")[0] for l in log.splitlines() if re.fullmatch(r"[.FEsxX]+( +\[ *\d+%\])?", l.strip()))
        value = (f"no summary; before it stopped: {marks.count('.')} passed, {marks.count('F')} failed, "
                 f"{marks.count('E')} errors, {marks.count('s')} skipped")
    if counts.get("error"):
        value += f", {counts['error']} errors"
    if counts.get("deselected"):
        value += f", {counts['deselected']} deselected"
    t = re.search(r" in ([\d.]+)s", summary[-1]) if summary else None
    value += f" in {t.group(1)} s" if t else ""
    ok = state == "ok" and counts.get("passed", 0) > 0 and not counts.get("failed") and not counts.get("error")
    status = "ok" if ok else failure("kernels") if state == "failed" else "FAILED (see kernels.log)"
    if ok and counts.get("skipped"):
        reasons = re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", log, re.M)
        status += f" ({counts['skipped']} skipped" + (f", e.g. {reasons[0][:80]}" if reasons else "") + ")"
    row(f"kernel tests (LANDMARK_TEST_DEVICE={device})", value, target, status)


# ---- ask
def ask_json(name):
    for line in reversed((read(f"{name}.out") or "").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None


def runtime(j):
    """What the engine says it ran on ("cuda:0, bfloat16, kernels auto"), if the JSON says."""
    return str(j.get("runtime") or "")


def has_1873(j):
    return "1873" in (j.get("answer") or "")


def answer_cell(j):
    a = " ".join((j.get("answer") or "").split())
    return ("1873 found" if has_1873(j) else "1873 NOT found") + f': "{a[:70]}{"..." if len(a) > 70 else ""}"'


def latency_cell(name, j):
    t = j.get("timings", {})
    parts = [f"answer {fmt_s(t.get('answer_s'))}"]
    if t.get("first_token_s") is not None:
        parts.append(f"first token {fmt_s(t.get('first_token_s'))}")
    n, a, f = j.get("tokens", {}).get("answer"), t.get("answer_s"), t.get("first_token_s")
    if n and n > 1 and a and f is not None and a > f:
        parts.append(f"{n} tokens at {(n - 1) / (a - f):,.1f} tok/s after the first")
    parts.append(f"command {fmt_s(secs(name))} (model load {fmt_s(t.get('load_s'))})")
    rt = runtime(j)
    return ", ".join(parts) + (f"; runtime {rt}" if rt else "")


q_target = "contains 1873"
for name, check in (("ask_cold", "ask, cold store"), ("ask_warm", "ask, cached"),
                    ("ask_torch", "ask, cached, --kernels torch"), ("ask_triton", "ask, cached, --kernels triton"),
                    ("ask_cold_torch", "ask, cold store, --kernels torch")):
    state, info = status_of(name)
    j = ask_json(name) if state in ("ok", "failed") else None
    if state in ("not run", "skipped") or (state == "failed" and j is None):
        if state == "failed":
            row(check, "", q_target, failure(name))
        else:
            simple(check, name, q_target)
        continue
    bad = "" if state == "ok" else failure(name)
    t = j.get("timings", {})
    if name in ("ask_cold", "ask_cold_torch"):
        n, read_s = j.get("tokens", {}).get("document"), t.get("index_s")
        rate = f"{n / read_s:,.0f} tok/s" if n and read_s else "?"
        row(f"{check}: reading", f"{rate} ({n or 0:,} document tokens in {fmt_s(read_s)}; cached "
            f"{j.get('cached')}); " + latency_cell(name, j), "read now (cached False)",
            bad or ("ok" if not j.get("cached") else "UNEXPECTED: the store was not cold"))
        row(f"{check}: answer", answer_cell(j), q_target, bad or ("ok" if has_1873(j) else "WRONG"))
        continue
    value = latency_cell(name, j) + f"; cached {j.get('cached')}; " + answer_cell(j)
    target = "cached True; " + q_target
    status = bad or ("ok" if j.get("cached") and has_1873(j) else "WRONG answer" if not has_1873(j)
                     else "UNEXPECTED: not cached")
    if name == "ask_triton":
        jt = ask_json("ask_torch")
        a, b = t.get("answer_s"), (jt or {}).get("timings", {}).get("answer_s")
        if a and b:
            value = f"{a / b:.2f}x the answer time of --kernels torch; " + value
            target = "at most --kernels torch's answer time; " + target
            if not bad and status == "ok" and a > b:
                status = "SLOWER than torch"
    row(check, value, target, status)

# ---- passkey
state, info = status_of("passkey")
check = "passkey"
try:
    pk = json.loads(read("passkey.json") or "")
except ValueError:
    pk = None
if state in ("not run", "skipped"):
    simple(check, "passkey")
elif not pk or not pk.get("records"):
    row(check, "no trials recorded", "", failure("passkey") if state == "failed" else "FAILED (see passkey.log)")
else:
    groups = {}
    for r in pk["records"]:
        groups.setdefault((r["method"], r["length"]), []).append(r)
    order = {"landmark": 0, "full": 1, "truncate": 2}
    ps = (read("passkey.settings") or "").split()  # lengths, trials, methods asked for
    asked = int(ps[1]) if len(ps) == 3 and ps[1].isdigit() else None
    context = pk.get("model", {}).get("context")
    for (method, length), recs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1])):
        n, ok = len(recs), sum(bool(r.get("correct")) for r in recs)
        errors = [r["error"] for r in recs if r.get("error")]
        ran = [r for r in recs if not r.get("error")]
        label = f"passkey {method}, {length:,} tokens"
        if errors and not ran:
            row(label, f"refused: {errors[0][:90]}", f"refused beyond the model's context ({context:,})"
                if context else "", "n/a")
            continue
        mean = lambda k: sum(r[k] for r in ran if r.get(k) is not None) / max(1, sum(r.get(k) is not None for r in ran))
        value = (f"{ok}/{n} correct; read {mean('read_tok_s'):,.0f} tok/s, answer {fmt_s(mean('answer_s'))}, "
                 f"first token {fmt_s(mean('first_token_s'))}")
        if method == "landmark":
            want = asked or n
            row(label, value, f"{want}/{want} correct", "LOW" if ok < n else "ok" if n >= want else
                f"ok so far ({n} of {want} trials run)")
        else:
            row(label, value, "baseline" if method == "truncate" else "exact attention", "info")
    total = f"{len(pk['records'])} trials in {fmt_s(secs('passkey'))}"
    if len(ps) == 3:
        total = (f"{len(pk['records'])} of {len(ps[0].split(',')) * int(ps[1]) * len(ps[2].split(','))} trials "
                 f"in {fmt_s(secs('passkey'))}")
    row("passkey: whole run", total, f"within {info.get('limit')} s", "ok" if state == "ok" else failure("passkey"))

# ---- finetune
state, info = status_of("finetune")
settings = (read("finetune.settings") or "").split()
check = f"finetune {settings[0]} steps (context {settings[1]}, batch {settings[2]})" if len(settings) == 3 else "finetune"
out = (read("finetune.out") or "") + (read("finetune.log") or "")
m = re.search(r"Trained (\d+) steps in ([\d,.]+)s; loss ([\d.na]+) -> ([\d.na]+)", " ".join(out.split()))
if state in ("not run", "skipped"):
    simple(check, "finetune")
elif m:
    steps_done, s, first, last = m.groups()
    value = f"finished {steps_done} steps in {s} s (command {fmt_s(secs('finetune'))}); loss {first} -> {last} (mean of the last 10)"
    falls = first.replace(".", "").isdigit() and last.replace(".", "").isdigit() and float(last) < float(first)
    row(check, value, "finishes; loss falls", ("ok" if falls else "ok (loss did not fall)") if state == "ok"
        else failure("finetune"))
else:
    losses = None
    try:
        losses = json.loads(read("ft/train_state.json") or "").get("losses")
    except ValueError:
        pass
    value = f"{len(losses)} steps recorded, loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no summary line"
    row(check, value, "finishes; loss falls", failure("finetune") if state == "failed" else "FAILED (see finetune.log)")

# ---- bench
state, info = status_of("bench")
try:
    bench = json.loads(read("bench_kernels.json") or "")
except ValueError:
    bench = None
fwd_target, dec_target = "at most 1.5x SDPA flash at T=8192", "at least 50% of copy bandwidth (K=64x64, L=4096)"
if state in ("not run", "skipped") or (state == "failed" and not bench):
    for c, t in (("landmark_attention forward / SDPA flash", fwd_target),
                 ("retrieval decode T=1, of copy bandwidth", dec_target)):
        if state == "failed":
            row(c, "", t, failure("bench"))
        else:
            simple(c, "bench", t)
elif bench:
    res = {r["name"]: r for r in bench.get("results", [])}
    mm, cp = res.get("bf16 matmul 8192^3"), res.get("device copy 1 GiB")
    if mm and cp:
        row("ceilings", f"bf16 matmul {mm['tflops']:.0f} TFLOP/s, device copy {cp['gbps']:.0f} GB/s",
            "", "info")
    sd = next((r for n, r in res.items() if n.startswith("SDPA flash causal forward")), None)
    t = int(re.search(r"T=(\d+)", sd["name"]).group(1)) if sd else None
    for what, split, target in (("forward", "", fwd_target), ("forward", ", one loop (SPLIT=False)", "(the other launch setting)"),
                                ("backward", "", "(H100 before the loop changes: 2.8x)")):
        r = res.get(f"landmark_attention {what}, block 64{split}")
        base = next((x for n, x in res.items() if n.startswith(f"SDPA flash causal {what}")), None)
        if not r or not base:
            continue
        ratio = r["ms"] / base["ms"]
        value = f"{ratio:.2f}x ({r['ms']:.3f} ms vs {base['ms']:.3f} ms, T={t})"
        if what == "forward" and not split:
            status = ("ok" if ratio <= 1.5 else "NOT MET") if t == 8192 else f"info (T={t}: not the target's T=8192)"
        else:
            status = "info"
        row(f"landmark_attention {what}{split} / SDPA flash", value, target, status)
    dec = [n for n in res if n.startswith("retrieval_attention, T=1 ") or n.startswith("retrieval_attention (CUDA graph), T=1 ")]
    big = max((int(re.search(r"K=(\d+)x", n).group(1)) for n in dec), default=None)
    for n in dec:
        if f"K={big}x" not in n:
            continue
        r = res[n]
        graph = "(CUDA graph)" in n
        shape = re.search(r"K=\S+ L=\d+", n).group(0)
        value = f"{r['of_peak']:.0%} ({r['gbps']:.0f} GB/s, {r['ms'] * 1000:.1f} us, {shape})"
        if big == 64 and not graph:
            status = "ok" if r["of_peak"] >= 0.5 else "NOT MET"
        elif graph:
            status = ("ok" if r["of_peak"] >= 0.5 else "NOT MET") + " (kernel time, without launch waits)"
        else:
            status = f"info ({shape}: not the target's K=64x64 L=4096)"
        row(f"retrieval decode T=1{' (CUDA graph)' if graph else ''}, of copy bandwidth", value, dec_target, status)
    t16 = next((r for n, r in res.items() if n.startswith("retrieval_attention, T=16 ") and f"K={big}x" in n), None)
    if t16 and t16.get("vs_sdpa"):
        row("retrieval T=16 vs SDPA on pre-gathered K/V", f"{t16['vs_sdpa']:.2f}x SDPA's speed",
            "at least 1x (H100: 1.3-1.5x)", "ok" if t16["vs_sdpa"] >= 1 else "SLOWER")
    if state != "ok":
        row("bench_kernels.py", "", "", failure("bench"))

lines = [f"GPU: {gpu.splitlines()[0] if gpu else 'no GPU'} (device {device}; results in {R})", "",
         "| check | value | target/expectation | status |", "|---|---|---|---|"]
lines += [f"| {' | '.join(r)} |" for r in rows]
text = "\n".join(lines) + "\n"
(R / "gpu_check.md").write_text(text)
print(text, end="")
EOF
)

build_table() {
    local py=$PYTHON
    "$py" -c 'import json, re' >/dev/null 2>&1 || py=python3
    timeout 60 "$py" -c "$TABLE_PY" "$R" "$DEVICE"
}

# ---- main --------------------------------------------------------------------------------
echo "gpu_check.sh: device $DEVICE, results in $R, steps: ${steps[*]}" >&2
for s in "${ALL_STEPS[@]}"; do
    for want in "${steps[@]}"; do
        [[ $want == "$s" ]] || continue
        echo "== $s" >&2
        "step_$s"
    done
done
if [[ $KEEP_SCRATCH != 1 ]]; then
    rm -rf "${ASK_HOME:?}" "${HOME_DIR:?}"
fi
echo >&2
build_table || failed=1
exit "$failed"
