"""Buckets: the per-shape graph cache the compiler builds (decode batch sizes, prefill token counts)."""

from xllm_compiler.buckets.policy import DECODE, PREFILL, Bucket, make_buckets
from xllm_compiler.buckets.specialize import specialize

__all__ = ["DECODE", "PREFILL", "Bucket", "make_buckets", "specialize"]
