"""Entry point: python -m jobs.make_demo [--out assets/demo/models] [--target-steps N ...]"""

from specvlm.demo.cli import make_demo_main

if __name__ == "__main__":
    raise SystemExit(make_demo_main())
