"""Entry point: python -m jobs.train_draft --target DIR --kind text|vlm --outputs 'out/*.parquet' --out DIR"""

from specvlm.training.cli import train_draft_main

if __name__ == "__main__":
    raise SystemExit(train_draft_main())
