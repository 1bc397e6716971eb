"""Simulation results as a person or a program reads them: a table, one JSON object, two plots.

``vnodes simulate`` (``scheduler/cli.py``) and ``benchmarks/cluster.py`` use it:

- :func:`document`: one JSON-ready dict. For one policy, that policy's ``SimResult.metrics()``
  (``avg_jct_s``, ``median_jct_s``, ``p99_jct_s``, ``makespan_s``, ``utilization``, ``ftf_mean``,
  ``ftf_max``, ``resizes_per_job``, ``preemptions_per_job``, ``jcts``: job name -> seconds, ...)
  at the top level, plus where it ran (workload, cluster, clock). For several, the same
  description with ``policies``: policy name -> its metrics.
- :func:`table`: a ``rich`` table, one row per policy.
- :func:`write_outputs`: ``simulation.json`` (the document), ``jct_cdf.png`` (the JCT
  distribution of each policy) and ``gpus_in_use.png`` (GPUs held and GPUs training at every
  decision, from ``SimResult.timeline``), into a folder.

The plots are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot:
nothing global (the backend, a current figure) changes in the caller's process.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

import numpy as np

if TYPE_CHECKING:
    from .simulator import SimResult

PLOTS = ("jct_cdf.png", "gpus_in_use.png")
DOCUMENT = "simulation.json"


def missing_packages() -> list[str]:
    """The packages :func:`write_outputs` needs that are not installed (pip names)."""
    return [] if importlib.util.find_spec("matplotlib") is not None else ["matplotlib"]


def document(results: Mapping[str, "SimResult"], workload: str, on_events: bool,
             interval_s: float) -> dict:
    """The JSON object of a run: flat for one policy, ``policies`` -> metrics for several.

    Raises:
        ValueError: ``results`` is empty.
    """
    if not results:
        raise ValueError("no simulation result to describe")
    first = next(iter(results.values()))
    where = {"workload": workload, "gpus": first.cluster.gpus, "nodes": first.cluster.nodes,
             "gpus_per_node": first.cluster.gpus_per_node, "interval_s": interval_s,
             "on_events": on_events}
    if len(results) == 1:
        return {**first.metrics(), **where}
    return {**where, "policies": {name: r.metrics() for name, r in results.items()}}


def _seconds(value: float) -> str:
    return f"{value:,.0f} s"


def table(results: Mapping[str, "SimResult"], title: str):
    """A ``rich.table.Table`` with one row per policy (the key of ``results``), best average JCT
    in bold."""
    from rich.table import Table

    metrics = {name: r.metrics() for name, r in results.items()}
    best = min(m["avg_jct_s"] for m in metrics.values())
    out = Table(title=title, title_justify="left")
    for column in ("policy", "resize model", "avg JCT", "median JCT", "p99 JCT", "makespan", "utilization",
                   "FTF mean/max", "resizes/job", "preemptions/job"):
        out.add_column(column, justify="left" if column in ("policy", "resize model") else "right", no_wrap=True)
    for name, m in metrics.items():
        avg = _seconds(m["avg_jct_s"])
        out.add_row(name, m["resize_model"], f"[bold]{avg}[/bold]" if m["avg_jct_s"] == best and len(metrics) > 1
                    else avg, _seconds(m["median_jct_s"]), _seconds(m["p99_jct_s"]), _seconds(m["makespan_s"]),
                    f"{m['utilization']:.1%}", f"{m['ftf_mean']:.2f}/{m['ftf_max']:.2f}",
                    f"{m['resizes_per_job']:.2f}", f"{m['preemptions_per_job']:.2f}")
    return out


def write_outputs(out_dir: Path, results: Mapping[str, "SimResult"], doc: Optional[dict] = None
                  ) -> dict[str, Path]:
    """Write ``simulation.json`` (``doc``, default ``document(results, "", False, 60)``) and the
    plots into ``out_dir`` (created).

    Returns:
        file name -> path of every file written.

    Raises:
        ImportError: matplotlib is not installed.
    """
    if missing_packages():
        raise ImportError("the simulation plots are drawn with matplotlib; install it: pip install matplotlib")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = doc if doc is not None else document(results, "", False, 60.0)
    files = {DOCUMENT: out_dir / DOCUMENT}
    files[DOCUMENT].write_text(json.dumps(doc, indent=1) + "\n")
    files["jct_cdf.png"] = plot_jct_cdf(results, out_dir / "jct_cdf.png")
    files["gpus_in_use.png"] = plot_gpus_in_use(results, out_dir / "gpus_in_use.png")
    return files


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_jct_cdf(results: Mapping[str, "SimResult"], path: Path) -> Path:
    """One step curve per policy: the share of jobs done within x seconds of their arrival (log x)."""
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    for name, r in results.items():
        jct = np.sort(np.fromiter(r.jcts().values(), dtype=float))
        share = np.arange(1, len(jct) + 1) / len(jct)
        ax.step(jct, share, where="post", label=f"{name} ({r.resize}): avg {np.mean(jct):,.0f} s")
    ax.set_xscale("log")
    ax.set_xlabel("job completion time (s, log scale)")
    ax.set_ylabel("share of jobs")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    first = next(iter(results.values()))
    ax.set_title(f"JCT distribution, {len(first.jobs)} jobs on {first.cluster.gpus} GPUs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_gpus_in_use(results: Mapping[str, "SimResult"], path: Path) -> Path:
    """One panel per policy: GPUs held (allocated, starting ones included) and GPUs training, as
    recorded at each decision, against hours since the first decision."""
    fig = _figure(7.0, 1.6 + 1.5 * len(results))
    axes = fig.subplots(len(results), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, r) in zip(axes, results.items()):
        if r.timeline:
            t, held, training = (np.array(column, dtype=float) for column in zip(*r.timeline))
            ax.step(t / 3600, held, where="post", lw=1.0, label="held")
            ax.step(t / 3600, training, where="post", lw=1.0, alpha=0.8, label="training")
        ax.axhline(r.cluster.gpus, color="grey", lw=0.8, ls=":")
        ax.set_ylim(0, r.cluster.gpus * 1.08)
        ax.set_ylabel("GPUs")
        ax.set_title(f"{name} ({r.resize})", fontsize=9, loc="left")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right", ncols=2)
    axes[-1].set_xlabel("hours")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
