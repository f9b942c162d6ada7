"""The flat decoder shared by Llama, Mistral, Qwen2/3, their MoE kin and DeepSeek-V3: one readable forward over
flattened tokens.

Module names follow Hugging Face's checkpoints (``model.layers.0.self_attn.q_proj``...) so that weights
load by name. Attention is the opaque ``xllm::paged_attention`` op (DeepSeek's latent attention
``xllm::mla_attention``) and routed experts the opaque ``xllm::moe_experts`` op; everything else is plain
torch and the reference ops of ``xllm_compiler.ops.reference``, which the fusion passes later recognise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import xllm_compiler.ops  # noqa: F401  (registers torch.ops.xllm)
from xllm_compiler.models.config import ModelSpec, MoESpec
from xllm_compiler.models.parallel import TRACED_GROUP, TensorParallel
from xllm_compiler.models.rope import cos_sin_tables
from xllm_compiler.ops.collectives import all_reduce
from xllm_compiler.ops.reference import (
    apply_rotary,
    rms_norm,
    route_group_limited_softmax,
    route_grouped_topk,
    route_topk,
    silu_and_mul,
)

#: Linear layers whose weight the model reads as a tensor rather than by calling the layer (MLA's kv_b_proj,
#: the MoE router): they keep a float weight whatever the checkpoint stores.
WEIGHTS_READ_DIRECTLY = ("self_attn.kv_b_proj", "mlp.gate")
#: transformers builds MLA's q_a_layernorm and kv_a_layernorm with RMSNorm's default eps, not the config's.
MLA_NORM_EPS = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class RowParallelLinear(nn.Module):
    """A linear layer whose input features are split over the tensor-parallel ranks: each computes a
    partial sum, an all-reduce adds them, then the (whole, replicated) bias is added once. With
    ``reduce=False`` (bias-free layers only) it returns the partial sum, for a caller that adds more
    partials before one all-reduce of its own (the shared expert of an MoE layer)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel, reduce: bool = True):
        super().__init__()
        shard = nn.Linear(tp.local(in_features), out_features, bias=bias)  # nn.Linear's initialisation
        self.weight, self.bias = shard.weight, shard.bias
        self.tp, self.reduce = tp, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1 or not self.reduce:
            return F.linear(x, self.weight, self.bias)
        y = all_reduce(F.linear(x, self.weight), TRACED_GROUP)
        return y if self.bias is None else y + self.bias


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, tp: TensorParallel):
        super().__init__()
        self.num_heads, self.num_kv_heads = tp.local(spec.num_heads), tp.local(spec.num_kv_heads)
        self.head_dim = spec.head_dim
        q_size, kv_size = self.num_heads * spec.head_dim, self.num_kv_heads * spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, q_size, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(spec.hidden_size, kv_size, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(spec.hidden_size, kv_size, bias=spec.qkv_bias)
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size, spec.o_bias, tp)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        self.qk_norm = spec.qk_norm
        self.scale = spec.head_dim**-0.5
        self.sliding_window = spec.sliding_windows[layer]

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, 1, D]
        sin: torch.Tensor,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
        step: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        q = self.q_proj(x).view(-1, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = torch.ops.xllm.paged_attention(
            q,
            k,
            v,
            kv_cache,
            step["slot_mapping"],
            step["query_lens"],
            step["seq_lens"],
            step["block_tables"],
            self.scale,
            self.sliding_window,
        )  # [T, H, D]
        return self.o_proj(out.view(-1, self.num_heads * self.head_dim))


class LatentAttention(nn.Module):
    """DeepSeek's multi-head latent attention, as transformers computes it: queries from ``q_proj`` or the
    low-rank ``q_a_proj -> q_a_layernorm -> q_b_proj``; one latent per token from ``kv_a_proj_with_mqa``
    (normalised) plus a rotary key part shared by all heads, which is what the cache keeps. The opaque
    ``xllm::mla_attention`` expands keys and values from the cached latents through ``kv_b_proj``; the
    ``absorb_mla_weights`` pass turns decode buckets into attention over the latent itself (ops/mla.py).
    With tensor parallelism each rank holds its heads' rows of q(_b)_proj and kv_b_proj and all of the
    latent (kv_a_proj_with_mqa and q_a_proj are replicated)."""

    def __init__(self, spec: ModelSpec, tp: TensorParallel):
        super().__init__()
        mla = spec.mla
        assert mla is not None
        self.mla, self.num_heads = mla, tp.local(spec.num_heads)
        q_size = self.num_heads * mla.qk_head_dim
        if mla.q_lora_rank:
            self.q_a_proj = nn.Linear(spec.hidden_size, mla.q_lora_rank, bias=mla.attention_bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, MLA_NORM_EPS)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, q_size, bias=False)
        else:
            self.q_proj = nn.Linear(spec.hidden_size, q_size, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(spec.hidden_size, mla.latent_dim, bias=mla.attention_bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, MLA_NORM_EPS)
        heads_kv = self.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, heads_kv, bias=False)
        self.o_proj = RowParallelLinear(spec.num_heads * mla.v_head_dim, spec.hidden_size, mla.attention_bias, tp)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, 1, rope]
        sin: torch.Tensor,
        kv_cache: torch.Tensor,  # [1, num_blocks, block_size, 1, kv_lora_rank + rope]
        step: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        mla = self.mla
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if mla.q_lora_rank else self.q_proj(x)
        q_nope, q_pe = q.view(-1, self.num_heads, mla.qk_head_dim).split(
            [mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1
        )
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_pe, k_pe = apply_rotary(q_pe, cos, sin), apply_rotary(k_pe.unsqueeze(1), cos, sin)
        out = torch.ops.xllm.mla_attention(
            q_nope,
            q_pe,
            latent,
            k_pe,
            kv_cache,
            step["slot_mapping"],
            step["query_lens"],
            step["seq_lens"],
            step["block_tables"],
            self.kv_b_proj.weight,
            mla.softmax_scale,
        )  # [T, H, v]
        return self.o_proj(out.reshape(-1, self.num_heads * mla.v_head_dim))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TensorParallel, intermediate_size: int | None = None, reduce: bool = True):
        super().__init__()
        intermediate_size = intermediate_size or spec.intermediate_size
        self.gate_proj = nn.Linear(spec.hidden_size, tp.local(intermediate_size), bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, tp.local(intermediate_size), bias=False)
        self.down_proj = RowParallelLinear(intermediate_size, spec.hidden_size, False, tp, reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_proj(x), self.up_proj(x)))


class Experts(nn.Module):
    """Every routed expert's weights, stacked: gate and up merged at load (see models/weights.py). With
    tensor parallelism, this rank's slice of each expert's intermediate dim (of gate and of up); with
    expert parallelism, the experts of this rank's slots (``rows``)."""

    def __init__(self, spec: ModelSpec, moe: MoESpec, tp: TensorParallel, moe_layer: int):
        super().__init__()
        hidden, size = spec.hidden_size, tp.local(moe.expert_intermediate_size)
        # The logical expert in each of this rank's slots (expert parallelism): only those are loaded.
        self.rows = tp.ep.rows(moe_layer, moe.num_experts) if tp.ep.size > 1 else None
        experts = len(self.rows) if self.rows is not None else moe.num_experts
        # Random at nn.Linear's scale: the checkpoint replaces them, but a graph traced without one needs values.
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * size, hidden) * hidden**-0.5)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, size) * size**-0.5)


class GroupedTopkRouter(nn.Module):
    """DeepSeek's router (``mlp.gate``): its weight and (V3) the choice-only ``e_score_correction_bias``, both
    kept in float32 whatever the model dtype, as transformers keeps them."""

    def __init__(self, hidden_size: int, num_experts: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, hidden_size) * hidden_size**-0.5)
        if bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts))


class SparseMoE(nn.Module):
    """Router -> top-k experts (-> + a shared expert), as transformers computes it: Qwen's and Mixtral's
    router logits in the model dtype, softmax and top-k in float32; DeepSeek's grouped routing (V3: sigmoid,
    V2: softmax) all in float32. Qwen2-MoE gates its shared expert by a sigmoid, DeepSeek adds its shared experts as is.

    With tensor parallelism the router and its gates are replicated (every rank routes the same tokens
    to the same experts), the experts and the shared expert return partial sums, and one all-reduce
    adds them: the shared expert's partial goes in before it, so the layer has one collective, not two.
    With expert parallelism (models/parallel.py) each rank runs only the experts its ``expert_table``
    names; the all-reduce adds the ranks' partial sums, and the replicated shared expert joins after it.
    """

    def __init__(self, spec: ModelSpec, moe: MoESpec, tp: TensorParallel, moe_layer: int):
        super().__init__()
        self.moe, self.tp = moe, tp
        if moe.router_in_float32:
            self.gate = GroupedTopkRouter(spec.hidden_size, moe.num_experts, moe.router_bias)
        else:
            self.gate = nn.Linear(spec.hidden_size, moe.num_experts, bias=False)
        self.experts = Experts(spec, moe, tp, moe_layer)  # this rank's slots only, under expert parallelism
        table, self.columns = tp.ep.expert_table(moe_layer, moe.num_experts) if tp.ep.size > 1 else (None, 1)
        self.register_buffer("expert_table", table)  # None: this rank holds every expert
        # Tokens routed to each expert (and, last, tokens seen): the runtime's expert stats (ops/moe.py).
        self.register_buffer("expert_counts", torch.zeros(moe.num_experts + 1, dtype=torch.int64, device="cpu"))
        if moe.shared_expert_size:
            self.add_module(moe.shared_module, MLP(spec, tp, moe.shared_expert_size, reduce=False))
            if moe.shared_expert_gated:
                self.shared_expert_gate = nn.Linear(spec.hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k weights and expert ids [T, k] of each row of ``x``."""
        moe = self.moe
        if moe.scoring == "sigmoid":
            logits = F.linear(x.float(), self.gate.weight.float())
            bias = self.gate.e_score_correction_bias
            grouping = (moe.num_groups, moe.topk_groups, moe.renormalise, moe.routed_scaling_factor)
            return route_grouped_topk(logits, bias, moe.top_k, *grouping)
        if moe.scoring == "group_softmax":
            logits = F.linear(x.float(), self.gate.weight.float())
            grouping = (moe.num_groups, moe.topk_groups, moe.routed_scaling_factor)
            return route_group_limited_softmax(logits, moe.top_k, *grouping)
        return route_topk(self.gate(x), moe.top_k, moe.renormalise)

    def forward(self, x: torch.Tensor, slot_mapping: torch.Tensor | None = None) -> torch.Tensor:  # [T, H], [T]
        weights, ids = self.route(x)  # [T, k] each
        if self.moe.weights_in_model_dtype:
            weights = weights.to(x.dtype)
        experts = (x, weights, ids, self.experts.gate_up_proj, self.experts.down_proj, self.expert_table, self.columns)
        counts = self.expert_counts if slot_mapping is not None else None  # no slots, no padding to tell apart
        out = torch.ops.xllm.moe_experts(*experts, counts, slot_mapping)
        if self.expert_table is not None:
            out = all_reduce(out, TRACED_GROUP)
        if self.moe.shared_expert_size:
            shared = getattr(self, self.moe.shared_module)(x)
            out = out + (torch.sigmoid(self.shared_expert_gate(x)) * shared if self.moe.shared_expert_gated else shared)
        return all_reduce(out, TRACED_GROUP) if self.tp.size > 1 else out


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, tp: TensorParallel):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = LatentAttention(spec, tp) if spec.mla is not None else Attention(spec, layer, tp)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.sparse = spec.moe is not None and spec.moe.sparse_layers[layer]
        self.ffn_name = spec.moe.module if self.sparse else "mlp"  # Mixtral's checkpoints say block_sparse_moe
        moe_layer = sum(spec.moe.sparse_layers[:layer]) if self.sparse else 0  # its index among the MoE layers
        self.add_module(self.ffn_name, SparseMoE(spec, spec.moe, tp, moe_layer) if self.sparse else MLP(spec, tp))

    def forward(self, h, cos, sin, kv_cache, step):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv_cache, step)
        ffn_inputs = (step["slot_mapping"],) if self.sparse else ()  # MoE counts real (non-padding) tokens
        return h + getattr(self, self.ffn_name)(self.post_attention_layernorm(h), *ffn_inputs)


class DecoderModel(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, tp) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class DecoderForCausalLM(nn.Module):
    """input_ids [T] + step metadata + one KV cache per layer -> logits [S, vocab] (float32).

    ``logits_indices`` [S] picks each sequence's last token after the final norm, so the LM head runs
    on S rows, not T. With tensor parallelism (``tp``) the module holds this rank's shards and its
    row-parallel projections all-reduce their outputs.
    """

    def __init__(self, spec: ModelSpec, max_positions: int, dtype: torch.dtype, tp: TensorParallel | None = None):
        super().__init__()
        self.spec = spec
        self.tp = tp or TensorParallel()
        self.tp.check(spec)
        self.model = DecoderModel(spec, self.tp)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = cos_sin_tables(spec.rope, spec.head_dim, max_positions, dtype)
        self.register_buffer("rope_cos", cos)
        self.register_buffer("rope_sin", sin)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        slot_mapping: torch.Tensor,  # [T] int64
        query_lens: torch.Tensor,  # [S] int32
        seq_lens: torch.Tensor,  # [S] int32
        block_tables: torch.Tensor,  # [S, max_blocks_per_seq] int32
        logits_indices: torch.Tensor,  # [S] int64
        kv_caches: list[torch.Tensor],  # L x [2, num_blocks, block_size, Hkv, D] (MLA: [1, ..., 1, latent])
    ) -> torch.Tensor:
        step = {
            "slot_mapping": slot_mapping,
            "query_lens": query_lens,
            "seq_lens": seq_lens,
            "block_tables": block_tables,
        }
        cos = self.rope_cos.index_select(0, positions).unsqueeze(1)  # [T, 1, D]
        sin = self.rope_sin.index_select(0, positions).unsqueeze(1)
        h = self.model.embed_tokens(input_ids)  # [T, hidden]
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            h = layer(h, cos, sin, kv_cache, step)
        h = self.model.norm(h).index_select(0, logits_indices)  # [S, hidden]
        return self.lm_head(h).float()  # [S, vocab]
