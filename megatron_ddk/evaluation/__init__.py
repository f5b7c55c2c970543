"""Evaluation outside the training loop: Hugging Face export, lm-evaluation-harness runs, local
tasks built from the held-out test split, the downstream report table.

Layer: beside training (imports config, parallel, models, data, reporting; never training).
"""
