"""Buckets: the per-shape graph cache the compiler builds (decode batch sizes, prefill token counts).

``policy`` (which shapes) is shared with the runtime; ``specialize`` and ``traffic`` are compile-side
and imported from their modules, so that reading an artifact does not load them.
"""

from xllm_compiler.buckets.policy import DECODE, PREFILL, VERIFY, Bucket, make_buckets

__all__ = ["DECODE", "PREFILL", "VERIFY", "Bucket", "make_buckets"]
