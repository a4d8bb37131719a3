"""The passkey retrieval test of the Landmark Attention paper: prompt, scoring, report.

The prompt, as in the paper: a task description, filler sentences repeated, the line
"The pass key is N. Remember it. N is the pass key." at a random depth, more filler,
and "What is the pass key? The pass key is". N is a random integer in [1, 50000].
Everything random comes from `seed`, so each trial can be reproduced. The grid of
lengths x trials x methods is run by passkey_run.py; its records are summarised here
into a table and a plot.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from landmark_cli.errors import LandmarkError

METHODS = ("landmark", "full", "truncate")  # passkey_run.py says what each is
TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"


def needle_line(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


@dataclass
class Case:
    seed: int
    passkey: int
    depth: float  # where the needle sits, as a fraction of the filler
    document: str  # task + filler + needle + filler + newline (what gets cached)
    question: str  # the final question (the suffix)

    @property
    def prompt(self) -> str:
        return self.document + self.question


SENTENCES = [x + "." for x in FILLER.rstrip(".").split(". ")]  # FILLER's sentences, to fine-tune lengths


def build(n_filler: int, seed: int, extra: int = 0) -> Case:
    """A passkey prompt with `n_filler` filler repetitions, plus `extra` (< 5) of its sentences
    at the end (fine-tunes the length; the needle's place depends on n_filler and seed only)."""
    rng = random.Random(seed)
    key = rng.randint(1, 50000)
    before = rng.randint(0, n_filler)
    after = " ".join([FILLER] * (n_filler - before) + SENTENCES[:extra])
    lines = [TASK, " ".join([FILLER] * before), needle_line(key), after]
    return Case(seed=seed, passkey=key, depth=before / max(n_filler, 1),
                document="\n".join(lines) + "\n", question=QUESTION)


def filler_only(n_filler: int) -> str:
    """A document with no needle (task + filler): every prompt of about this length starts
    like it up to its needle, so its reading can be shared (Engine.read's `prefix`)."""
    return TASK + "\n" + " ".join([FILLER] * n_filler) + "\n"


def prompt_tokens(tokenizer, case: Case) -> int:
    """Tokens of the prompt as the benchmark feeds it: document and question encoded apart."""
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (case.document, case.question))


def build_for_tokens(tokenizer, n_tokens: int, seed: int) -> Case:
    """A passkey prompt whose length in `tokenizer` tokens is as close to `n_tokens` as whole
    filler sentences allow (a few tokens: within 1% from about 500 tokens up)."""
    def count(c: Case) -> int:
        return prompt_tokens(tokenizer, c)

    base = count(build(0, seed))
    per = len(tokenizer(" " + FILLER, add_special_tokens=False)["input_ids"]) / len(SENTENCES)
    target = max(0, round((n_tokens - base) / per))  # in filler sentences
    best: tuple[int, Case] | None = None
    for _ in range(4):  # corrections absorb tokenizer merges at sentence joins
        n_filler, extra = divmod(target, len(SENTENCES))
        case = build(n_filler, seed, extra)
        got = count(case)
        if best is None or abs(got - n_tokens) < abs(best[0] - n_tokens):
            best = got, case
        step = round((n_tokens - got) / per)
        if step == 0:
            break
        target = max(0, target + step)
    assert best is not None  # the loop runs at least once
    return best[1]


_INT = re.compile(r"\d+")


def parse_answer(text: str) -> int | None:
    """The first integer in the model's answer (digits may be split by spaces or commas)."""
    m = _INT.search(text.replace(",", ""))
    return int(m.group()) if m else None


def parse_length(text: str) -> int:
    """Tokens: '32000' -> 32000; binary suffixes like context sizes: '2k' -> 2048, '1m' -> 1048576."""
    t = text.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    num = t[:-1] if mult > 1 else t
    try:
        value = float(num) * mult
    except ValueError:
        raise ValueError(f"not a length: {text!r} (examples: 2k, 32000, 1m)") from None
    if value < 1:
        raise ValueError(f"length must be positive: {text!r}")
    return int(value)


def parse_lengths(text: str) -> list[int]:
    """'2k,8k' -> [2048, 8192], as a user error when malformed."""
    try:
        return [parse_length(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise LandmarkError(str(e), "--lengths takes comma-separated token counts, e.g. 2k,8k,32000") from None


def length_label(n: int) -> str:
    for suffix, unit in (("m", 1 << 20), ("k", 1 << 10)):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return f"{n:,}"


# ---- report -------------------------------------------------------------------------------
def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(records: list[dict]) -> list[dict]:
    """One row per (length, method), by length then in METHODS order."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["length"], r["method"]), []).append(r)
    rows = []
    for (length, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], METHODS.index(kv[0][1]))):
        ran = [r for r in rs if not r.get("error")]
        tokens = _mean([r["tokens"] for r in rs])
        rss = [r["peak_rss_mib"] for r in ran if r.get("peak_rss_mib") is not None]
        rows.append({"length": length, "method": method, "trials": len(rs), "correct": sum(r["correct"] for r in rs),
                     "refused": len(rs) - len(ran), "accuracy": sum(r["correct"] for r in rs) / len(rs),
                     "tokens": None if tokens is None else round(tokens),
                     "retrieved_per_step": _mean([r["retrieved_per_step"] for r in ran]),
                     "read_tok_s": _mean([r["read_tok_s"] for r in ran]),
                     "answer_s": _mean([r["answer_s"] for r in ran]),
                     "peak_rss_mib": max(rss) if rss else None,
                     "error": next((r["error"] for r in rs if r.get("error")), None)})
    return rows


MEASURES = "accuracy\nattended per step\nreading speed\nanswer latency\npeak RSS"


def _cell(row: dict) -> str:
    head = f"{row['accuracy']:.0%} ({row['correct']}/{row['trials']})"
    if row["refused"] == row["trials"]:
        return f"{head}\n[dim]refused: {row['error']}[/dim]"
    lines = [head, f"{row['retrieved_per_step']:,.0f} tokens", f"{row['read_tok_s']:,.0f} tok/s",
             f"{row['answer_s']:.1f} s", f"{row['peak_rss_mib'] / 1024:.2f} GiB"]
    if row["refused"]:
        lines[0] += f" [dim]{row['refused']} refused[/dim]"
    return "\n".join(lines)


def table(records: list[dict], title: str = "Passkey retrieval"):
    """A rich Table: rows = lengths, one column per method, each cell: accuracy (correct/trials),
    mean tokens attended per step, mean reading speed, mean answer latency (question + answer
    tokens), the largest peak RSS of a trial."""
    from rich.table import Table

    rows = summarize(records)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    t = Table(title=title, show_lines=True)
    t.add_column("length", justify="right")
    t.add_column("", style="dim")
    for m in methods:
        k = {(r["top_k"], r["block"]) for r in records if r["method"] == m and "top_k" in r}
        t.add_column(m + "".join(f"\n[dim]k={a}, block {b}[/dim]" for a, b in sorted(k)), max_width=32)
    for length in sorted({r["length"] for r in rows}):
        by = {r["method"]: r for r in rows if r["length"] == length}
        tokens = max(r["tokens"] for r in by.values())
        t.add_row(f"{length_label(length)}\n[dim]{tokens:,} tok[/dim]", MEASURES,
                  *(_cell(by[m]) if m in by else "" for m in methods))
    return t


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LandmarkError("--plot needs matplotlib, which is not installed",
                            "pip install 'landmark[plot]' (or: pip install matplotlib)") from None


def plot(records: list[dict], path, title: str = "Passkey retrieval", context: int | None = None) -> None:
    """Accuracy versus length (log2 axis), one line per method; refused trials count as failures.
    `context`: the model's context, marked with a vertical line."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(records)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    styles = {"landmark": ("-", "o", 9), "full": ("--", "s", 6), "truncate": (":", "^", 5)}  # overlaps stay visible
    for m in METHODS:
        pts = [(r["length"], 100 * r["accuracy"]) for r in rows if r["method"] == m]
        if pts:
            line, marker, size = styles[m]
            ax.plot(*zip(*pts, strict=True), linestyle=line, marker=marker, markersize=size, label=m)
    lengths = sorted({r["length"] for r in rows})
    if context:
        ax.axvline(context, color="gray", linewidth=0.8, linestyle="-.")
        ax.annotate("model's context", (context, 50), rotation=90, ha="right", va="center", color="gray",
                    fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [length_label(n) for n in lengths])
    ax.minorticks_off()
    ax.set_ylim(-5, 105)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
