"""Measurement: speed side by side (engine benchmark, baselines, replayed drafts) and quality.

benchmark.py     every decoding mode on the same requests: ratios, identity, tau, c, r and limits
baselines.py     Hugging Face generate / assisted generation, and timing of single forward passes
replay.py        a draft replaying the target's known continuation at a controlled acceptance rate
demo_quality.py  the demo family's accuracy and per-word acceptance on held-out world scenes
"""
