"""`--plot out.png`: serving throughput and latency percentiles against concurrency, one line per server."""

from __future__ import annotations

from pathlib import Path


def plot_serve(record: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed: servers and CI machines have none
    import matplotlib.pyplot as plt

    runs = record["runs"]
    levels = list(dict.fromkeys(run["max_concurrency"] for run in runs))
    # Categorical x positions: sweeps are usually geometric (1, 4, 16) and "unlimited" has no number.
    positions = {level: i for i, level in enumerate(levels)}
    ticks = [str(level) if level else "∞" for level in levels]
    panels = [
        ("output_throughput", None, "output tokens/s"),
        ("ttft_median_ms", "ttft_p99_ms", "TTFT ms (median, p99 dashed)"),
        ("tpot_median_ms", "tpot_p99_ms", "TPOT ms (median, p99 dashed)"),
        ("e2el_median_ms", "e2el_p99_ms", "E2E latency ms (median, p99 dashed)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), constrained_layout=True)
    for ax, (key, tail_key, label) in zip(axes, panels, strict=True):
        for index, server in enumerate(dict.fromkeys(run["label"] for run in runs)):
            mine = [run for run in runs if run["label"] == server]
            xs = [positions[run["max_concurrency"]] for run in mine]
            color = f"C{index}"
            ax.plot(xs, [run.get(key) for run in mine], marker="o", color=color, label=server)
            if tail_key:
                ax.plot(xs, [run.get(tail_key) for run in mine], marker="x", linestyle="--", color=color)
        ax.set_xticks(range(len(levels)), ticks)
        ax.set_xlabel("max concurrency")
        ax.set_title(label, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"ember bench serve · {record['settings']['dataset']}", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
