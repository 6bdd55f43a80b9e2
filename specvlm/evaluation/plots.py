"""The evaluation report's figures: the time each strategy took for the same quality, tau and decode speedup per
strategy and task, the distribution of accepted lengths, and speedup against batch size. Each figure is a PNG
beside report.md; each title says the task, batch size and, where it matters, the sample count. Strategies are
labelled by what they ran (adaptive or fixed, and the deepest draft): an adaptive strategy may not draft at all."""

from __future__ import annotations

from pathlib import Path


def draw_figures(results: list, baseline: str, out: Path) -> list[str]:
    """results: report.StrategyResult. Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    default = [r for r in results if r.batch == results[0].batch]
    tasks = list(dict.fromkeys(r.task for r in default))
    strategies = list(dict.fromkeys(r.strategy for r in default))
    # A strategy's label from its run on the first task (what it ran is the same on every task, given the config).
    labels = {s: next(r.label for r in default if r.strategy == s) for s in strategies}

    def save(fig, ax, name: str, title: str, xlabel: str | None, ylabel: str) -> str:
        ax.set_title(title, fontsize=9)
        if xlabel:
            ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the plot, never over it
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return name

    def grouped_bars(metric: str, ylabel: str, name: str, title: str, one_line: bool = False) -> str:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(strategies)), 3.6))
        width = 0.8 / len(tasks)
        for i, task in enumerate(tasks):
            values = [
                next((getattr(r, metric) or 0 for r in default if r.task == task and r.strategy == s), 0)
                for s in strategies
            ]
            ax.bar([x + i * width for x in range(len(strategies))], values, width, label=task)
        if one_line:
            ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xticks(
            [x + width * (len(tasks) - 1) / 2 for x in range(len(strategies))],
            [labels[s] for s in strategies],
            rotation=30,
            ha="right",
        )
        return save(fig, ax, name, title, None, ylabel)

    counts = sorted({r.samples for r in default})
    per_task = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    batch = f"batch {results[0].batch}, {per_task} samples per task"
    figures = []
    if any(r.wall_s for r in default):
        figures.append(
            grouped_bars("wall_s", "job wall time (s)", "time.png", f"Same quality, time per strategy ({batch})")
        )
    figures += [
        grouped_bars("tau", "block efficiency τ", "tau.png", f"Tokens per target pass ({batch})"),
        grouped_bars(
            "decode_speedup", "decode speedup vs target alone", "speedup.png", f"Decode speedup ({batch})", True
        ),
    ]
    # The share of steps each strategy drafted on, beside the accepted lengths of its drafted steps alone: a step
    # that drafted nothing accepted nothing, and is no rejection.
    drafting = [r for r in default if r.task == tasks[0] and r.strategy != baseline]
    fig, (share, ax) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [2, 3]})
    drafted = [r.steps.drafted_fraction for r in drafting]
    names = [r.label for r in drafting]
    share.barh(names, drafted, color="tab:blue", label="drafted")
    share.barh(names, [1 - d for d in drafted], left=drafted, color="lightgray", label="target alone")
    share.set_xlim(0, 1)
    share.set_xlabel("share of steps")
    share.invert_yaxis()  # the strategies top to bottom, in the order of the histogram's legend
    share.legend(fontsize=7, loc="lower right")
    for r in drafting:
        if r.steps.accepted:
            # Bins centred on the integers 0..max: bar k counts drafted steps that accepted exactly k draft tokens.
            edges = [k - 0.5 for k in range(max(r.steps.accepted) + 2)]
            ax.hist(r.steps.accepted, bins=edges, histtype="step", label=r.label, density=True)
    samples = next((r.samples for r in default if r.task == tasks[0]), 0)
    share.set_title(f"Steps drafted ({tasks[0]}, batch {results[0].batch})", fontsize=9)
    title = f"Accepted draft tokens per drafted step ({samples} samples)"
    figures.append(save(fig, ax, "accepted_lengths.png", title, "accepted draft tokens", "fraction of drafted steps"))

    batches = sorted({r.batch for r in results if isinstance(r.batch, int)})  # not "auto": it has no place on the axis
    if len(batches) > 1:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for s in strategies:
            points = sorted(
                (r.batch, r.decode_speedup)
                for r in results
                if r.strategy == s and r.task == tasks[0] and r.batch in batches
            )
            if s != baseline and len(points) > 1:
                ax.plot(*zip(*points), marker="o", label=labels[s])
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        samples = next((r.samples for r in results if r.task == tasks[0]), 0)
        title = f"Decode speedup against batch size ({tasks[0]}, {samples} samples)"
        figures.append(save(fig, ax, "speedup_vs_batch.png", title, "batch size", "decode speedup vs target alone"))
    return figures
