"""Entry point: python -m jobs.make_demo_benchmark [--out assets/demo/benchmark]"""

from specvlm.demo.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
