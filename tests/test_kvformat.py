"""The int8 KV format: codes and scales, the view attention reads, and answers from it (tiny model)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from landmark_cli.model.device import stage
from landmark_cli.retrieval.corpus import CorpusSession
from landmark_cli.retrieval.engine import Engine
from landmark_cli.retrieval.session import Session
from landmark_cli.retrieval.settings import Reading, Settings
from landmark_cli.storage.kvformat import QuantizedKV, dequantize, quantize

EXACT = Reading(block=8, top_k=64, sink=8, window=16, chunk=32)


def _values(shape, seed=0):
    """Random values whose channels differ in size by up to 100x, like pre-RoPE keys."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.logspace(-1, 1, shape[-1])


def test_decoding_is_within_half_a_step_of_every_value():
    x = _values((3, 5, 8, 16))
    x[0, 1, :, 4] = 0  # a channel that is all zeros in one block
    codes, scales = quantize(x)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (3, 5, 16)
    assert codes.abs().max() <= 127 and scales[0, 1, 4] == 0
    err = (dequantize(codes, scales.unsqueeze(-2)) - x).abs()
    assert (err <= scales.float().unsqueeze(-2) / 2 + 1e-6).all()
    neg_codes, neg_scales = quantize(-x)
    assert torch.equal(neg_codes, -codes) and torch.equal(neg_scales, scales)  # symmetric


@pytest.mark.parametrize("index", [(1,), (1, 0), (0, slice(None), slice(None), slice(2, 5)),
                                   (1, slice(None), 2, 3, slice(None, 5)), (0, 1, slice(None), slice(1, 2))])
def test_the_view_indexes_like_the_decoded_array(index):
    x = _values((2, 2, 3, 6, 8, 16), seed=1)  # [layers, 2, Hkv, N, B, D]
    codes, scales = quantize(x)
    view = QuantizedKV.of(codes, scales)
    decoded = dequantize(codes, scales.unsqueeze(-2))
    assert view.shape == codes.shape
    torch.testing.assert_close(view[index].to(), decoded[index], rtol=0, atol=0)


def test_staging_decodes_only_the_selected_blocks():
    x = _values((2, 3, 6, 8, 16), seed=2)  # [2, Hkv, N, B, D]
    codes, scales = quantize(x)
    view = QuantizedKV.of(codes, scales)
    sel = torch.tensor([[4, 1], [0, 5], [2, 2]])
    k, v, idx = stage(view[0], view[1], sel, torch.device("cpu"))
    decoded = dequantize(codes, scales.unsqueeze(-2))
    assert idx.tolist() == [[0, 1]] * 3 and k.dtype == torch.float32
    for h in range(3):
        torch.testing.assert_close(k[h], decoded[0, h, sel[h]], rtol=0, atol=0)
        torch.testing.assert_close(v[h], decoded[1, h, sel[h]], rtol=0, atol=0)


def _logit_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest logit difference relative to the spread of the logits."""
    return float((got - want).abs().max() / want.std())


@pytest.mark.parametrize("select", ["layer", "shared"])
def test_int8_answers_like_full_attention_with_half_the_bytes(tiny, tmp_path, select):
    """Covering k over an int8 store: the logits stay within 5% (of their spread; float16: 0.1%) of full
    attention, where float32 is exact, and greedy decoding picks the same tokens; the keys
    and values take about half the bytes of float16 (53% with the default 32-token blocks)."""
    vocab = tiny.model.cfg.vocab_size
    ids = torch.randint(3, vocab, (203,), generator=torch.Generator().manual_seed(0)).tolist()
    settings = Settings(replace(EXACT, kv_dtype="int8"))
    settings = replace(settings, answer=replace(settings.answer, select=select))
    eng = Engine(tiny, settings, root=tmp_path / "int8")
    entry, _ = eng.read(ids[:170])
    half, _ = Engine(tiny, Settings(replace(EXACT, kv_dtype="float16")), root=tmp_path / "fp16").read(ids[:170])
    assert entry.kv.dtype == np.int8 and entry.scales is not None
    B = EXACT.block  # one byte a value and two per channel and block: (1 + 2 / B) / 2 of float16
    assert (entry.kv.nbytes + entry.scales.nbytes) / half.kv.nbytes == pytest.approx((1 + 2 / B) / 2)
    sess = Session(eng, entry, capacity=64)
    got, seq = sess.step(torch.tensor(ids[170:])), list(ids)
    for _ in range(4):
        with torch.inference_mode():
            full = tiny.model.forward(torch.tensor(seq))[-1]
        assert _logit_error(got, full) < 0.05 and int(got.argmax()) == int(full.argmax())
        seq.append(int(got.argmax()))
        got = sess.step(torch.tensor(seq[-1:]))


def test_a_folder_question_reads_int8_entries(tiny, tmp_path):
    vocab = tiny.model.cfg.vocab_size
    ids = torch.randint(3, vocab, (203,), generator=torch.Generator().manual_seed(1)).tolist()
    eng = Engine(tiny, Settings(replace(EXACT, kv_dtype="int8")), root=tmp_path / "store")
    entry, _ = eng.read(ids[:173])
    got = CorpusSession(eng, [entry], capacity=64, blocks=64).step(torch.tensor(ids[173:]))
    with torch.inference_mode():
        full = tiny.model.forward(torch.tensor(ids))[-1]
    assert _logit_error(got, full) < 0.05
