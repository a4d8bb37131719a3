"""Prompt pieces: a cacheable prefix (instruction + document) and a question suffix.

The document's KV states are cached, so the prompt is cut in two around it: everything
before and including the document is read once; the question and the answer cue come
after. Chat models get their own chat template, split at a sentinel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

INSTRUCTION = "Read the document below, then answer the question after it briefly, using only the document."
_DOC, _QUESTION = "\u2063DOCUMENT\u2063", "\u2063QUESTION\u2063"


@dataclass
class Prompt:
    ids: list[int]  # prefix + document tokens: what the KV store holds
    spans: np.ndarray  # [len(ids), 2] character span of each token in the document, -1 for prompt tokens
    suffix: list[int]  # question + answer cue
    question: slice = field(default_factory=lambda: slice(None))  # the question's own tokens in `suffix`


def _template(tokenizer) -> tuple[str, str, str]:
    """(before document, between document and question, after question) as text."""
    if getattr(tokenizer, "chat_template", None):
        content = f"{INSTRUCTION}\n\nDocument:\n{_DOC}\n\nQuestion: {_QUESTION}"
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        before, rest = text.split(_DOC)
        middle, after = rest.split(_QUESTION)
        return before, middle, after
    bos = tokenizer.bos_token or "" if getattr(tokenizer, "add_bos_token", False) else ""
    return f"{bos}{INSTRUCTION}\n\nDocument:\n", "\n\nQuestion: ", "\nAnswer:"


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def document_tokens(tokenizer, text: str) -> tuple[list[int], np.ndarray]:
    """Token ids of a document and the character span of each."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)


def raw_prompt(tokenizer, prefix: str, document: str, suffix: str) -> Prompt:
    """A prompt without chat template (the passkey benchmark, base models)."""
    pre = encode(tokenizer, prefix) if prefix else []
    ids, spans = document_tokens(tokenizer, document)
    return Prompt(ids=pre + ids, spans=np.concatenate([np.full((len(pre), 2), -1), spans]),
                  suffix=encode(tokenizer, suffix))


def ask_prompt(tokenizer, document: str, question: str) -> Prompt:
    before, middle, after = _template(tokenizer)
    suffix = middle + question.strip() + after
    p = raw_prompt(tokenizer, before, document, suffix)
    q0, q1 = len(middle), len(middle) + len(question.strip())
    spans = tokenizer(suffix, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(spans) if a < q1 and b > q0 and b > a]
    if inside:
        p.question = slice(inside[0], inside[-1] + 1)
    return p


def document_prompt(tokenizer, document: str) -> Prompt:
    """The cacheable part of `ask_prompt` (instruction + document) with no question: what
    `landmark index` reads, so that `landmark ask FILE` later finds the same store entry."""
    return ask_prompt(tokenizer, document, "")
