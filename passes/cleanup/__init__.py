"""Cleanup passes: dead code, common subexpressions, no-op casts and views, constant folding."""
