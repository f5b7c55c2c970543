"""The training loop, per-domain evaluation, checkpoints, logging and FLOP accounting.

A regular package (setuptools' find_packages skips folders without this file, so a non-editable
install would have shipped without training/). Entry: training/entry.py; the loop: trainer.py.
"""
