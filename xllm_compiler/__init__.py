"""xllm_compiler: compile Hugging Face decoder checkpoints into graph-mode artifacts, and run them."""

import os
import sys

# `import torch` imports every installed device backend (its "torch.backends" entry points), and one that
# cannot load makes `import torch` itself raise: torch_npu without the CANN toolkit does. Opt out as torch
# documents, before anything here imports torch and unless the user chose: CPU use never depends on a
# device stack, and runtime/platform/npu.py imports torch_npu itself when --device npu asks for it.
if "torch" not in sys.modules:
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

__version__ = "0.1.0"

from xllm_compiler.api import compile, export_onnx, load

__all__ = ["__version__", "compile", "export_onnx", "load"]
