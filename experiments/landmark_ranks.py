"""Have a trained model's landmarks learned to stand for their blocks? Rank of the fact's block.

    python experiments/landmark_ranks.py /tmp/landmark-trained-facts/model [--tokens 256] [--numbers 0.1]

For documents written like trained_facts.py's long documents (one fact among filler,
--numbers: share of filler sentences carrying a number), of about --tokens tokens, asked
in the `landmark ask` prompt layout and followed by the start of the answer ("The code of
X is"), runs the model's full grouped-softmax forward over the whole stream and, at the
query that must produce the code, ranks every earlier block by its landmark score in
each layer and KV head with `landmark ask`'s own scoring (landmarks.block_scores:
pre-RoPE q . k of the landmark, best query head of the group). Prints, per (layer,
head), how often the fact's block was ranked first and its mean relative rank (0: always
first, 1: always last; chance 0.5); and how often the forward produced the code.
Retrieval over a long document can only work through heads whose fact-block rank is far
above chance. (Note: a first-layer landmark key is the same for every block, so
first-layer ranks are ties, at chance by construction. A model's local layers, which
read only their own and the previous block, are run so and never retrieve.)
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import trained_facts as tf  # noqa: E402

from landmark_cli.kernels.landmark_attention import landmark_attention  # noqa: E402
from landmark_cli.kernels.rope import apply_rope  # noqa: E402
from landmark_cli.model.loading import load_model  # noqa: E402
from landmark_cli.retrieval.landmarks import block_scores, insert_landmarks  # noqa: E402


def fact_stream(lm, rng, pool, tokens: int, numbers: float, parts: int = 1):
    """(stream ids with landmarks, the code's first token id): a document of about `tokens` tokens."""
    tok, spec = lm.tokenizer, lm.landmark
    text, codes = tf.long_document(rng, pool, 1, tf.sentences_for(tok, tokens), numbers, parts)
    (name, c), = codes.items()
    stream = torch.tensor(insert_landmarks(tf.answer_start(tok, text, name), None, spec.mem_freq, spec.mem_id)[0])
    return stream, tok.convert_tokens_to_ids(c.split()[0])


@torch.inference_mode()
def ranks(lm, stream: torch.Tensor, code_id: int):
    """Per layer, per KV head: rank of the block holding the code (0 = best) among the
    blocks before the query's own; and whether the forward predicts the code. None when
    the code is in the query's own block."""
    m, spec = lm.model, lm.landmark
    lmk = stream == spec.mem_id
    blk = torch.cumsum(lmk.int(), 0) - lmk.int()
    where = (stream == code_id).nonzero().flatten()
    if where.numel() == 0 or int(blk[where[0]]) == int(blk[-1]):
        return None
    fact_block = int(blk[where[0]])
    gates = (lmk & (blk < blk[-1])).nonzero().flatten()  # the candidate blocks' landmarks
    x = m.embed(stream)
    cos, sin = m.rope.tables(len(stream))
    out = []
    for layer in range(m.cfg.n_layers):
        q, k, v = m.qkv(layer, x)
        scores = block_scores(q[:, -1:], k[:, gates, None], "landmark", k.shape[0])  # [Hkv, blocks], as ask ranks
        out.append([blk[gates][row.argsort(descending=True)].tolist().index(fact_block) for row in scores])
        att = landmark_attention(apply_rope(q, cos, sin)[None], apply_rope(k, cos, sin)[None], v[None], lmk[None],
                                 local=layer < spec.local_layers, local_blocks=spec.local_blocks)[0]
        x = m.finish(layer, x, att)
    return out, int(m.logits(x[-1:])[0].argmax()) == code_id, len(gates)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=0,
                    help="document length (default: half the training context, so that prompt and answer fit it)")
    ap.add_argument("--numbers", type=float, default=0.0, help="share of filler sentences carrying a number")
    ap.add_argument("--parts", type=int, default=1, help="two-digit numbers per code, as the model was trained")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--seed", type=int, default=11)
    a = ap.parse_args(argv)
    lm = load_model(a.model)
    if lm.landmark is None:
        raise SystemExit(f"{a.model} has no trained landmarks")
    rng, pool = random.Random(a.seed), tf.names(500)
    first: dict = {}
    rel: dict = {}
    n = correct = blocks = 0
    for _ in range(a.trials):
        r = ranks(lm, *fact_stream(lm, rng, pool, a.tokens or lm.landmark.train_context // 2, a.numbers,
                                 a.parts))
        if r is None:
            continue
        per_layer, ok, nb = r
        n, correct, blocks = n + 1, correct + ok, blocks + nb
        for layer, hs in enumerate(per_layer):
            for h, rank in enumerate(hs):
                first[layer, h] = first.get((layer, h), 0) + (rank == 0)
                rel[layer, h] = rel.get((layer, h), 0) + rank / max(1, nb - 1)
    if not n:
        raise SystemExit("no usable trial (the fact fell in the question's block every time)")
    nb = blocks / n
    print(f"{a.model}: {n} documents of ~{a.tokens or lm.landmark.train_context // 2} tokens, ~{nb:.0f} candidate "
          f"blocks; the forward produced the code in {correct}/{n}")
    print(f"fact's block ranked first (chance {1 / nb:.0%}) / its mean relative rank (chance 0.50):")
    for layer, h in sorted(first):
        print(f"  layer {layer} head {h}: {first[layer, h] / n:4.0%} / {rel[layer, h] / n:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
