"""Trained landmarks end to end: a small LLaMA trained from scratch by `landmark finetune`
on synthetic facts, then asked about facts in documents far longer than its context.

    python experiments/trained_facts.py                   # the default plan (RECIPE): a local first layer, 3 stages
    python experiments/trained_facts.py --stage 2000:3e-3 --stage 2000:2e-3:gap=12   # far facts in the second stage
    python experiments/trained_facts.py --local-layers 0 --heads 2 --kv-heads 2 --stage 2500:3e-3
                                                          # the paper's layout, one stage (fails at 8k)
    python experiments/trained_facts.py --stage 40:3e-3 --docs 1  # a quick smoke run
    python experiments/trained_facts.py --eval-only /tmp/landmark-trained-facts/model --tokens 200
                                                          # ask again, about shorter documents

Steps: (1) write a training corpus of short "documents" in which a fact ("The code of
Tavor is 48.", stated 1-3 times) sits among filler sentences and a question about it
follows ("Question: What is the code of Tavor?\nAnswer: The code of Tavor is 48."), in
the prompt layout that `landmark ask` uses for models without a chat template (Style:
--train-facts, --repeats, --code-only, --filler, --numbers: filler sentences carrying
numbers from the codes' range, which the long documents then carry too, --parts: numbers
per code, --gap: filler sentences always between the facts and the questions); (2) build
a word-level tokenizer over the corpora (every name and every code one token) and write a
randomly initialised LLaMA;
(3) `landmark finetune` it at a short context (--local-layers 1: a first layer that reads
only its own and the previous block, so that it cannot copy a far fact by position;
--local-blocks 0 or the stage key local_blocks=0: its own block only),
once per --stage STEPS:LR[:KEY=VALUE,...], each stage from the previous one's checkpoint
with a fresh warm-up and cosine schedule, on documents of its own style: gap=N puts every
fact at least N filler sentences before its question, a lookup only the deeper layer's
landmarks can make; facts=MIN-MAX puts several facts in a document, each asked, so that
a block holding another fact's code must be told apart from the right one; filler=N
writes 0..N filler sentences; numbers=F makes a share F of them carry a number (the
long documents' filler stays as --numbers says); until=F ends the stage early, as soon as
the model writes the code for a share F of 24 probe prompts whose fact lies in the
query's own or previous block (near_lookup, checked every 25 steps); loss_on=MARKER
trains on the text after MARKER only (finetune --loss-on; "Answer:": the answers). The
default plan (RECIPE): near facts, ending once the near lookup appears (until=0.5), then
the same documents with the first layer reading its own block only and the loss on the
answers only, in two runs (2e-3, then 1e-3).
Training documents are one file each, so that finetune puts
its end-of-text token between them; (4) build long documents (8k tokens by
default) each holding --facts facts at random depths, the same names paired with codes
drawn afresh, and ask `landmark ask` about every fact; (5) the same questions with the
same model without retrieval, truncated to its training context (the last tokens of
the prompt, full grouped attention): the baseline.
Results go to experiments/results/trained_facts_cpu.json (trained_facts_cuda.json with
--device cuda: training on the GPU, asking on the CPU); --json names another file.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from landmark_cli.prompts import INSTRUCTION  # noqa: E402

FILLER = [
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    "The river runs to the sea.", "A cold wind blows from the north.", "The market opens at dawn.",
    "Birds sing in the old oak tree.", "The road winds over the hill.", "Rain falls on the quiet town.",
    "The baker lights the oven early.", "Boats rest in the harbour.", "The clock in the square is slow.",
    "Children play by the fountain.", "The lamp burns until midnight.", "Snow covers the far mountains.",
    "The ferry leaves every hour.", "A dog sleeps by the door.", "The library is closed on Sunday.",
]
# Filler that carries a number from the codes' range: with these in the documents,
# "copy the number in sight" is wrong; the model has to find the number that follows
# "The code of X is". Used with Style.numbers > 0.
NUMBERED = [
    "The ferry leaves every {} minutes.", "Room {} is on the left.", "The bus {} stops by the bridge.",
    "We walked {} miles today.", "The baker sold {} loaves.", "There are {} boats in the harbour.",
    "The tower has {} steps.", "Train {} leaves from the east platform.", "The old map shows {} wells.",
    "The choir has {} voices.",
]
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "st", "tr"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["", "n", "r", "l", "s", "m", "th", "x"]


CODES = (10, 99)  # a code is 1 or more two-digit numbers, one token each (chance: 1 in 90 per number)


def code(rng: random.Random, parts: int = 1) -> str:
    return " ".join(str(rng.randint(*CODES)) for _ in range(parts))


def names(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < n:
        w = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(2)) + rng.choice(CODAS)
        out.add(w.capitalize())
    shuffled = sorted(out)
    rng.shuffle(shuffled)
    return shuffled


def fact(name: str, code: str) -> str:
    return f"The code of {name} is {code}."


def question(name: str) -> str:
    return f"What is the code of {name}?"


def answer(name: str, code: str, restate: bool) -> str:
    return f" {fact(name, code)}" if restate else f" {code}."


@dataclass(frozen=True)
class Style:
    """How the training documents are written. The defaults are the ones a small model
    learns from on a CPU budget (experiments/lookup_probe.py): one fact per document,
    stated 1-3 times (each restatement is one more lookup to learn from), answered with
    the fact restated ("The code of X is N."), whose code then follows the same words as
    in the document. With several facts per document the model must also match the
    name: not learned within 20 CPU minutes (experiments/README.md)."""

    facts: tuple[int, int] = (1, 1)  # facts per document, min-max
    repeats: int = 3  # each fact stated 1..repeats times
    restate: bool = True  # answers restate the fact; else the code alone
    filler: int = 30  # 0..filler filler sentences per document (about 6 tokens each)
    numbers: float = 0.0  # share of filler sentences that carry a number (NUMBERED)
    parts: int = 1  # numbers per code ("48" or "48 17 ..."): with more than one, copying a code is a
    # sequence to follow, which a first layer cannot do alone
    gap: int = 0  # at least this many filler sentences between a fact and the questions (about 6
    # tokens each: 12 keep the fact out of the question's own and previous block of 31 + landmark)


def filler_sentences(rng: random.Random, n: int, numbers: float) -> list[str]:
    return [rng.choice(NUMBERED).format(code(rng)) if rng.random() < numbers else rng.choice(FILLER)
            for _ in range(n)]


def training_document(rng: random.Random, pool: list[str], style: Style = Style()) -> str:
    """One short training document: its facts among 0-`filler` filler sentences, then a question
    about each, answered. A code is random, so the only way to predict an answer (or a
    restated fact's code) is to find the fact in the document."""
    chosen = rng.sample(pool, rng.randint(*style.facts))
    codes = {n: code(rng, style.parts) for n in chosen}
    sentences = filler_sentences(rng, rng.randint(style.gap, max(style.gap, style.filler)), style.numbers)
    for n in chosen:
        for _ in range(rng.randint(1, style.repeats)):
            sentences.insert(rng.randint(0, len(sentences) - style.gap), fact(n, codes[n]))
    qa = "".join(f"\n\nQuestion: {question(n)}\nAnswer:{answer(n, codes[n], style.restate)}"
                 for n in rng.sample(chosen, len(chosen)))
    return f"{INSTRUCTION}\n\nDocument:\n{' '.join(sentences)}{qa}\n\n"


def write_corpus(folder: Path, n_docs: int, seed: int, pool: list[str], style: Style = Style()) -> None:
    """n_docs training documents, one file each (doc00000.txt ...), so that `landmark
    finetune` puts its end-of-text token between them, as lookup_probe.py does."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.txt"):
        old.unlink()
    for i in range(n_docs):
        (folder / f"doc{i:05d}.txt").write_text(training_document(rng, pool, style))


@dataclass(frozen=True)
class Stage:
    """One `landmark finetune` run of a training plan: `steps` steps at peak rate `lr`,
    starting from the previous stage's checkpoint, on documents written in the command
    line's style except where the stage says otherwise (STAGE_KEYS; None: as the style):
    `gap`, facts at least that many filler sentences before their questions; `facts`,
    facts per document (min, max); `filler`, 0..N filler sentences per document;
    `numbers`, the share of filler sentences that carry a number (distractors); and three
    training keys (TRAIN_KEYS): `local_blocks`, the earlier blocks the local layers read in
    this stage (None: --local-blocks); `loss_on`, finetune's marker of the text to train on
    ("Answer:": the answers only; "": every token; None: --loss-on); `until`, end the stage
    early, as soon as the model writes the code for that share of the near-lookup probe
    (near_lookup), checked every PROBE_EVERY steps."""

    steps: int
    lr: float
    gap: int | None = None
    facts: tuple[int, int] | None = None
    filler: int | None = None
    numbers: float | None = None
    local_blocks: int | None = None
    loss_on: str | None = None
    until: float | None = None

    @classmethod
    def parse(cls, text: str) -> "Stage":
        """'2000:3e-3' or '2000:2e-3:gap=12,facts=1-3' (argparse type)."""
        steps, _, rest = text.partition(":")
        lr, _, options = rest.partition(":")
        try:
            changes = {}
            for item in filter(None, options.split(",")):
                key, eq, value = item.partition("=")
                if key not in ALL_STAGE_KEYS or not eq:
                    raise ValueError
                changes[key] = ALL_STAGE_KEYS[key](value)
            st = cls(int(steps), float(lr), **changes)
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(
                f"expected STEPS:LR[:KEY=VALUE,...] with keys {', '.join(ALL_STAGE_KEYS)} (facts: N or "
                f"MIN-MAX), got {text!r}") from None
        if (st.steps < 1 or st.lr <= 0 or min(st.gap or 0, st.filler or 0) < 0 or not 0 <= (st.numbers or 0) <= 1
                or st.local_blocks not in (None, 0, 1) or (st.until is not None and not 0 < st.until <= 1)):
            raise argparse.ArgumentTypeError(f"steps and lr must be positive, gap and filler at least 0, numbers "
                                             f"in [0, 1], local_blocks 0 or 1, until in (0, 1]: {text!r}")
        return st

    def __str__(self) -> str:
        """As --stage reads it: '2000:0.002:gap=12,facts=1-3'."""
        changes = ",".join(f"{k}={option_text(v)}" for k in ALL_STAGE_KEYS
                           if (v := getattr(self, k)) is not None)
        return f"{self.steps}:{self.lr:g}" + (f":{changes}" if changes else "")

    def resolve(self, style: "Style", local_blocks: int, loss_on: str = "") -> "Stage":
        """This stage with the options it leaves open taken from `style`, `local_blocks` and
        `loss_on` (the command line's)."""
        return replace(self, **{k: getattr(style, k) for k in STAGE_KEYS if getattr(self, k) is None},
                       local_blocks=local_blocks if self.local_blocks is None else self.local_blocks,
                       loss_on=loss_on if self.loss_on is None else self.loss_on)

    def style(self, base: "Style") -> "Style":
        """The style of this (resolved) stage's documents."""
        return replace(base, **{k: getattr(self, k) for k in STAGE_KEYS})


def fact_range(text: str) -> tuple[int, int]:
    """'3-8' or '1' -> (3, 8) or (1, 1): facts per training document (argparse type)."""
    lo, _, hi = text.partition("-")
    r = (int(lo), int(hi or lo))
    if not 1 <= r[0] <= r[1]:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX with 1 <= MIN <= MAX, got {text!r}")
    return r


# what a --stage may change in the style, and in the training
STAGE_KEYS = {"gap": int, "facts": fact_range, "filler": int, "numbers": float}
TRAIN_KEYS = {"local_blocks": int, "loss_on": str, "until": float}
ALL_STAGE_KEYS = STAGE_KEYS | TRAIN_KEYS


def option_text(value) -> str:
    """A style option as --stage and the corpus folders spell it: 12, or 1-3 for a range."""
    return "{}-{}".format(*value) if isinstance(value, tuple) else str(value)


def style_args(ap: argparse.ArgumentParser) -> None:
    d = Style()
    ap.add_argument("--train-facts", type=fact_range, default=d.facts, metavar="MIN-MAX",
                    help="facts per training document (1: find the fact; several: also match its name)")
    ap.add_argument("--repeats", type=int, default=d.repeats, help="each fact stated 1..N times in its document")
    ap.add_argument("--code-only", action="store_true", help="answers give the code alone, not the fact restated")
    ap.add_argument("--filler", type=int, default=d.filler, help="0..N filler sentences per training document")
    ap.add_argument("--numbers", type=float, default=d.numbers,
                    help="share of filler sentences carrying a number (in training and in the long documents)")
    ap.add_argument("--parts", type=int, default=d.parts, help="two-digit numbers per code (\"48 17\": 2)")
    ap.add_argument("--gap", type=int, default=d.gap,
                    help="at least N filler sentences between a training document's facts and its questions")


def corpus_name(style: Style, default: Style) -> str:
    """WORK/corpus for the command line's style; corpus_gap12, corpus_gap12_facts1-3 ... for a stage's."""
    return "_".join(["corpus", *(f"{k}{option_text(getattr(style, k))}" for k in STAGE_KEYS
                                 if getattr(style, k) != getattr(default, k))])


def style_of(a: argparse.Namespace) -> Style:
    return Style(facts=a.train_facts, repeats=a.repeats, restate=not a.code_only, filler=a.filler,
                 numbers=a.numbers, parts=a.parts, gap=a.gap)


def long_document(rng: random.Random, pool: list[str], n_facts: int, n_sentences: int,
                  numbers: float = 0.0, parts: int = 1) -> tuple[str, dict[str, str]]:
    chosen = rng.sample(pool, n_facts)
    codes = {n: code(rng, parts) for n in chosen}
    sentences = filler_sentences(rng, n_sentences, numbers)
    for n in chosen:
        sentences.insert(rng.randint(0, len(sentences)), fact(n, codes[n]))
    return " ".join(sentences), codes


def sentences_for(tokenizer, tokens: int) -> int:
    """How many filler sentences make a document of about `tokens` tokens."""
    per = len(tokenizer(" ".join(FILLER), add_special_tokens=False)["input_ids"]) / len(FILLER)
    return max(1, int(tokens / per))


def make_base(out: Path, corpora: list[Path], *, dim: int, layers: int, heads: int, kv_heads: int, seed: int) -> Path:
    """A randomly initialised LlamaForCausalLM + a word-level tokenizer over the words and
    punctuation of all the corpora, so that every name and every code is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    split = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for p in sorted(p for corpus in corpora for p in corpus.glob("*.txt")):
        for line in p.read_text().splitlines():
            words.update(w for w, _ in split.pre_tokenize_str(line))
    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "[UNK]", *sorted(words)])}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    wl.pre_tokenizer = split
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=dim, intermediate_size=dim * 8 // 3 // 32 * 32,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=16384, rope_theta=10000.0, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


def answered_code(text: str, parts: int) -> str | None:
    """The first `parts` numbers of an answer, as a code ("48 17"); None if fewer."""
    found = re.findall(r"\d+", text)
    return " ".join(found[:parts]) if len(found) >= parts else None


@torch.inference_mode()
def truncated_answer(lm, prompt, max_new: int = 14) -> str:
    """The model without retrieval: full grouped attention over the last train_context
    tokens of the prompt (landmarks in place), greedy."""
    from landmark_cli.retrieval.landmarks import insert_landmarks

    spec = lm.landmark
    seq = prompt.ids + prompt.suffix
    out: list[int] = []
    for _ in range(max_new):
        stream = insert_landmarks(seq + out, None, spec.mem_freq, spec.mem_id)[0]
        x = torch.tensor(stream[-(spec.train_context // spec.block * spec.block - 1):])
        logits = lm.model.forward(x, is_landmark=x == spec.mem_id, local_layers=spec.local_layers,
                                  local_blocks=spec.local_blocks)[-1]
        logits[spec.mem_id] = float("-inf")
        tok = int(logits.argmax())
        if tok in lm.stop_ids():
            break
        out.append(tok)
    return lm.tokenizer.decode(out, skip_special_tokens=True)


def evaluate(model_dir: Path, work: Path, *, docs: int, facts: int, tokens: int, top_k: int, seed: int,
             pool: list[str], style: Style = Style()) -> dict:
    from landmark_cli.ask import ask
    from landmark_cli.model.loading import load_model
    from landmark_cli.prompts import ask_prompt
    from landmark_cli.retrieval.settings import Reading, Settings

    lm = load_model(str(model_dir))
    settings = Settings(Reading(top_k=top_k))
    rng = random.Random(seed)
    records = []
    for d in range(docs):
        text, codes = long_document(rng, pool, facts, sentences_for(lm.tokenizer, tokens),
                                    style.numbers, style.parts)
        path = work / f"doc{d}.txt"
        path.write_text(text)
        for name, code in codes.items():
            q = question(name)
            t0 = time.perf_counter()
            res = ask(lm, path, q, settings, max_new_tokens=14)
            got = answered_code(res.answer, style.parts)
            base = truncated_answer(lm, ask_prompt(lm.tokenizer, text, q))
            records.append({"doc": d, "name": name, "expected": code, "answer": res.answer,
                            "correct": got == code, "truncated_answer": base,
                            "truncated_correct": answered_code(base, style.parts) == code,
                            "depth": round(text.index(fact(name, code)) / len(text), 3),
                            "stream_tokens": res.document_tokens, "retrieved_per_step": res.retrieved_per_step,
                            "cached": res.cached, "seconds": round(time.perf_counter() - t0, 3)})
            print(f"doc {d} {name}: expected {code}, landmark {res.answer!r}, truncated {base!r}", flush=True)
    n = len(records)
    return {"questions": n, "landmark_accuracy": sum(r["correct"] for r in records) / n,
            "truncated_accuracy": sum(r["truncated_correct"] for r in records) / n,
            "settings": {"top_k": top_k, "block": lm.landmark.block, "train_context": lm.landmark.train_context},
            "records": records}


# The default plan: near facts with a local first layer that reads its own and the
# previous block (it learns to copy a near fact), then the same documents with that layer
# reading its own block only, so that every fact in an earlier block, the previous one
# included, must be fetched through the second layer's landmarks. The first stage ends
# once the near lookup appears (until=0.5), so that the own-block stages start from a
# lookup that is still new rather than one long settled in the first layer.
# The own-block stages train on the answers only (loss_on): the lookup's share of the
# loss is then about 20 times larger, so that the second layer takes the lookup over;
# the third, slower stage finishes a handover that comes late. The plans tried and their
# results: experiments/README.md.
ANSWERS = "Answer:"
RECIPE = (Stage(3000, 3e-3, until=0.5), Stage(2000, 2e-3, local_blocks=0, loss_on=ANSWERS),
          Stage(1000, 1e-3, local_blocks=0, loss_on=ANSWERS))


def report(ev: dict, out: Path | None = None, args: dict | None = None, **extra) -> None:
    """Print the accuracies of `evaluate`; with `out`, also write them, the machine, the
    arguments and `extra` (parameters, training) there as JSON."""
    from landmark_cli.bench.passkey_run import machine

    print(f"landmark ask: {ev['landmark_accuracy']:.0%} of {ev['questions']} questions; "
          f"truncated to the training context: {ev['truncated_accuracy']:.0%}", flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"benchmark": "trained_facts", "machine": machine(), "args": args, **extra, **ev},
                                  indent=1, default=str) + "\n")


PROBE_EVERY = 25  # steps between near-lookup checks of a stage with `until`


def answer_start(tok, text: str, name: str) -> list[int]:
    """Token ids of the `landmark ask` prompt asking `text` for `name`'s code, followed by
    the answer's start ("The code of X is"): the code comes next."""
    from landmark_cli.prompts import ask_prompt

    p = ask_prompt(tok, text, question(name))
    return p.ids + p.suffix + tok(f" The code of {name} is", add_special_tokens=False)["input_ids"]


def near_prompts(tok, n: int, seed: int, pool: list[str]) -> list[tuple[list[int], int]]:
    """n probe prompts for the near lookup: 5-25 filler sentences, a fact, 0-1 more, then
    its question in the `landmark ask` layout and the answer's start ("The code of X is"),
    so that the fact lies in the query's own block or the one before. (ids, code token id)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, c = rng.choice(pool), code(rng)
        text = " ".join([*filler_sentences(rng, rng.randint(5, 25), 0.0), fact(name, c),
                         *filler_sentences(rng, rng.randint(0, 1), 0.0)])
        out.append((answer_start(tok, text, name), tok.convert_tokens_to_ids(c)))
    return out


@torch.no_grad()
def near_lookup(model, spec, prompts: list[tuple[list[int], int]]) -> float:
    """Share of the prompts for which the model, read as it is trained (landmarks in
    place, its local layers as `spec` says), writes the code next."""
    from landmark_cli.retrieval.landmarks import insert_landmarks

    hits, device = 0, model.parameters()[0].device
    for ids, code_id in prompts:
        x = torch.tensor(insert_landmarks(ids, None, spec.mem_freq, spec.mem_id)[0], device=device)
        logits = model.forward(x, is_landmark=x == spec.mem_id, local_layers=spec.local_layers,
                               local_blocks=spec.local_blocks)[-1]
        hits += int(logits.argmax()) == code_id
    return hits / len(prompts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/landmark-trained-facts", help="scratch folder (corpus, models)")
    ap.add_argument("--stage", dest="stages", type=Stage.parse, action="append", metavar="STEPS:LR[:KEY=VALUE,...]",
                    help="one `landmark finetune` run, from the previous one's checkpoint; repeat for a plan. "
                    "KEY=VALUE change the stage's documents from the style options: gap=N (facts at least N "
                    "filler sentences before their questions), facts=N or MIN-MAX (facts per document), filler=N "
                    "(0..N filler sentences), numbers=F (a share F of them carrying a number); and "
                    "local_blocks=0|1 (the local layers' reach), loss_on=MARKER (the text to train on: loss_on=Answer: "
                    "the answers only; loss_on= every token), until=F (end the stage once a near-lookup probe "
                    "reaches F). "
                    "Default: " + " then ".join(map(str, RECIPE)))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=31)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--local-layers", type=int, default=1,
                    help="the first N layers read only their own block and --local-blocks before it "
                    "(finetune --local-layers)")
    ap.add_argument("--local-blocks", type=int, default=1, choices=(0, 1),
                    help="earlier blocks a local layer reads (finetune --local-blocks)")
    ap.add_argument("--loss-on", default="", metavar="MARKER",
                    help="finetune --loss-on for the stages that do not set loss_on: train on the text after "
                    "MARKER to its line's end only ('Answer:': the answers). Default: every token (the paper's loss)")
    ap.add_argument("--train-docs", type=int, default=20000)
    style_args(ap)
    ap.add_argument("--docs", type=int, default=20, help="long documents to ask about")
    ap.add_argument("--facts", type=int, default=1, help="facts per long document")
    ap.add_argument("--tokens", type=int, default=8192, help="length of the long documents")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="where to train: cpu | cuda (asking runs on the CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--names", type=int, default=500, help="names in the corpus; every document pairs them with "
                    "fresh random codes, so a name's code can only be found in the document")
    ap.add_argument("--eval-only", metavar="MODEL_DIR", help="skip training: evaluate this trained model")
    ap.add_argument("--corpus-only", action="store_true",
                    help="write the training corpora (WORK/corpus, and one per stage style: WORK/corpus_gap12, "
                    "WORK/corpus_gap12_facts1-3, ...) and the random base model (WORK/base) and stop (to train them "
                    "with `landmark finetune`)")
    ap.add_argument("--json", help="results file (default: experiments/results/trained_facts_DEVICE.json; with "
                    "--eval-only, none unless given)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from landmark_cli.training.finetune import TrainConfig, finetune

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    pool = names(a.names)  # one token each; the long documents pair them with codes drawn afresh
    if a.eval_only:
        ev = evaluate(Path(a.eval_only), work, docs=a.docs, facts=a.facts, tokens=a.tokens, top_k=a.top_k,
                      seed=a.seed + 1, pool=pool, style=style_of(a))
        if a.json:  # only when asked: --eval-only is often a quick look
            report(ev, Path(a.json), vars(a))
        else:
            report(ev)
        return 0
    style = style_of(a)
    stages = [st.resolve(style, a.local_blocks, a.loss_on) for st in a.stages or RECIPE]
    # one corpus per style, the same seed otherwise (as lookup_probe.py's stages)
    corpora = {s: work / corpus_name(s, style) for s in dict.fromkeys(st.style(style) for st in stages)}
    for s, folder in corpora.items():
        write_corpus(folder, a.train_docs, a.seed, pool, s)
    model = make_base(work / "base", list(corpora.values()), dim=a.dim, layers=a.layers, heads=a.heads,
                      kv_heads=a.kv_heads, seed=a.seed)
    if a.corpus_only:
        print(f"corpora written to {', '.join(map(str, corpora.values()))}; the random base model to {model}")
        return 0

    def show(info):
        if info.step % 25 == 0 or info.step == info.steps:
            print(f"step {info.step}/{info.steps} loss {info.loss:.3f} lr {info.lr:.2e} {info.tokens_per_s:,.0f} tok/s",
                  flush=True)

    from transformers import AutoTokenizer

    probe = near_prompts(AutoTokenizer.from_pretrained(model), 24, a.seed + 2, pool)

    def until(share: float | None, warmup: int):
        """on_step for a stage: show progress; with `share`, end the stage once near_lookup reaches it."""
        def on_step(info) -> bool:
            show(info)
            if share is None or info.step % PROBE_EVERY or info.step < warmup:
                return False
            got = near_lookup(info.model, info.spec, probe)
            print(f"step {info.step}: near lookup {got:.0%} (the stage ends at {share:.0%})", flush=True)
            return got >= share
        return on_step

    t0 = time.perf_counter()
    summaries = []
    for n, st in enumerate(stages, 1):
        cfg = TrainConfig(block_size=a.block_size, context=a.context, steps=st.steps, batch=a.batch, lr=st.lr,
                          local_layers=a.local_layers, local_blocks=st.local_blocks, loss_on=st.loss_on,
                          warmup=min(100, st.steps // 10 + 1),
                          save_every=max(1, st.steps // 5), seed=a.seed)
        out = work / ("model" if n == 1 else f"model{n}")
        print(f"stage {n}/{len(stages)}: --stage {st}", flush=True)
        summaries.append({**finetune(str(model), corpora[st.style(style)], out, cfg, device=a.device,
                                     restart=True, on_step=until(st.until, cfg.warmup), progress=print),
                          "lr": st.lr, **{k: v for k, v in asdict(st).items() if k in ALL_STAGE_KEYS}})
        model = out
    train_s = time.perf_counter() - t0
    from safetensors.torch import load_file

    n_params = sum(v.numel() for v in load_file(model / "model.safetensors").values())
    print(f"trained {n_params / 1e6:.2f}M parameters for {sum(s['steps'] for s in summaries)} steps in "
          f"{train_s / 60:.1f} min; loss {summaries[0]['first_loss']:.3f} -> {summaries[-1]['last_loss']:.3f}",
          flush=True)
    ev = evaluate(model, work, docs=a.docs, facts=a.facts, tokens=a.tokens, top_k=a.top_k,
                  seed=a.seed + 1, pool=pool, style=style)
    report(ev, Path(a.json or ROOT / f"experiments/results/trained_facts_{a.device.split(':')[0]}.json"),
           {**vars(a), "stages": [asdict(st) for st in stages]}, parameters=n_params,
           train={"stages": summaries, "seconds": round(train_s, 1), "torch_threads": torch.get_num_threads()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
