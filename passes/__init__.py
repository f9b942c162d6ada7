"""Graph passes over ATen FX GraphModules: cleanup, fusion, communication overlap, memory planning.

Passes never import models/ or runtime/: they see GraphModules only.
"""

from xllm_compiler.passes.graph_pass import FunctionPass, GraphPass, PassResult, graph_pass
from xllm_compiler.passes.manager import PassManager, PassRecord, bucket_pipeline, default_pipeline, select_passes

__all__ = [
    "FunctionPass",
    "GraphPass",
    "PassManager",
    "PassRecord",
    "PassResult",
    "bucket_pipeline",
    "default_pipeline",
    "graph_pass",
    "select_passes",
]
