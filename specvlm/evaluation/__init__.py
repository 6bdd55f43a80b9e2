"""Measurement: speed side by side (engine benchmark, baselines, replayed drafts) and task quality.

benchmark.py     every decoding mode on the same requests: ratios, identity, tau, c, r and limits
baselines.py     Hugging Face generate / assisted generation, and timing of single forward passes
replay.py        a draft replaying the target's known continuation at a controlled acceptance rate
answers.py       VQA accuracy (VQA's answer normalisation), exact match, multiple-choice letters
captions.py      BLEU-4, METEOR, ROUGE-L, CIDEr through pycocoevalcap, with a Python PTB tokenizer
quality.py       a task's quality from output rows, overall and per metadata slice
report.py        the evaluation report: quality once, every strategy checked against the target, time beside it
plots.py         the report's figures
countdown.py     "run N/M" lines with the time left, for commands that run many runs in turn
"""
