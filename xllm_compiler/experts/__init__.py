"""Expert load balancing: reading measured routing stats, and planning expert placement from them."""

from xllm_compiler.experts.placement import LayerPlan, Placement, plan_placement
from xllm_compiler.experts.stats import ExpertStats, read_stats

__all__ = ["ExpertStats", "LayerPlan", "Placement", "plan_placement", "read_stats"]
