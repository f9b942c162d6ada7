"""Custom ops of the ``xllm`` namespace (torch.library) and the reference forms models and patterns share.

Importing this package registers the ops; every other part of the project may import it.
``KERNELS`` maps each op to its torch-composite kernel: the runtime's CPU platform calls these
directly instead of going through the dispatcher (one Python call instead of a round trip).
"""

from xllm_compiler.ops import activation, attention, collectives, mla, moe, norm, quant, reference, rotary

KERNELS = {
    "xllm::rms_norm": norm.rms_norm_kernel,
    "xllm::fused_add_rms_norm": norm.fused_add_rms_norm_kernel,
    "xllm::silu_and_mul": activation.silu_and_mul_kernel,
    "xllm::rotary_embedding": rotary.rotary_embedding_kernel,
    "xllm::paged_attention": attention.paged_attention_kernel,
    "xllm::write_kv_cache": attention.write_kv_cache_kernel,
    "xllm::rms_norm_out": norm.rms_norm_out_kernel,
    "xllm::fused_add_rms_norm_out": norm.fused_add_rms_norm_out_kernel,
    "xllm::silu_and_mul_out": activation.silu_and_mul_out_kernel,
    "xllm::rotary_embedding_out": rotary.rotary_embedding_out_kernel,
    "xllm::paged_attention_out": attention.paged_attention_out_kernel,
    "xllm::all_reduce_add_rms_norm": collectives.all_reduce_add_rms_norm_kernel,
    "xllm::moe_experts": moe.moe_experts_kernel,
    "xllm::moe_experts_out": moe.moe_experts_out_kernel,
    "xllm::fused_moe": moe.fused_moe_kernel,
    "xllm::fused_moe_out": moe.fused_moe_out_kernel,
    "xllm::linear_w8": quant.linear_w8_kernel,
    "xllm::linear_w8_out": quant.linear_w8_out_kernel,
    "xllm::linear_w4": quant.linear_w4_kernel,
    "xllm::linear_w4_out": quant.linear_w4_out_kernel,
    "xllm::mla_attention": mla.mla_attention_kernel,
    "xllm::latent_attention": mla.latent_attention_kernel,
}

#: The ``*_out`` form of each op, with the names of its output arguments in return order: the memory
#: planner rewrites an op into this form to make it write into the activation arena.
OUT_FORMS = {
    "xllm::rms_norm": ("xllm::rms_norm_out", ("out",)),
    "xllm::fused_add_rms_norm": ("xllm::fused_add_rms_norm_out", ("out", "summed")),
    "xllm::silu_and_mul": ("xllm::silu_and_mul_out", ("out",)),
    "xllm::rotary_embedding": ("xllm::rotary_embedding_out", ("query_out", "key_out")),
    "xllm::paged_attention": ("xllm::paged_attention_out", ("out",)),
    "xllm::moe_experts": ("xllm::moe_experts_out", ("out",)),
    "xllm::fused_moe": ("xllm::fused_moe_out", ("out",)),
    "xllm::linear_w8": ("xllm::linear_w8_out", ("out",)),
    "xllm::linear_w4": ("xllm::linear_w4_out", ("out",)),
}
#: The capture-safe kernel of each op whose KERNELS entry takes a host-side path on the CPU: what CUDA
#: and NPU graphs run where no fused kernel takes the op, and what the capture-safety audit checks.
CAPTURE_SAFE_KERNELS = {**attention.CAPTURE_SAFE_KERNELS, **mla.CAPTURE_SAFE_KERNELS, **moe.CAPTURE_SAFE_KERNELS}

__all__ = [
    "CAPTURE_SAFE_KERNELS",
    "KERNELS",
    "OUT_FORMS",
    "activation",
    "attention",
    "collectives",
    "mla",
    "moe",
    "norm",
    "quant",
    "reference",
    "rotary",
]
