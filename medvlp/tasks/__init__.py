"""Downstream evaluation tasks: zero-shot classification, retrieval, grounding, linear probes, survival, plots."""
