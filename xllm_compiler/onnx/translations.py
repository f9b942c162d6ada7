"""The ONNX form of every xllm op a dynamic graph holds: onnxscript functions for torch.onnx's
``custom_translation_table`` (traced: Python control flow on attributes and static sizes is allowed).

- ``rms_norm``: ONNX's RMSNormalization (opset 23), computed in float32 like ours.
- ``fused_add_rms_norm``: onnxruntime's com.microsoft SkipSimplifiedLayerNormalization, which returns
  the normalised sum and the sum (its fourth output), as ours does.
- ``rotary_embedding``: plain ops. Ours takes cos/sin over the whole head dim; ONNX's and onnxruntime's
  RotaryEmbedding take half-width caches, the same only when both halves agree, which the op does not
  promise.
- ``silu_and_mul``: plain ops (Split, Sigmoid, Mul).
- ``write_kv_cache`` and the write inside ``paged_attention``: one ScatterND of the step's keys and values
  at their slots, into a new cache.
- ``paged_attention``: plain ops. onnxruntime's GroupQueryAttention reads a contiguous cache per
  sequence, not our blocks; so each sequence's context is gathered through its block table and a mask
  built from ``query_lens`` and ``seq_lens`` (causal, and the sliding window where there is one) picks
  the keys each token sees. A decode bucket holds one token per sequence (token i of sequence i: how the
  runtime builds decode steps), so its form attends row by row; a prefill bucket's tokens may belong to
  any of its sequences, so every token is scored against every sequence's context and masked, which costs
  ``num_seqs x heads x num_tokens x context`` floats.

- ``linear_w8``: the int8 weight widened to float32 and scaled by rows, then a float32 MatMul, as the op's
  composite computes (weight-only: the CPU kernel's int8 inputs are its own choice). Not DequantizeLinear:
  with it, onnxruntime's logits were 0.8% off the composite's, as far as its int8-input kernel's (its QDQ
  fusion of DequantizeLinear and MatMul).
- ``linear_w4``: plain ops: the two nibbles of each byte split with BitwiseAnd and BitShift, widened to
  float32, times each group's scale plus its offset, then a float32 MatMul. The weights stay packed in the
  file (4.5 bits a weight at groups of 128); a runtime that folds constants dequantizes them once.

Masked slots are read: the caller's cache must start zeroed, as the runtime's pool does (a NaN there is
not cancelled by a zero weight).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import xllm_compiler.onnx.functional  # noqa: F401  (registers the xllm_onnx twins translated here)

#: ONNX opset of the exported models: 23 is the first with RMSNormalization.
OPSET = 23


def translation_table(decode: bool) -> dict[Callable, Callable]:
    """op overload -> its ONNX form; ``decode``: attention for a decode bucket (one token per sequence)."""
    import onnx
    from onnxscript import opset23
    from onnxscript.values import Op, Opset

    op: Any = opset23  # traced, not compiled: Python ints and lists stand for constants, which its stubs refuse

    skip_norm = Op(Opset("com.microsoft", 1), "SkipSimplifiedLayerNormalization", _skip_norm_schema(onnx))
    int64, float32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT

    def rms_norm(x, weight, eps: float):
        return op.RMSNormalization(x, weight, axis=-1, epsilon=eps, stash_type=1)

    def fused_add_rms_norm(x, residual, weight, eps: float):
        normed, _, _, summed = skip_norm(x, residual, weight, epsilon=eps)
        return normed, summed

    def silu_and_mul(gate_up):
        gate, up = op.Split(gate_up, axis=-1, num_outputs=2)
        return op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)

    def rotate(x, cos, sin):
        first, second = op.Split(x, axis=-1, num_outputs=2)
        return op.Add(op.Mul(x, cos), op.Mul(op.Concat(op.Neg(second), first, axis=-1), sin))

    def rotary_embedding(query, key, cos, sin):
        return rotate(query, cos, sin), rotate(key, cos, sin)

    def write_kv_cache(key, value, kv_cache, slot_mapping):
        shape = op.Shape(kv_cache)
        flat = op.Reshape(kv_cache, op.Concat(op.Constant(value_ints=[2, -1]), op.Slice(shape, [3], [5]), axis=0))
        slots = op.Unsqueeze(slot_mapping, [1])
        halves = [op.Concat(op.Expand(op.Constant(value_ints=[i]), op.Shape(slots)), slots, axis=1) for i in (0, 1)]
        indices = op.Concat(op.Unsqueeze(halves[0], [0]), op.Unsqueeze(halves[1], [0]), axis=0)  # [2, T, 2]
        updates = op.Concat(op.Unsqueeze(key, [0]), op.Unsqueeze(value, [0]), axis=0)  # [2, T, Hkv, D]
        return op.Reshape(op.ScatterND(flat, indices, updates), shape)

    def paged_attention(
        query, key, value, kv_cache, slot_mapping, query_lens, seq_lens, block_tables, scale: float, sliding_window: int
    ):
        cache = write_kv_cache(key, value, kv_cache, slot_mapping)
        num_tokens, num_heads, head_dim = query.shape
        num_seqs = block_tables.shape[0]
        _, _, block_size, num_kv_heads, _ = kv_cache.shape
        group = num_heads // num_kv_heads

        def context_of(half: int):  # [S, Hkv, 1, L, D]: each sequence's cached keys (or values), block by block
            blocks = op.Gather(op.Gather(cache, op.Constant(value_int=half), axis=0), block_tables, axis=0)
            rows = op.Reshape(blocks, op.Constant(value_ints=[num_seqs, -1, num_kv_heads, head_dim]))
            return op.Unsqueeze(op.Transpose(rows, perm=[0, 2, 1, 3]), [2])

        lens = op.Cast(query_lens, to=int64)
        # L = the block table's width x block_size: symbolic, so that a caller may pass only the blocks in use
        context = op.Mul(op.Gather(op.Shape(block_tables), op.Constant(value_int=1)), op.Constant(value_int=block_size))
        keys = op.Range(op.Constant(value_int=0), context, op.Constant(value_int=1))
        # query [T, H, D] -> [Hkv, G, D] rows: head h reads kv head h // G, as GQA does
        q = op.Reshape(query, [num_tokens, num_kv_heads, group, head_dim])
        if decode:  # token s is sequence s's only new token: q [S, Hkv, G, 1, D], visible [S, 1, 1, 1, L]
            q = op.Unsqueeze(q, [3])
            position = op.Unsqueeze(op.Sub(op.Cast(seq_lens, to=int64), op.Constant(value_int=1)), [1])  # [S, 1]
            visible = op.And(
                op.Greater(op.Unsqueeze(lens, [1]), op.Constant(value_int=0)), op.LessOrEqual(keys, position)
            )
        else:  # token t against every sequence s: q [1, Hkv, G, T, D], visible [S, 1, 1, T, L]
            q = op.Unsqueeze(op.Transpose(q, perm=[1, 2, 0, 3]), [0])
            ends = op.Unsqueeze(op.CumSum(lens, op.Constant(value_int=0)), [1])
            starts = op.Sub(ends, op.Unsqueeze(lens, [1]))  # [S, 1]
            tokens = op.Range(op.Constant(value_int=0), op.Constant(value_int=num_tokens), op.Constant(value_int=1))
            mine = op.Unsqueeze(op.And(op.GreaterOrEqual(tokens, starts), op.Less(tokens, ends)), [2])  # [S, T, 1]
            past = op.Sub(op.Cast(op.Unsqueeze(seq_lens, [1]), to=int64), op.Unsqueeze(lens, [1]))
            position = op.Unsqueeze(op.Add(past, op.Sub(tokens, starts)), [2])  # [S, T, 1]: each token's position
            visible = op.And(mine, op.LessOrEqual(keys, position))  # [S, T, L]
        if sliding_window > 0:
            visible = op.And(visible, op.Greater(keys, op.Sub(position, op.Constant(value_int=sliding_window))))
        visible = op.Unsqueeze(visible, [1, 2] if not decode else [1, 2, 3])

        scores = op.MatMul(q, op.Transpose(context_of(0), perm=[0, 1, 2, 4, 3]))
        scores = op.Mul(scores, op.CastLike(op.Constant(value_float=scale), scores))
        weights = op.Softmax(op.Where(visible, scores, op.CastLike(op.Constant(value_float=float("-inf")), scores)))
        weights = op.Where(visible, weights, op.CastLike(op.Constant(value_float=0.0), scores))  # rows of no key
        out = op.MatMul(weights, context_of(1))  # decode [S, Hkv, G, 1, D]; prefill [S, Hkv, G, T, D]
        if not decode:  # each token's sequence is the only one that gave it weight
            out = op.Transpose(op.ReduceSum(out, [0], keepdims=0), perm=[2, 0, 1, 3])
        return op.Reshape(out, [num_tokens, num_heads, head_dim]), cache

    def byte(value: int):
        return op.Constant(value=onnx.helper.make_tensor("byte", onnx.TensorProto.UINT8, [], [value]))

    def float_linear(x, weight, bias):
        """x @ weight.T (+ bias) in float32, in x's dtype: the quantized linears' composites."""
        y = op.MatMul(op.Cast(x, to=float32), op.Transpose(weight, perm=[1, 0]))
        return op.CastLike(y if bias is None else op.Add(y, op.Cast(bias, to=float32)), x)

    def linear_w8(x, qweight, scale, bias=None):
        return float_linear(x, op.Mul(op.Cast(qweight, to=float32), op.Unsqueeze(scale, [1])), bias)

    def linear_w4(x, qweight, scale, offset, group_size: int, bias=None):
        rows, groups = scale.shape
        k_size = x.shape[-1]
        low = op.BitwiseAnd(qweight, byte(0x0F))
        high = op.BitShift(qweight, byte(4), direction="RIGHT")
        nibbles = op.Concat(op.Unsqueeze(low, [2]), op.Unsqueeze(high, [2]), axis=2)  # [N, ceil(K/2), 2]: even k low
        values = op.Cast(op.Reshape(nibbles, [rows, -1]), to=float32)
        padded = op.Pad(values, [0, 0, 0, groups * group_size - 2 * int(qweight.shape[1])])
        grouped = op.Reshape(padded, [rows, groups, group_size])
        weight = op.Add(op.Mul(grouped, op.Unsqueeze(scale, [2])), op.Unsqueeze(offset, [2]))
        weight = op.Slice(op.Reshape(weight, [rows, groups * group_size]), [0], [k_size], [1])
        return float_linear(x, weight, bias)

    xllm, functional = torch.ops.xllm, torch.ops.xllm_onnx
    return {
        xllm.linear_w8.default: linear_w8,
        xllm.linear_w4.default: linear_w4,
        xllm.rms_norm.default: rms_norm,
        xllm.fused_add_rms_norm.default: fused_add_rms_norm,
        xllm.silu_and_mul.default: silu_and_mul,
        xllm.rotary_embedding.default: rotary_embedding,
        functional.paged_attention.default: paged_attention,
        functional.write_kv_cache.default: write_kv_cache,
    }


def _skip_norm_schema(onnx: Any) -> Any:
    """onnxruntime's SkipSimplifiedLayerNormalization, declared for onnxscript (the onnx package has no
    com.microsoft schemas): output = rms_norm(input + skip) * gamma; the sum is the fourth output."""
    schema = onnx.defs.OpSchema
    parameter = schema.FormalParameter
    optional = schema.FormalParameterOption.Optional
    return schema(
        "SkipSimplifiedLayerNormalization",
        "com.microsoft",
        1,
        inputs=[parameter("input", "T"), parameter("skip", "T"), parameter("gamma", "T")],
        outputs=[
            parameter("output", "T"),
            parameter("mean", "U", param_option=optional),
            parameter("inv_std_var", "U", param_option=optional),
            parameter("input_skip_bias_sum", "T", param_option=optional),
        ],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
            ("U", ["tensor(float)"], ""),
        ],
        attributes=[schema.Attribute("epsilon", schema.AttrType.FLOAT, "", required=True)],
    )
