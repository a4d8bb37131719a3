"""What a user can set, in two parts: how a document is read into the store (`Reading`,
every field part of the store key) and how a question is answered from it (`Answering`,
none of it in the key, so answers can change without reading anything again).

`effective_settings` resolves, in one place, what a model's trained landmarks impose
(their block size, no sink, every step inside the training context) and the defaults
that depend on the kind of landmark (`top_k`, the answer's window and top_k).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Literal, get_args

from landmark_cli.errors import LandmarkError
from landmark_cli.model.checkpoint import LandmarkSpec

Rep = Literal["mean", "minmax", "landmark"]  # landmark: trained models only (the <landmark> token's key)
KVDtype = Literal["float16", "float32", "int8"]  # storage/kvformat.py
Select = Literal["shared", "layer"]
Order = Literal["best-last", "document"]
Passages = Literal["cached", "text"]
LandmarkChoice = Literal["auto", "trained", "free"]

DEFAULT_TOP_K = 8  # blocks per layer and KV head, training-free landmarks
TRAINED_TOP_K = 4  # the same for trained landmarks (the paper: 2-5)
# Answering with training-free landmarks, chosen on benchmarks/qa_eval.py: no local window
# (the end of the document drowns a small model's reading of the passages), its budget spent
# on blocks instead: twice the reading's top_k, as runs (lead, follow)
DEFAULT_ANSWER_WINDOW = 0
ANSWER_TOP_K_FACTOR = 2


def _check(value: str, choices, what: str) -> None:
    if value not in get_args(choices):
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(get_args(choices))}")


@dataclass(frozen=True)
class Reading:
    """How a document is read into the store (the store key)."""

    block: int = 32  # tokens per block (the unit of retrieval)
    top_k: int | None = None  # blocks retrieved per layer and KV head at every step (None: the default)
    sink: int = 64  # initial tokens always attended (rounded up to whole blocks)
    window: int = 1024  # local window before each step (rounded down to whole blocks)
    chunk: int = 512  # document tokens per reading step (rounded down to whole blocks)
    rep: Rep = "mean"  # block representative
    kv_dtype: KVDtype = "int8"  # how the store keeps keys and values (storage/kvformat.py)

    def __post_init__(self):
        if self.block < 1 or (self.top_k or 0) < 0 or self.sink < 0 or self.window < 0:
            raise ValueError("block must be >= 1; top_k, sink and window >= 0")
        _check(self.rep, Rep, "representative")
        _check(self.kv_dtype, KVDtype, "KV dtype")

    @property
    def top_k_or_default(self) -> int:
        """top_k, or the training-free default when it is not set (effective_settings sets it)."""
        return DEFAULT_TOP_K if self.top_k is None else self.top_k

    def key(self) -> dict:
        """The store key's part: every field, top_k resolved."""
        return {**asdict(self), "top_k": self.top_k_or_default}

    @property
    def sink_tokens(self) -> int:
        return -(-self.sink // self.block) * self.block

    @property
    def window_tokens(self) -> int:
        return self.window // self.block * self.block

    @property
    def chunk_tokens(self) -> int:
        return max(self.block, self.chunk // self.block * self.block, self.sink_tokens)

    def span(self) -> int:
        """Largest position used by one step: what must fit the model's context."""
        return self.sink_tokens + self.top_k_or_default * self.block + self.window_tokens + self.chunk_tokens


@dataclass(frozen=True)
class Answering:
    """How a question is answered from the store (not part of the store key)."""

    select: Select = "shared"  # shared: one set of blocks for every layer, chosen by `band`; layer: per layer and head
    band: tuple[float, float] = (0.55, 0.65)  # layers (fractions of depth) whose scores choose the shared set
    window: int | None = None  # local window while answering, in tokens (None: the default for the landmark kind)
    top_k: int | None = None  # blocks retrieved while answering (None: the default for the landmark kind)
    follow: int = 2  # shared selection: blocks taken after each best block
    lead: int = 1  # shared selection: blocks taken before each best block
    order: Order = "best-last"  # shared selection: passages best last (nearest the question) or in document order
    # shared selection: the chosen blocks attended as cached (their keys and values as read in the document),
    # or read again as text, with the window, right after the sink (a short prompt the model reads fresh:
    # no more right answers on benchmarks/qa_eval.py, and a forward pass over the passages per question)
    passages: Passages = "cached"

    def __post_init__(self):
        _check(self.select, Select, "selection")
        _check(self.order, Order, "order")
        _check(self.passages, Passages, "passages")
        if min(self.window or 0, self.top_k or 0, self.follow, self.lead) < 0:
            raise ValueError("the answer window, top_k, follow and lead must be >= 0")


@dataclass(frozen=True)
class Settings:
    read: Reading = field(default_factory=Reading)
    answer: Answering = field(default_factory=Answering)
    # trained: the model's <landmark> tokens; free: representatives; auto: trained if it has them
    landmarks: LandmarkChoice = "auto"

    def __post_init__(self):
        _check(self.landmarks, LandmarkChoice, "landmarks")


def trained_settings(s: Settings, spec: LandmarkSpec) -> Settings:
    """Settings for a trained landmark model, as in the paper: blocks of mem_freq tokens +
    their <landmark>, retrieval by the landmark keys per layer and KV head, no sink, and
    every step inside the training context: k blocks + window + chunk <= train_context
    (the chunk shrinks first, then the window). Without a top_k of the user's,
    TRAINED_TOP_K blocks, fewer if the training context leaves no room."""
    B, r = spec.block, s.read
    top_k = min(TRAINED_TOP_K, spec.train_context // B - 1) if r.top_k is None else r.top_k
    avail = spec.train_context // B * B - top_k * B
    if avail < B:
        raise LandmarkError(f"--top-k {top_k} blocks of {B} tokens leave no room for a chunk in the model's "
                            f"training context of {spec.train_context} tokens",
                            f"use --top-k {max(spec.train_context // B - 1, 0)} or less")
    chunk = max(B, min(r.chunk // B * B, avail))
    read = replace(r, block=B, top_k=top_k, rep="landmark", sink=0, chunk=chunk,
                   window=max(0, min(r.window // B * B, avail - chunk)))
    return replace(s, read=read, answer=replace(s.answer, select="layer"))


def effective_settings(loaded, s: Settings) -> tuple[Settings, LandmarkSpec | None]:
    """The settings an engine for this model (models.LoadedModel) really reads and answers
    with, and the model's trained landmarks when they are used (None: training-free)."""
    if s.landmarks == "trained" and loaded.landmark is None:
        raise LandmarkError(f"{loaded.name} has no trained landmarks (a <landmark> token and mem_freq in its config)",
                            "use --landmarks auto or free")
    spec = loaded.landmark if s.landmarks != "free" else None
    if spec is None:
        s = replace(s, read=replace(s.read, top_k=s.read.top_k_or_default))
        window, top_k = DEFAULT_ANSWER_WINDOW, ANSWER_TOP_K_FACTOR * s.read.top_k_or_default
    else:  # trained: answer as the model reads, inside its training context
        s = trained_settings(s, spec)
        window, top_k = s.read.window, s.read.top_k_or_default
    a = s.answer
    return replace(s, answer=replace(a, window=window if a.window is None else a.window,
                                     top_k=top_k if a.top_k is None else a.top_k)), spec
