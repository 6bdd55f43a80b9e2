"""Entry point: python -m jobs.caption [--config configs/...yaml] [--set key=value ...]"""

from pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main("caption"))
