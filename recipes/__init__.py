"""Runnable recipes: training, the equal-cost ablation and the alpha/beta/gamma search (see docs/research.md)."""
