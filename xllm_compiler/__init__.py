"""xllm_compiler: compile Hugging Face decoder checkpoints into graph-mode artifacts, and run them."""

__version__ = "0.1.0"

from xllm_compiler.api import compile, load

__all__ = ["__version__", "compile", "load"]
