"""Training: the demo model family (tokenizer, target) and drafts for any target (text-only and small VLM).

    tokenizer.py   the demo tokenizer and the LLaVA-1.5 chat template
    examples.py    training examples (prompt ids + answer ids, loss on the answer) and their batching
    world_data.py  target training examples from the procedural world, made on the fly
    vision.py      stage 0 of the demo target: its vision tower learns to read the world's cells
    target.py      the demo target: shape, build, train, save
    outputs.py     distillation examples from a target's output Parquet joined with its input shards
    draft.py       drafts: build (text-only, VLM on the target's vision tower), pretrain, distill (train_draft)
    loop.py        the training loop: AdamW, warmup + cosine, progress bar, checkpoints and resume
    evaluate.py    quality through the engine: exact match, block efficiency, per-word acceptance
    demo.py        make_demo: every stage, from an empty directory to the shipped checkpoints
    cli.py         the command lines of jobs/train_draft and jobs/make_demo
"""
