"""Lesson 07's exercises (tutorials/07_edifice_backbone.py): Edifice's backbone: its fixed token embedding, and the
entropy of the tokens per position.

Each exercise lists its inputs (`calls`), its reference and the typical mistakes its grader names; the
machinery (Exercise, Call, the judges, grade()) is in kit.py and registry.py.
"""

from __future__ import annotations

import numpy as np

from .kit import Call, Exercise, Mistake, closed_form


def _embedding(V, H, *, sqrt=True, order="row"):
    t, j = np.meshgrid(np.arange(V), np.arange(H), indexing="ij")
    value = t * H + j if order == "row" else t + j * V
    return value / (np.sqrt(V) if sqrt else 1.0)


def fixed_embedding_stub(vocab_size, hidden_size):
    raise NotImplementedError("write fixed_embedding")


FIXED_EMBEDDING = Exercise(
    "07.fixed_embedding", "fixed_embedding", "fixed_embedding(vocab_size, hidden_size) -> E",
    "Edifice's fixed token embedding, E[t, j] = (t H + j) / √V, a [V, H] array",
    lambda: [Call("V = 5, H = 3", (5, 3), {}), Call("V = 16, H = 8", (16, 8), {})],
    closed_form(("E",), lambda c: (_embedding(*c.args),), [
        Mistake("sqrt_missing", "t H + j without the division by √V", lambda c: (_embedding(*c.args, sqrt=False),)),
        Mistake("column_order", "t + j V (the numbering runs down the columns instead of along the rows)",
                lambda c: (_embedding(*c.args, order="column"),)),
    ]),
    fixed_embedding_stub,
)


def _entropy(tokens, *, base=np.e, pooled=False, summed=False):
    tokens = np.asarray(tokens)
    columns = [tokens.reshape(-1)] if pooled else [tokens[:, t] for t in range(tokens.shape[1])]
    entropies = []
    for column in columns:
        _, counts = np.unique(column, return_counts=True)
        p = counts / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum() / np.log(base)))
    return float(np.sum(entropies) if summed else np.mean(entropies))


def _entropy_calls():
    rng = np.random.default_rng(7)
    return [Call("200 sequences of 4 tokens from 6", (rng.integers(0, 6, (200, 4)),), {}),
            Call("3 sequences of 3 tokens", (np.array([[1, 2, 2], [1, 3, 2], [1, 2, 5]]),), {})]


def entropy_stub(tokens):
    return 0.0  # a placeholder: the entropy of a model that is always right


POSITION_ENTROPY = Exercise(
    "07.position_entropy", "position_entropy", "position_entropy(tokens) -> float",
    "H(token | position) in nats for tokens [N, T]: the mean over positions of the entropy of the tokens seen "
    "there, the lowest mean NLL a model that ignores the tokens can reach on them",
    _entropy_calls,
    closed_form(("entropy",), lambda c: (_entropy(*c.args),), [
        Mistake("bits", "the entropy in bits (log₂) instead of nats (ln), the unit of the NLL",
                lambda c: (_entropy(*c.args, base=2.0),)),
        Mistake("pooled", "the entropy of all the tokens pooled, which ignores the positions",
                lambda c: (_entropy(*c.args, pooled=True),)),
        Mistake("summed", "the sum over positions instead of the mean",
                lambda c: (_entropy(*c.args, summed=True),)),
    ]),
    entropy_stub,
)


EXERCISES = [FIXED_EMBEDDING, POSITION_ENTROPY]
