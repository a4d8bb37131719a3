"""The passkey grid: every (length, trial, method) on the same prompts, in a resumable JSON file.

Methods, each given the same prompt for a (length, seed):
  landmark  our block retrieval with the given Settings;
  full      exact full causal attention over the whole prompt (the engine with every block
            retrieved and an fp32 store); beyond the model's context it is refused, and
            recorded as a failure with the reason;
  truncate  full attention over the end of the prompt that fits the context (the question
            is kept, the start of the document dropped): what a plain run of the model sees.
            It keeps context - 543 document tokens (7,649 of 8,192), so that the engine
            reads them in 512-token chunks, twice as fast as closer to the context.

The results file holds the run's metadata and one record per trial. It is rewritten
atomically after every trial; run the same command again and the trials already there
(same method, length and seed) are skipped, so a long grid can be run in parts.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from landmark_cli.bench import passkey
from landmark_cli.bench.passkey import METHODS
from landmark_cli.errors import LandmarkError
from landmark_cli.model.loading import LoadedModel
from landmark_cli.paths import home
from landmark_cli.prompts import Prompt, raw_prompt
from landmark_cli.retrieval.engine import Engine
from landmark_cli.retrieval.settings import Answering, Reading, Settings, effective_settings
from landmark_cli.storage import store

MAX_NEW_TOKENS = 8  # " 12345." is at most 7 tokens in the tokenizers we know
FORMAT = 1  # version of the results file
MIN_LENGTH = 512  # whole filler sentences reach any length above this within 1%


# ---- exact full attention through the engine ---------------------------------------------
def full_settings(n_tokens: int, context: int, reserve: int = 64) -> Settings:
    """Settings under which the engine IS full causal attention on an n_tokens document
    followed by `reserve` more tokens (question + answer): every block retrieved, in order,
    from an fp32 store (the invariant tests/test_engine.py checks).

    Blocks are covered when sink + k*block + window >= n_tokens, and the engine needs
    sink + k*block + window + chunk <= context, so the chunk shrinks near the context.
    A trained landmark model runs here as the plain LLaMA it is (no landmark tokens)."""
    block, sink = 32, 64
    window = min(1024, context // 4 // block * block)
    chunk = min(512, (context - n_tokens - block + 1) // block * block)
    if n_tokens + reserve > context:
        raise LandmarkError(f"{n_tokens:,} + {reserve} tokens (prompt + answer) exceed the model's context of "
                            f"{context:,} tokens")
    if chunk < sink:
        raise LandmarkError(f"{n_tokens:,} tokens leave too little of the model's context of {context:,} tokens "
                            f"for exact full attention (at most {full_capacity(context, reserve, sink):,})")
    top_k = (context - sink - window - chunk) // block
    return Settings(Reading(block=block, sink=sink, window=window, chunk=chunk, kv_dtype="float32", top_k=top_k),
                    Answering(select="layer", window=window, top_k=top_k), landmarks="free")


def full_capacity(context: int, reserve: int, chunk: int = 512) -> int:
    """The longest document full_settings reads in chunks of at least `chunk` tokens before
    `reserve` more: about context - chunk. Smaller chunks reach closer to the context (64:
    context - 95) but read more slowly, a step being a smaller matrix product."""
    return min(context - reserve, context - chunk - 31)


# ---- the results file -------------------------------------------------------------------
def _json(x):
    """x as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(x))


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        import psutil

        mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        mem_gib = None
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "memory_gib": mem_gib,
            "gpu": gpu, "torch": torch.__version__, "python": platform.python_version()}


def grid_meta(lm: LoadedModel, settings: Settings, max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """What must match for trials of two runs to be comparable: the settings the landmark
    method really runs with (a trained landmark model adjusts them)."""
    effective = effective_settings(lm, settings)[0]
    answering = {(f"answer_{k}" if k in ("window", "top_k") else k): v for k, v in asdict(effective.answer).items()}
    landmark = {**asdict(effective.read), **answering, "landmarks": effective.landmarks}
    if lm.landmark is None:
        landmark.pop("landmarks")  # means nothing without trained landmarks (and older files lack it)
    return _json({"format": FORMAT, "benchmark": "passkey",
                  "model": {"name": lm.name, "fingerprint": lm.fingerprint, "context": lm.model.cfg.context},
                  "settings": {"landmark": landmark, "max_new_tokens": max_new_tokens}})


def _difference(theirs: dict, ours: dict) -> str:
    """What differs between two grid_meta dicts, in words."""
    if theirs["format"] != ours["format"]:
        return f"another file format (version {theirs['format']}; this version writes {ours['format']})"
    if theirs["model"] != ours["model"]:
        t, o = theirs["model"], ours["model"]
        return (f"another model: {t.get('name')!r} ({t.get('fingerprint')}); "
                f"this run: {o['name']!r} ({o['fingerprint']})")

    def flat(m: dict) -> dict:
        return {**m["settings"]["landmark"], "max_new_tokens": m["settings"]["max_new_tokens"]}

    t, o = flat(theirs), flat(ours)
    diff = ", ".join(f"{k}={t.get(k)} (this run: {o.get(k)})" for k in sorted(set(t) | set(o)) if t.get(k) != o.get(k))
    return f"other settings: {diff}"


class Results:
    """The records of a grid, kept in `path` (if any) with the metadata of every run."""

    def __init__(self, path: Path | None, meta: dict, device: str = "cpu"):
        self.path, self.meta, self.records = path, dict(meta), []
        self.runs: list[dict] = []
        if path is not None and path.exists():
            try:
                old = json.loads(path.read_text())
                theirs = {k: old[k] for k in ("format", "benchmark", "model", "settings")}
                self.runs, self.records = list(old["runs"]), list(old["records"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise LandmarkError(f"{path} is not a passkey results file ({type(e).__name__}: {e})",
                                    "pass another --json file") from None
            if theirs != meta:
                raise LandmarkError(f"{path} was made with {_difference(theirs, meta)}",
                                    "use the same --model, --top-k and --block-size to add to it, "
                                    "or another --json file")
        self.run = len(self.runs)
        self.runs.append({"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "device": device, "machine": machine(), "argv": sys.argv[1:]})

    def done(self) -> set[tuple[str, int, int]]:
        return {(r["method"], r["length"], r["seed"]) for r in self.records}

    def add(self, record: dict) -> None:
        self.records.append({**record, "run": self.run})
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        data = {**self.meta, "runs": self.runs, "records": self.records}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        os.replace(tmp, self.path)


# ---- peak memory of one trial -------------------------------------------------------------
def _reset_peak_rss() -> None:
    try:  # Linux: "5" resets the peak RSS (VmHWM) of the process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # since the start: KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


# ---- the grid ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Trial:
    method: str
    length: int  # the target prompt length in tokens
    seed: int


@dataclass
class Grid:
    lengths: list[int]
    trials: int
    methods: list[str]
    seed: int = 0  # trial i of every length uses seed + i

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise LandmarkError(f"unknown method {', '.join(bad) or '(none)'}", f"choose from {', '.join(METHODS)}")
        if self.trials < 0:
            raise LandmarkError("--trials must be >= 0")
        short = [n for n in self.lengths if n < MIN_LENGTH]
        if short or not self.lengths:
            raise LandmarkError(f"lengths must be at least {MIN_LENGTH} tokens (got {short or 'none'})",
                                "e.g. --lengths 2k,8k")

    def trial_list(self) -> list[Trial]:
        return [Trial(m, n, self.seed + i) for n in self.lengths for i in range(self.trials) for m in self.methods]


class Listener:
    """What the grid reports while it runs (the CLI draws it; no-ops here)."""

    def begin(self, pending: list[Trial], context: int, recorded: int) -> None: ...
    def start(self, trial: Trial, tokens: int) -> None: ...
    def reading(self, done: int, total: int) -> None: ...
    def prefix(self, length: int, tokens: int) -> None: ...
    def done(self, record: dict) -> None: ...


def _timed_answer(eng: Engine, ids: list[int], suffix: list[int], lm: LoadedModel, max_new: int,
                  listener: Listener, prefix: store.Entry | None = None) -> dict:
    reused = eng.shared_prefix(prefix, ids) if prefix is not None else 0
    t0 = time.perf_counter()
    entry, _ = eng.read(ids, None, listener.reading, prefix=prefix)
    read_s = time.perf_counter() - t0
    ans = eng.answer(entry, suffix, max_new_tokens=max_new, stop_ids=lm.stop_ids())
    return {"answer": ans.text.strip(), "read_tokens": len(ids), "reused_tokens": reused,
            "read_s": round(read_s, 3), "read_tok_s": round((len(ids) - reused) / read_s, 1),
            "answer_s": round(ans.answer_s, 3), "first_token_s": round(ans.first_token_s, 3),
            "retrieved_per_step": ans.retrieved_per_step}


class SharedPrefixes:
    """Per length, the filler-only document read once per set of settings (in the scratch
    folder): a trial then reads only from the reading chunk that holds its needle on; the
    chunks before are copied, and the stored state is the same as reading everything
    (tests/test_engine.py checks it). Saves half the reading on average."""

    def __init__(self, lm: LoadedModel, listener: Listener):
        self.lm, self.listener = lm, listener
        self.length: int | None = None
        self.entries: dict[Settings, tuple[Path, store.Entry]] = {}

    def get(self, length: int, settings: Settings, case: passkey.Case) -> store.Entry:
        if length != self.length:
            self.close()
            self.length = length
        if settings not in self.entries:
            doc = passkey.filler_only(case.document.count(passkey.FILLER) + 1)
            ids = raw_prompt(self.lm.tokenizer, "", doc, "").ids
            root = Path(tempfile.mkdtemp(prefix=f"passkey-{os.getpid()}-prefix-", dir=_scratch()))
            self.listener.prefix(length, len(ids))
            entry, _ = Engine(self.lm, settings, root=root).read(ids, None, self.listener.reading)
            self.entries[settings] = root, entry
        return self.entries[settings][1]

    def close(self) -> None:
        for root, _ in self.entries.values():
            shutil.rmtree(root, ignore_errors=True)
        self.entries.clear()


def run_trial(lm: LoadedModel, settings: Settings, trial: Trial, case: passkey.Case, p: Prompt,
              max_new: int = MAX_NEW_TOKENS, listener: Listener | None = None,
              shared: SharedPrefixes | None = None) -> dict:
    """One method on one prompt -> its record. The KV store lives in a temporary directory
    removed afterwards (a 128k-token prompt takes 3 GB with the default model)."""
    if listener is None:
        listener = Listener()
    context, reserve = lm.model.cfg.context, len(p.suffix) + max_new
    tokens = len(p.ids) + len(p.suffix)
    rec = {"method": trial.method, "length": trial.length, "tokens": tokens, "seed": trial.seed,
           "depth": round(case.depth, 4), "expected": case.passkey, "answer": None, "correct": False,
           "read_tokens": None, "reused_tokens": 0, "read_s": None, "read_tok_s": None, "answer_s": None,
           "first_token_s": None,
           "retrieved_per_step": None, "peak_rss_mib": None, "error": None}
    if trial.method == "landmark":
        reading = effective_settings(lm, settings)[0].read
        rec.update(top_k=reading.top_k, block=reading.block)
    ids = p.ids
    if trial.method == "truncate":
        keep = min(len(ids), full_capacity(context, reserve))
        ids = ids[len(ids) - keep:]
        rec["dropped"] = len(p.ids) - keep
    try:
        s = settings if trial.method == "landmark" else full_settings(len(ids), context, reserve)
    except LandmarkError as e:
        rec["error"] = e.message
        listener.start(trial, 0)
        return rec
    prefix = shared.get(trial.length, s, case) if shared is not None and trial.method != "truncate" else None
    listener.start(trial, len(ids))
    root = Path(tempfile.mkdtemp(prefix=f"passkey-{os.getpid()}-", dir=_scratch()))
    try:
        _reset_peak_rss()
        answered = _timed_answer(Engine(lm, s, root=root), ids, p.suffix, lm, max_new, listener, prefix)
        rec.update(answered)
        rec["peak_rss_mib"] = _peak_rss_mib()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rec["correct"] = passkey.parse_answer(answered["answer"]) == case.passkey
    return rec


def _scratch() -> Path:
    """LANDMARK_HOME/passkey-tmp, without the leftovers of killed runs."""
    d = home() / "passkey-tmp"
    d.mkdir(parents=True, exist_ok=True)
    for p in d.iterdir():
        try:
            pid = int(p.name.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass
    return d


def run_grid(lm: LoadedModel, settings: Settings, grid: Grid, results: Results,
             listener: Listener | None = None, max_new: int = MAX_NEW_TOKENS, share_prefix: bool = True) -> list[dict]:
    """Run the trials of `grid` not yet in `results`, saving after each; return all records.

    share_prefix: read each length's filler-only prefix once and every trial from its needle
    on (SharedPrefixes); the results are the same, the reading time about half."""
    if listener is None:
        listener = Listener()
    context = lm.model.cfg.context
    if "landmark" in grid.methods:
        Engine(lm, settings)  # refuses settings that do not fit the context, before any work
    done = results.done()
    pending = [t for t in grid.trial_list() if (t.method, t.length, t.seed) not in done]
    listener.begin(pending, context, len(grid.trial_list()) - len(pending))
    cases: dict[tuple[int, int], tuple[passkey.Case, Prompt]] = {}
    shared = SharedPrefixes(lm, listener) if share_prefix else None
    try:
        for t in pending:
            key = (t.length, t.seed)
            if key not in cases:
                cases.clear()  # trials come grouped by (length, seed): keep one prompt
                case = passkey.build_for_tokens(lm.tokenizer, t.length, t.seed)
                cases[key] = case, raw_prompt(lm.tokenizer, "", case.document, case.question)
            rec = run_trial(lm, settings, t, *cases[key], max_new=max_new, listener=listener, shared=shared)
            results.add(rec)
            listener.done(rec)
    finally:
        if shared is not None:
            shared.close()
    return results.records


def passkey_check(model_dir, *, length: int = 2048, trials: int = 2, settings=None, listener=None,
                  progress=lambda s: None):
    """The short passkey retrieval test `landmark recover` runs on the model it wrote: `trials` prompts of `length`
    tokens, landmark method (default Settings unless given). Returns (correct, trials)."""
    from landmark_cli.model.loading import load_model

    lm = load_model(str(model_dir), progress=progress)
    settings = settings or Settings()
    results = Results(None, grid_meta(lm, settings))
    records = run_grid(lm, settings, Grid([length], trials, ["landmark"]), results, listener or Listener(),
                       share_prefix=False)
    return sum(bool(r["correct"]) for r in records), len(records)
