"""Measurement: speed side by side (engine benchmark, baselines, replayed drafts) and task quality.

benchmark.py     every decoding mode on the same requests: ratios, identity, tau, c, r and limits
baselines.py     Hugging Face generate / assisted generation, and timing of single forward passes
replay.py        a draft replaying the target's known continuation at a controlled acceptance rate
demo_family.py   the demo target, its VLM draft and held-out requests, as the engine-level benchmarks load them
compile_comparison.py  compiled against eager decode steps, side by side at each cap
kernels.py       which SDPA kernels the engine's forwards run; a check that none is unfused math attention
vllm_plain.py    vLLM plain decoding of the same target and requests, against the engine's best settings
answers.py       VQA accuracy (VQA's answer normalisation), exact match, multiple-choice letters
captions.py      BLEU-4, METEOR, ROUGE-L, CIDEr through pycocoevalcap, with a Python PTB tokenizer
quality.py       a task's quality from output rows, overall and per metadata slice
report.py        the evaluation report: quality once, every strategy checked against the target, time beside it
plots.py         the report's figures
countdown.py     "run N/M" lines with the time left, for commands that run many runs in turn
"""
