"""The model's body on the positions the loss reads, rows packed end to end (no twin in the reading
edition, which runs every row to the batch's full length T).

A causal model's hidden state at position t depends on positions 0..t only, and the sequence log-probs
read the logits at the positions t whose next token is a completion token. So row b needs positions
0..last_b only, last_b its last scored position; the padding after it (and the tail of a row whose
completion ended early) changes nothing the loss reads, and its gradient is exactly 0. This module runs
the GPT body on those positions alone:

    tokens [B, T] -> the kept positions of every row, end to end: x [M, C], M = sum_b (last_b + 1)
    -> embeddings, blocks, ln_f on [M, C] (every op but attention works position by position)
    -> attention one row at a time, on its own [NH, length_b, HS] heads (a causal mask per row)
    -> x_final [M, C], read by kto_np.fast.head at the scored positions (row_starts).

The numbers are those of the full rows (tests/test_fast.py, tests/test_step.py). The saving is the
batch's padding: in the benchmark's batch (rows of 3/4 T to T, padded to T) ~12 % of every product of
the body; in real batches, whose rows vary more in length, often more.

On CuPy arrays the rows' attention is a loop of small kernels and row_spans reads the mask on the host:
the same numbers, speed on a GPU not measured (no GPU has been lent to this project).

Dropout draws its masks over the full [B, T] shape, so a step that applies dropout (train=True and
dropout > 0) runs the full rows (GPT.body_forward) and draws the reading edition's masks; step.py
chooses.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from ..backend import array_module, to_numpy
from ..layers import AttentionGrads, EmbeddingCache, LayerNormCache, LinearCache, causal_mask
from ..model import blocks_backward, blocks_forward, param_shapes
from . import layers as fast_layers
from . import threads

__all__ = ["PackedAttentionCache", "PackedBodyCache", "PackedLayers", "attention_backward", "attention_forward",
           "body_backward", "body_forward", "row_spans"]


def row_spans(completion_mask) -> tuple[list[tuple[int, int, int]], np.ndarray]:
    """The rows' kept positions, packed end to end: (spans, row_starts).

    Row b keeps positions 0..last_b, last_b the last t with completion_mask[b, t + 1] != 0 (none for a
    row that scores nothing). spans: (b, start, stop) for each row that keeps any, start:stop its place
    in the packed array; row_starts [B] (int64, host): where each row starts there (kto_np.fast.head).
    """
    scored = to_numpy(completion_mask)[:, 1:] != 0  # [B, T - 1]
    width = scored.shape[1]
    lengths = np.zeros(scored.shape[0], dtype=np.int64)  # last_b + 1, 0 where nothing is scored
    any_scored = scored.any(axis=1)
    if any_scored.any():
        lengths[any_scored] = width - np.argmax(scored[any_scored, ::-1], axis=1)
    row_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    spans = [(b, int(start), int(start + length)) for b, (start, length) in enumerate(zip(row_starts, lengths))
             if length > 0]
    return spans, row_starts


# ----------------------------------------------------------------------------------------------
# attention, one packed row at a time


class PackedAttentionCache(NamedTuple):
    qkv_cache: LinearCache  # x [M, C] -> qkv [M, 3C]
    rows: list  # per kept row: (start, stop, q, k, v [NH, length, HS], SoftmaxCache of probs [NH, length, length])
    proj_cache: LinearCache  # y [M, C] -> out [M, C]
    scale: float  # 1 / sqrt(HS)


def _each_row(function, rows, array, work: int) -> None:
    """function(*row) for every row: on the fast room's threads, one BLAS thread each, when there are
    several threads, several rows and threadpoolctl to hold BLAS to one thread meanwhile (each row's
    products are small: whole rows per thread beat each product split over threads); else one row after
    the other, each row's ops threaded as they are (always for CuPy arrays, `array` tells which, and
    for less `work`, the entries of the rows' [NH, length, length] scores, than threads.MIN_PARALLEL_ELEMENTS).
    function(..., matmul) gets the product to use."""
    parallel = (threads.threads() > 1 and len(rows) > 1 and threads.numpy_only(array)
                and work >= threads.MIN_PARALLEL_ELEMENTS)
    controller = threads._blas_controller() if parallel else False
    if not controller:
        for row in rows:
            function(*row, threads.batched_matmul)
        return
    with controller.limit(limits=1):
        threads.run(function, [(*row, np.matmul) for row in rows])


def attention_forward(x, c_attn_weight, c_attn_bias, c_proj_weight, c_proj_bias, num_heads: int, spans):
    """kto_np.fast.layers.attention_forward (no dropout) on packed rows: x [M, C] -> out [M, C].

    The projections run on all M positions at once; q k^T, the causal softmax and probs v run per row
    (start, stop) of spans, on that row's [NH, length, HS] heads."""
    xp = array_module(x)
    M, C = x.shape
    HS = C // num_heads
    scale = 1.0 / math.sqrt(HS)
    qkv, qkv_cache = fast_layers.linear_forward(x, c_attn_weight, c_attn_bias)  # [M, 3C]
    y = xp.empty((M, C), dtype=x.dtype)
    rows: list = [None] * len(spans)

    def row(index, start, stop, matmul):
        length = stop - start
        heads = xp.ascontiguousarray(qkv[start:stop].reshape(length, 3, num_heads, HS).transpose(1, 2, 0, 3))
        q, k, v = heads[0], heads[1], heads[2]  # [NH, length, HS] each
        k_t = xp.ascontiguousarray(k.transpose(0, 2, 1))  # [NH, HS, length] (see fast.layers)
        scores = matmul(q, k_t)  # [NH, length, length]
        probs, softmax_cache = fast_layers._softmax_in_place(scores, mask=causal_mask(length, length, xp),
                                                             scale=scale)
        y[start:stop] = matmul(probs, v).transpose(1, 0, 2).reshape(length, C)
        rows[index] = (start, stop, q, k, v, softmax_cache)

    _each_row(row, [(index, start, stop) for index, (start, stop) in enumerate(spans)], qkv,
              sum(num_heads * (stop - start) ** 2 for start, stop in spans))
    out, proj_cache = fast_layers.linear_forward(y, c_proj_weight, c_proj_bias)
    return out, PackedAttentionCache(qkv_cache, rows, proj_cache, scale)


def attention_backward(dout, cache: PackedAttentionCache) -> AttentionGrads:
    """Backward of attention_forward, row by row: dout [M, C] -> AttentionGrads (dx [M, C])."""
    xp = array_module(dout)
    M, C = dout.shape
    dy, dc_proj_weight, dc_proj_bias = fast_layers.linear_backward(dout, cache.proj_cache)  # [M, C]
    dqkv = xp.empty((M, 3, C), dtype=dout.dtype)  # every packed position belongs to a row

    def row(start, stop, q, k, v, softmax_cache, matmul):
        length, num_heads, HS = stop - start, q.shape[0], q.shape[2]
        dy_heads = xp.ascontiguousarray(dy[start:stop].reshape(length, num_heads, HS).transpose(1, 0, 2))
        dprobs = matmul(dy_heads, xp.ascontiguousarray(v.transpose(0, 2, 1)))  # [NH, length, length]
        dv = matmul(softmax_cache.probs.transpose(0, 2, 1), dy_heads)  # [NH, length, HS]
        dscores = fast_layers._softmax_backward_in_place(dprobs, softmax_cache, scale=cache.scale)
        dq = matmul(dscores, k)
        dk = matmul(dscores.transpose(0, 2, 1), q)
        for index, d in enumerate((dq, dk, dv)):
            dqkv[start:stop, index] = d.transpose(1, 0, 2).reshape(length, C)

    _each_row(row, cache.rows, dy, sum(q.shape[0] * (stop - start) ** 2 for start, stop, q, *_ in cache.rows))
    dx, dc_attn_weight, dc_attn_bias = fast_layers.linear_backward(dqkv.reshape(M, 3 * C), cache.qkv_cache)
    return AttentionGrads(dx, dc_attn_weight, dc_attn_bias, dc_proj_weight, dc_proj_bias)


class PackedLayers:
    """kto_np.fast.layers with attention over the packed rows of one batch: the ops model.block_forward
    and block_backward run on (every other op works position by position, on [M, C] as on [B, T, C])."""

    def __init__(self, spans):
        self.spans = spans

    def __getattr__(self, name):
        return getattr(fast_layers, name)

    def attention_forward(self, x, c_attn_weight, c_attn_bias, c_proj_weight, c_proj_bias, num_heads, *,
                          dropout=0.0, train=False, rng=None):
        if train and dropout > 0:
            raise ValueError("packed rows run without dropout (step.py runs the full rows when dropout applies)")
        return attention_forward(x, c_attn_weight, c_attn_bias, c_proj_weight, c_proj_bias, num_heads, self.spans)

    def attention_backward(self, dout, cache: PackedAttentionCache) -> AttentionGrads:
        return attention_backward(dout, cache)


# ----------------------------------------------------------------------------------------------
# the body of a GPT on packed rows


class PackedBodyCache(NamedTuple):
    wte: EmbeddingCache  # the packed tokens' lookup
    spans: list  # (b, start, stop) of each kept row (row_spans)
    blocks: list  # L x model.BlockCache
    ln_f: LayerNormCache
    ops: PackedLayers
    dtype: Any


def _kept_positions(spans, T: int):
    """(flat indices b T + t into tokens [B, T], positions t) of the packed positions, [M] each (host)."""
    if not spans:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    t = np.concatenate([np.arange(stop - start) for _, start, stop in spans])
    flat = np.concatenate([row * T + np.arange(stop - start) for row, start, stop in spans])
    return flat, t


def body_forward(model, params: dict, tokens, spans, *, keep_cache: bool = True):
    """model.body_forward (without dropout) on the packed rows of spans (row_spans): tokens [B, T] ->
    (x_final [M, C], the cache body_backward needs, or None)."""
    config = model.config
    xp = array_module(params["wte.weight"])
    tokens = xp.asarray(tokens)
    flat, t = _kept_positions(spans, tokens.shape[1])
    ops = PackedLayers([(start, stop) for _, start, stop in spans])
    x, wte_cache = ops.embedding_forward(params["wte.weight"], tokens.reshape(-1).take(xp.asarray(flat)))  # [M, C]
    x += model.position_embeddings(params, tokens.shape[1]).take(xp.asarray(t), axis=0)
    x_final, block_caches, ln_f_cache = blocks_forward(params, x, config, train=False, rng=None,
                                                       keep_cache=keep_cache, ops=ops)
    if not keep_cache:
        return x_final, None
    return x_final, PackedBodyCache(wte_cache, spans, block_caches, ln_f_cache, ops, config.np_dtype)


def body_backward(model, dx_final, dhead_weight, cache: PackedBodyCache) -> dict:
    """model.body_backward on packed rows: dx_final [M, C] and dhead_weight [V, C] -> grads (same keys
    and shapes as params; 0 from the positions the rows do not keep, as in the full rows)."""
    config, ops = model.config, cache.ops
    xp = array_module(dx_final)
    grads: dict = {}
    dx = blocks_backward(dx_final, cache.blocks, cache.ln_f, grads, ops)
    if config.positional == "learned":
        dwpe = xp.zeros(param_shapes(config)["wpe.weight"], dtype=cache.dtype)
        for _, start, stop in cache.spans:  # row b's positions are 0..length_b - 1
            dwpe[:stop - start] += dx[start:stop]
        grads["wpe.weight"] = dwpe
    if config.tie_embeddings:
        grads["wte.weight"] = ops.embedding_backward(dx, cache.wte, out=dhead_weight)
    else:
        grads["wte.weight"] = ops.embedding_backward(dx, cache.wte)
        grads["lm_head.weight"] = dhead_weight
    return {name: grads[name] for name in param_shapes(config)}
