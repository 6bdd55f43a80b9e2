"""The `specvlm` command (installed with the package): every job as a subcommand, from any directory.

    specvlm caption | vqa | mc   [--config FILE] [--set KEY=VALUE ...] [--retry-errors] [--verbose] [--dry-run]
    specvlm evaluate | benchmark | train-draft | score   (each with its own flags: specvlm COMMAND --help)

`python -m jobs.caption` and the other modules run the same code.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, its entry function, what it does)
COMMANDS = {
    "caption": ("pipeline.cli", "main", "caption image shards (configs/demo.yaml)"),
    "vqa": ("pipeline.cli", "main", "answer each record's question (configs/demo-vqa.yaml)"),
    "mc": ("pipeline.cli", "main", "multiple choice with chain-of-thought (configs/demo-mc.yaml)"),
    "evaluate": ("jobs.evaluate", "main", "task quality of every strategy against the target alone, a report"),
    "benchmark": ("jobs.benchmark", "main", "speed of every mode side by side, as ratios"),
    "train-draft": ("specvlm.training.cli", "train_draft_main", "train a draft for a target from its outputs"),
    "score": ("jobs.score", "main", "score a job's or an evaluation's output again, without a model"),
}
TASKS = ("caption", "vqa", "mc")


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [__doc__.strip().splitlines()[0], "", "usage: specvlm COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, _, about) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"specvlm: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[name]
    entry = getattr(importlib.import_module(module), function)
    sys.argv[0] = f"specvlm {name}"  # the usage line of the commands whose parsers take their name from argv
    result = entry(name, rest, prog=f"specvlm {name}") if name in TASKS else entry(rest)
    return result or 0


if __name__ == "__main__":
    raise SystemExit(main())
