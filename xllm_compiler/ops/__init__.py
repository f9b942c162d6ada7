"""Custom ops of the ``xllm`` namespace (torch.library) and the reference forms models and patterns share.

Importing this package registers the ops; every other part of the project may import it.
"""

from xllm_compiler.ops import activation, attention, norm, reference, rotary

__all__ = ["activation", "attention", "norm", "reference", "rotary"]
