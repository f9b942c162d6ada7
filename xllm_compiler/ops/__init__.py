"""Custom ops of the ``xllm`` namespace (torch.library) and the reference forms models and patterns share.

Importing this package registers the ops; every other part of the project may import it.
``KERNELS`` maps each op to its torch-composite kernel: the runtime's CPU platform calls these
directly instead of going through the dispatcher (one Python call instead of a round trip).
"""

from xllm_compiler.ops import activation, attention, collectives, norm, reference, rotary

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
}

#: The ``*_out`` form of each op, with the names of its output arguments in return order: the memory
#: planner rewrites an op into this form to make it write into the activation arena.
OUT_FORMS = {
    "xllm::rms_norm": ("xllm::rms_norm_out", ("out",)),
    "xllm::fused_add_rms_norm": ("xllm::fused_add_rms_norm_out", ("out", "summed")),
    "xllm::silu_and_mul": ("xllm::silu_and_mul_out", ("out",)),
    "xllm::rotary_embedding": ("xllm::rotary_embedding_out", ("query_out", "key_out")),
    "xllm::paged_attention": ("xllm::paged_attention_out", ("out",)),
}

__all__ = ["KERNELS", "OUT_FORMS", "activation", "attention", "collectives", "norm", "reference", "rotary"]
