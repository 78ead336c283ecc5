"""Measuring a model, compressed or not: perplexity and lm-eval tasks."""
