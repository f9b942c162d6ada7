"""Drop nodes whose values nobody uses, and the weights only they referenced.

Mutating ops (the KV-cache write inside paged attention) count as used: fx treats ops with a mutable
schema as impure, so they stay.
"""

from __future__ import annotations

from torch import fx

from xllm_compiler.passes.graph_pass import graph_pass


def delete_unused_attributes(gm: fx.GraphModule) -> None:
    """Remove weights no get_attr node references any more, so the artifact does not store them."""
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for name, _ in list(gm.named_buffers()) + list(gm.named_parameters()):
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner), leaf)


@graph_pass("eliminate_dead_code", version=1)
def eliminate_dead_code(gm: fx.GraphModule) -> bool:
    changed = gm.graph.eliminate_dead_code()
    if changed:
        delete_unused_attributes(gm)
    return changed
