"""Entry point: python -m jobs.vqa [--config configs/...yaml] [--set key=value ...]"""

from specvlm.pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main("vqa"))
