"""The harness's plot: throughput and latency percentiles against concurrency."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

COLORS = {"chanseg": "C0", "chanseg-b1": "C9", "naive": "C3", "litserve": "C2"}


def plot(report: dict, path: Path) -> None:
    """One row per image set: images/s (with the raw ceiling), p50 and p99 latency."""
    sets = list(report["ceiling"])
    fig, axes = plt.subplots(len(sets), 2, figsize=(11, 4 * len(sets)), squeeze=False)
    for row, images in enumerate(sets):
        ax_tp, ax_lat = axes[row]
        ceiling = report["ceiling"][images]["images_per_s"]
        ax_tp.axhline(ceiling, color="k", linestyle=":", label=f"raw ceiling {ceiling:.1f}")
        for scenario in dict.fromkeys(r["scenario"] for r in report["rows"]):
            points = sorted(
                (r for r in report["rows"]
                 if r["scenario"] == scenario and r["images"] == images and r["mode"] == "concurrency"),
                key=lambda r: r["load"],
            )  # fmt: skip
            if not points:
                continue
            x = [r["load"] for r in points]
            color = COLORS.get(scenario)
            ax_tp.plot(x, [r["images_per_s"] for r in points], "o-", color=color, label=scenario)
            ax_lat.plot(x, [r["p50_ms"] for r in points], "o-", color=color, label=f"{scenario} p50")
            ax_lat.plot(x, [r["p99_ms"] for r in points], "s--", color=color, label=f"{scenario} p99")
        for ax in (ax_tp, ax_lat):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("concurrency (closed loop)")
            ax.grid(True, which="both", alpha=0.3)
        ax_tp.set_ylabel("images/s")
        ax_tp.set_ylim(bottom=0)
        ax_tp.set_title(f"{images}: throughput")
        ax_lat.set_yscale("log")
        ax_lat.set_ylabel("latency (ms)")
        ax_lat.set_title(f"{images}: latency")
        ax_tp.legend(fontsize=8)
        ax_lat.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{report['machine']}; allocator {report['allocator']}; {report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
