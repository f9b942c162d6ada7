"""ONNX export of an artifact's bucket graphs, for inspection and for running in onnxruntime.

The exported model's inputs are the calling convention (``xllm_compiler.interface.STEP_INPUTS``) and one
paged KV cache per layer; its outputs are the logits and each layer's updated cache (``present_*``), which
the caller feeds back as the next step's cache: ONNX has no in-place update. functional.py makes the
graph's cache writes functional, translations.py gives every ``xllm::`` op its ONNX form, export.py reads
the artifact and runs torch.onnx's dynamo exporter.

onnx, onnxscript and onnxruntime are optional (``pip install 'xllm-compiler[onnx]'``); they are imported
only when an export runs, never by ``import xllm_compiler``.
"""

from xllm_compiler.onnx.export import export_artifact, export_onnx, onnx_inputs

__all__ = ["export_artifact", "export_onnx", "onnx_inputs"]
