"""The runtime: load an artifact and run it (graph cache, paged KV cache, scheduler, sampling).

It reads artifacts only; it never imports models/ or passes/, so artifacts run without the code that
produced them.
"""

from xllm_compiler.runtime.loader import load
from xllm_compiler.runtime.model import CompiledModel

__all__ = ["CompiledModel", "load"]
