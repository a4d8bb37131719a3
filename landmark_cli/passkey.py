"""The passkey retrieval test of the Landmark Attention paper (prompt, scoring, one trial).

The prompt, as in the paper: a task description, filler sentences repeated, the line
"The pass key is N. Remember it. N is the pass key." at a random depth, more filler,
and "What is the pass key? The pass key is". N is a random integer in [1, 50000].
Everything random comes from `seed`, so each trial can be reproduced.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

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


def build(n_filler: int, seed: int) -> Case:
    """A passkey prompt with `n_filler` filler repetitions."""
    rng = random.Random(seed)
    key = rng.randint(1, 50000)
    before = rng.randint(0, n_filler)
    lines = [TASK, " ".join([FILLER] * before), needle_line(key), " ".join([FILLER] * (n_filler - before))]
    return Case(seed=seed, passkey=key, depth=before / max(n_filler, 1),
                document="\n".join(lines) + "\n", question=QUESTION)


def build_for_tokens(tokenizer, n_tokens: int, seed: int) -> Case:
    """A passkey prompt whose length in `tokenizer` tokens is close to `n_tokens`."""
    count = lambda c: len(tokenizer(c.prompt, add_special_tokens=False)["input_ids"])
    base = count(build(0, seed))
    per = len(tokenizer(" " + FILLER, add_special_tokens=False)["input_ids"])
    n = max(0, (n_tokens - base) // per)
    case = build(n, seed)
    # one correction step absorbs tokenizer merges at sentence joins
    got = count(case)
    if got != n_tokens:
        n = max(0, n + round((n_tokens - got) / per))
        case = build(n, seed)
    return case


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
