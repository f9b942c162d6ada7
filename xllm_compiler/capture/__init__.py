"""Capture: a traceable model -> an ATen FX GraphModule with symbolic step dims (torch.export)."""

from xllm_compiler.capture.export import capture

__all__ = ["capture"]
