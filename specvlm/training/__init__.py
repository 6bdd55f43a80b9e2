"""Training a draft for any target (text-only or small VLM) from the target's own outputs.

examples.py    training examples (prompt ids + answer ids, loss on the answer) and their batching
outputs.py     distillation examples from a target's output Parquet joined with its input shards
draft.py       drafts: build (text-only, VLM on the target's vision tower), pretrain, distill (train_draft)
loop.py        the training loop: AdamW, warmup + cosine, progress bar, checkpoints and resume
cli.py         the command line of jobs/train_draft
"""
