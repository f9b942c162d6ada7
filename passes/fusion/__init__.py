"""Fusion passes: merged projections and fused xllm:: ops, one pass per file with its pattern."""
