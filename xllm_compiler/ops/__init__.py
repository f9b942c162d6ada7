"""Custom ops of the ``xllm`` namespace (torch.library) and the reference forms models and patterns share.

Importing this package registers the ops; every other part of the project may import it.
"""

from xllm_compiler.ops import attention, reference

__all__ = ["attention", "reference"]
