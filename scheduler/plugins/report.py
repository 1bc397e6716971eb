"""``write_report``: an ``ArchaeologyReport`` as files a person reads.

Written into ``RUN_DIR/analysis/`` (``analyze(run_dir)`` and ``vnodes analyze RUN_DIR``):

- ``samples.csv``: one row per sample: ``index``, ``p_<suite>`` for each suite (6 significant
  digits), ``most_likely`` (the suite with the highest p; empty when the sample has no complete
  trajectory) and ``probe`` (``"<suite>/reference"``, ``"<suite>/heldout"``, or empty). Written
  ``CSV_CHUNK`` rows at a time, so a 1.28M-sample run never becomes one Python list.
- ``confusion.png``, ``trajectories.png``, ``flagged.png``, ``map.png``: the plots (``map.png``
  needs two epochs or more).
- ``report.html``: the numbers, the plots with captions, a link to the CSV. It names the other files
  by relative name: the folder can be moved or served as it is.

The plots are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot:
nothing global (the backend, a current figure) changes in the caller's process. Their cost is bounded
for any run size: the map and the all-samples curve use a seeded subsample of at most
``MAP_SAMPLES`` samples (every probe included).
"""

from __future__ import annotations

import csv
import dataclasses
import html
import importlib.util
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

if TYPE_CHECKING:
    from .analysis import ArchaeologyReport

CSV_CHUNK = 65_536  # rows formatted at a time
FLAGGED_PER_SUITE = 8  # samples shown per suite in flagged.png
MAP_SAMPLES = 20_000  # at most this many samples in the map (and the all-samples curve)
MAP_SEED = 0  # which ones: the same every time the report is written
PLOTS = ("confusion.png", "trajectories.png", "flagged.png", "map.png")

# One colour per suite in every plot; suites not named here take the next unused tab10 colour.
COLOURS = {"typical": "#2ca02c", "atypical": "#ff7f0e", "mislabeled": "#d62728", "corrupted": "#9467bd"}
SPARE_COLOURS = ("#1f77b4", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")

# What each suite's probes are, in the words of the report (probes.py says how they are made).
MEANINGS = {
    "typical": "unaltered samples that simple models agree on: clear, prototypical examples of their class",
    "atypical": "unaltered samples that simple models disagree on: rare, ambiguous or hard examples",
    "mislabeled": "samples whose label was replaced by a different class",
    "corrupted": "samples whose input had Gaussian noise added",
}


@dataclasses.dataclass
class Plot:
    """A PNG written, with what the HTML page says about it."""

    file: str
    heading: str
    caption: str


def missing_packages() -> list[str]:
    """The packages the report needs that are not installed (pip names)."""
    needed = {"matplotlib": "matplotlib", "sklearn": "scikit-learn"}
    return [pip for module, pip in needed.items() if importlib.util.find_spec(module) is None]


def write_report(report: ArchaeologyReport, out_dir: Path, dataset: Any = None) -> dict[str, Path]:
    """Write ``samples.csv``, the PNG plots and ``report.html`` into ``out_dir`` (created).

    Args:
        dataset: the dataset the run trained on (``vnodes.runtime.engine.build_dataset(spec)``), to
            show the most-flagged samples' inputs: images when they are 2-D, 3-D (``C,H,W`` or
            ``H,W,C`` with 1 or 3 channels) or 1-D of a square length (8x8 digits as 64 values),
            curves when 1-D otherwise. Without it, those samples' loss trajectories are shown.

    Returns:
        file name -> path of every file written (plots from an earlier report that this one does
        not draw are removed).

    Raises:
        ImportError: matplotlib or scikit-learn is not installed.
        ValueError: ``dataset`` does not have one item per sample of the run.
    """
    missing = missing_packages()
    if missing:
        raise ImportError(f"the archaeology report draws with matplotlib and scikit-learn; install them: "
                          f"pip install {' '.join(missing)}")
    if dataset is not None and len(dataset) != report.num_samples:
        raise ValueError(f"the dataset has {len(dataset)} samples, the run in {report.run_dir} recorded "
                         f"{report.num_samples}; pass the dataset the run trained on")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    most_likely = _most_likely(report)
    roles, role_names = _probe_roles(report)
    sample = _map_sample(roles > 0, MAP_SAMPLES, MAP_SEED)

    files = {"samples.csv": _write_samples(report, most_likely, roles, role_names, out_dir / "samples.csv")}
    plots = [_plot_confusion(report, out_dir / "confusion.png"),
             _plot_trajectories(report, sample, out_dir / "trajectories.png"),
             _plot_flagged(report, dataset, out_dir / "flagged.png"),
             _plot_map(report, most_likely, roles > 0, sample, out_dir / "map.png")]
    drawn = [plot for plot in plots if isinstance(plot, Plot)]
    skipped = [text for text in plots if isinstance(text, str)]
    for plot in drawn:
        files[plot.file] = out_dir / plot.file
    for name in PLOTS:  # a stale plot from an earlier report would contradict this one
        if name not in files and (out_dir / name).exists():
            (out_dir / name).unlink()
    files["report.html"] = _write_html(report, most_likely, roles > 0, drawn, skipped, out_dir / "report.html")
    return files


# -- per-sample tables -------------------------------------------------------------------------


def _most_likely(report: ArchaeologyReport) -> np.ndarray:
    """int64 [num_samples]: the index of each sample's most likely suite, -1 where p is not finite
    (a sample without a complete trajectory)."""
    p = np.stack([report.p[s] for s in report.suites], axis=1)
    most_likely = p.argmax(axis=1)
    most_likely[~np.isfinite(p).all(axis=1)] = -1
    return most_likely


def _probe_roles(report: ArchaeologyReport) -> tuple[np.ndarray, list[str]]:
    """(int16 [num_samples] role codes, their names): 0 is no probe, ``1 + 2j`` suite j's reference
    probes, ``2 + 2j`` its held-out ones."""
    roles = np.zeros(report.num_samples, np.int16)
    names = [""]
    for j, suite in enumerate(report.suites):
        roles[report.reference[suite]] = 1 + 2 * j
        roles[report.heldout[suite]] = 2 + 2 * j
        names += [f"{suite}/reference", f"{suite}/heldout"]
    return roles, names


def _write_samples(report: ArchaeologyReport, most_likely: np.ndarray, roles: np.ndarray, role_names: list[str],
                   path: Path) -> Path:
    suite_names = np.asarray(["", *report.suites], dtype=object)  # indexed by most_likely + 1: -1 is ""
    role_names = np.asarray(role_names, dtype=object)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", *(f"p_{s}" for s in report.suites), "most_likely", "probe"])
        for start in range(0, report.num_samples, CSV_CHUNK):
            stop = min(start + CSV_CHUNK, report.num_samples)
            columns = [range(start, stop)]
            for suite in report.suites:
                columns.append([f"{v:.6g}" for v in report.p[suite][start:stop].tolist()])
            columns.append(suite_names[most_likely[start:stop] + 1].tolist())
            columns.append(role_names[roles[start:stop]].tolist())
            writer.writerows(zip(*columns))
    return path


def _map_sample(is_probe: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices: every sample when there are at most ``limit``, else every probe and a seeded
    random choice of the others, ``limit`` in all."""
    n = len(is_probe)
    if n <= limit:
        return np.arange(n)
    probes = np.flatnonzero(is_probe)
    others = np.flatnonzero(~is_probe)
    take = min(len(others), max(0, limit - len(probes)))
    chosen = np.random.default_rng(seed).choice(others, size=take, replace=False)
    return np.sort(np.concatenate([probes, chosen]))


def _rows(loss: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """float64 [len(indices), epochs] copy of those samples' trajectories (``loss`` may map a file)."""
    return np.asarray(loss[indices], dtype=np.float64)


# -- plots -----------------------------------------------------------------------------------


def _colour(report: ArchaeologyReport, suite: str) -> str:
    if suite in COLOURS:
        return COLOURS[suite]
    unnamed = [s for s in report.suites if s not in COLOURS]
    return SPARE_COLOURS[unnamed.index(suite) % len(SPARE_COLOURS)]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110)


def _accuracy_text(report: ArchaeologyReport) -> str:
    total = int(report.confusion.sum())
    if total == 0:
        return "no held-out probe has a complete trajectory"
    return f"{report.heldout_accuracy:.1%} ({int(np.trace(report.confusion))} of {total})"


def _plot_confusion(report: ArchaeologyReport, path: Path) -> Plot:
    suites, counts = report.suites, report.confusion
    fig = _figure(1.3 * len(suites) + 2.6, 1.1 * len(suites) + 2.0)
    ax = fig.add_subplot()
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(suites)):
        for j in range(len(suites)):
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center",
                    color="white" if share[i, j] > 0.55 else "black")
    ax.set_xticks(range(len(suites)), suites, rotation=30, ha="right")
    ax.set_yticks(range(len(suites)), suites)
    ax.set_xlabel("most likely suite (the vote)")
    ax.set_ylabel("held-out probe's suite")
    ax.set_title(f"held-out accuracy {_accuracy_text(report)}", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    chance = 1 / len(suites)
    return Plot(path.name, "How well the vote recognises probes it has not seen",
                "Held-out probes are planted like the reference probes but take no part in the vote, so "
                "classifying them is a test of the method on this run. Each row is a suite of held-out probes, "
                "each column the suite the vote found most likely; the numbers are probe counts and the shade "
                f"is the share of the row. A strong diagonal (chance is {chance:.0%}) means the suites' loss "
                "trajectories differ, and the p(suite) of the other samples can be trusted about as much.")


def _plot_trajectories(report: ArchaeologyReport, sample: np.ndarray, path: Path) -> Plot:
    epochs = np.arange(1, report.epochs + 1)
    marker = "o" if report.epochs <= 30 else None
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    with warnings.catch_warnings():  # a sample never recorded is all-NaN: it drops out of the statistics
        warnings.simplefilter("ignore", RuntimeWarning)
        everyone = _rows(report.loss, sample)
        ax.plot(epochs, np.nanmean(everyone, axis=0), color="0.45", linestyle="--", marker=marker, markersize=3,
                label="all samples" if len(sample) == report.num_samples else f"{len(sample):,} samples")
        for suite in report.suites:
            rows = _rows(report.loss, report.probes[suite])
            low, high = np.nanpercentile(rows, [25, 75], axis=0) if len(rows) else (epochs * np.nan,) * 2
            colour = _colour(report, suite)
            ax.plot(epochs, np.nanmean(rows, axis=0), color=colour, marker=marker, markersize=3,
                    label=f"{suite} ({len(rows)} probes)")
            ax.fill_between(epochs, low, high, color=colour, alpha=0.18, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (evaluation pass)")
    ax.set_title("loss trajectories of the probe suites: mean and 25th-75th percentile", fontsize=10)
    if report.epochs <= 20:
        ax.set_xticks(epochs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    reference = "every sample" if len(sample) == report.num_samples else \
        f"a seeded random {len(sample):,} of the {report.num_samples:,} samples (every probe among them)"
    return Plot(path.name, "How each suite's loss evolves",
                "The loss of every training sample was measured after each epoch. Each line is the mean loss of "
                "one suite's probes (reference and held-out), the band spans the middle half of them (25th to "
                f"75th percentile), and the dashed grey line is the mean over {reference}. The vote compares a "
                "sample's whole curve with these probes' curves: suites whose bands separate are easy to tell "
                "apart, overlapping ones are confused (see the table above). As a rule, typical samples are learnt "
                "first, atypical and corrupted ones later, and mislabeled ones late or never.")


def _label_of(item: Any) -> Optional[int]:
    """The integer target of a dataset item, or None when it is not one."""
    try:
        y = item[1]
        if hasattr(y, "numel"):
            return int(y) if y.numel() == 1 and not y.is_floating_point() else None
        return int(y) if isinstance(y, (int, np.integer)) and not isinstance(y, bool) else None
    except (IndexError, TypeError, ValueError):
        return None


def _picture(x: Any) -> tuple[str, Optional[np.ndarray]]:
    """How to draw an input: ``("image", [H, W] or [H, W, 3] in [0, 1])``, ``("curve", [L])``, or
    ``("none", None)`` when it is not numeric."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        return "none", None
    if a.ndim == 3 and a.shape[0] in (1, 3):  # C,H,W (torch's layout wins when both ends could be channels)
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 1:
        side = math.isqrt(len(a))
        if side >= 4 and side * side == len(a):  # e.g. scikit-learn's digits: 64 values, 8x8 pixels
            a = a.reshape(side, side)
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3):
        if a.ndim == 3:  # imshow wants RGB floats in [0, 1]; the inputs may be normalised
            low, high = np.nanmin(a), np.nanmax(a)
            a = (a - low) / (high - low) if high > low else np.zeros_like(a)
        return "image", a
    return "curve", a.reshape(-1)


def _plot_flagged(report: ArchaeologyReport, dataset: Any, path: Path) -> Plot:
    from matplotlib.ticker import MaxNLocator

    suites, columns = report.suites, FLAGGED_PER_SUITE
    fig = _figure(1.55 * columns + 0.8, 1.75 * len(suites) + 0.3)
    axes = fig.subplots(len(suites), columns, squeeze=False)
    shown: set[str] = set()
    epochs = np.arange(1, report.epochs + 1)
    curves = []  # the axes of loss trajectories: one loss scale for all of them, so they compare
    for r, suite in enumerate(suites):
        picks = report.flagged(suite, columns)
        picks = picks[report.p[suite][picks] > 0]  # a sample no neighbour voted for is not flagged
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            probe_mean = np.nanmean(_rows(report.loss, report.probes[suite]), axis=0)
        colour = _colour(report, suite)
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(picks):
                ax.axis("off")
                continue
            index = int(picks[c])
            title = f"#{index} p={report.p[suite][index]:.2f}"
            if dataset is None:
                ax.plot(epochs, probe_mean, color=colour, linestyle="--", linewidth=1)
                ax.plot(epochs, report.loss[index], color="black", linewidth=1.2)
                curves.append(ax)
                shown.add("trajectory")
            else:
                item = dataset[index]
                label = _label_of(item)
                title = f"#{index} y={label} p={report.p[suite][index]:.2f}" if label is not None else title
                kind, values = _picture(item[0])
                shown.add(kind)
                if kind == "image":
                    ax.imshow(values, cmap="gray" if values.ndim == 2 else None, interpolation="nearest")
                elif kind == "curve":
                    ax.plot(values, color="black", linewidth=0.8)
                else:
                    ax.text(0.5, 0.5, "not numeric", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            for side in ax.spines.values():
                side.set_edgecolor(colour)
            ax.set_title(title, fontsize=7)
        # the row's name stays visible even when every panel of the row is empty (axis off)
        axes[r][0].text(-0.22, 0.5, suite, transform=axes[r][0].transAxes, rotation=90, ha="right", va="center",
                        fontsize=9, color=colour, fontweight="bold")
        if not len(picks):
            axes[r][0].text(0.0, 0.5, "no sample outside the probes has p > 0", transform=axes[r][0].transAxes,
                            fontsize=8, va="center")
    if curves:
        low = min(min(ax.get_ylim()[0] for ax in curves), 0.0)
        high = max(ax.get_ylim()[1] for ax in curves)
        for ax in curves:
            ax.set_ylim(low, high)
        for row in axes:
            if row[0] in curves:
                row[0].yaxis.set_major_locator(MaxNLocator(3))
                row[0].tick_params(axis="y", labelsize=6)
    # fixed margins: tight_layout measures every one of the many panels, and costs as much as drawing them
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.02, top=1 - 0.3 / fig.get_figheight(), wspace=0.12,
                        hspace=0.35)
    _save(fig, path)
    if dataset is None:
        what = ("Each panel is the sample's loss per epoch (black) against the mean of that suite's probes "
                "(dashed): pass the job's dataset (vnodes analyze RUN_DIR --job JOB.py) to see the inputs instead.")
    elif shown:
        kinds = {"image": "images", "curve": "curves of the input values", "none": "no picture (not numeric)"}
        what = ("Each panel is the sample's input as it was trained on, shown as "
                + " or ".join(kinds[k] for k in ("image", "curve", "none") if k in shown)
                + "; y is its label as trained on.")
    else:
        what = "No sample outside the probes has p > 0 for any suite."
    return Plot(path.name, "Samples the vote flags most",
                f"For each suite (one row), the {columns} samples outside the probes with the highest p(suite), "
                f"highest first; the title gives the sample's index in the dataset (#) and p. {what} These are the "
                "samples to look at first: a high p(mislabeled) often means a wrong label, a high p(corrupted) a "
                "damaged input, a high p(atypical) a rare or ambiguous example.")


def _plot_map(report: ArchaeologyReport, most_likely: np.ndarray, is_probe: np.ndarray, sample: np.ndarray,
              path: Path) -> Plot | str:
    """A PCA map of the trajectories, or why there is none."""
    if report.epochs < 2:
        return ("No map: a trajectory of one epoch is a single number (the map needs two epochs or more; "
                "the table and samples.csv hold everything).")
    rows = _rows(report.loss, sample)
    keep = np.isfinite(rows).all(axis=1) & (most_likely[sample] >= 0)
    rows, sample = rows[keep], sample[keep]
    if len(sample) < 3:
        return "No map: fewer than three samples have a complete trajectory."
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=MAP_SEED)
    xy = pca.fit_transform(rows)
    probe = is_probe[sample]
    palette = np.asarray([_colour(report, s) for s in report.suites], dtype=object)
    fig = _figure(7.0, 5.6)
    ax = fig.add_subplot()
    ax.scatter(xy[~probe, 0], xy[~probe, 1], c=list(palette[most_likely[sample[~probe]]]), s=5, alpha=0.45,
               linewidths=0, rasterized=True)
    from matplotlib.lines import Line2D

    handles = []
    for j, suite in enumerate(report.suites):
        colour = _colour(report, suite)
        mine = np.isin(sample, report.probes[suite])
        ax.scatter(xy[mine, 0], xy[mine, 1], marker="x", color=colour, s=24, linewidths=1.0)
        handles.append(Line2D([], [], linestyle="", marker="o", color=colour, alpha=0.6, markersize=5,
                              label=f"most likely {suite}"))
    handles += [Line2D([], [], linestyle="", marker="x", color="0.2", markersize=6,
                       label="probe (colour: its suite)")]
    ax.legend(handles=handles, fontsize=8, loc="best")
    share = pca.explained_variance_ratio_
    ax.set_xlabel(f"first principal component ({share[0]:.0%} of the variance)")
    ax.set_ylabel(f"second principal component ({share[1]:.0%})")
    ax.set_title("loss trajectories, projected on their two main directions", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    if len(sample) < report.num_samples:
        whom = (f"A seeded random {len(sample):,} of the {report.num_samples:,} samples are drawn (every probe "
                "among them), so the map stays readable and quick; samples.csv has them all.")
    else:
        whom = f"All {len(sample):,} samples with a complete trajectory are drawn."
    return Plot(path.name, "Map of all samples",
                "Each point is a training sample, placed by its loss trajectory: the trajectories are projected on "
                "their two directions of largest variance (PCA), so samples whose loss evolved alike lie close "
                "together. Dots are coloured by the sample's most likely suite, crosses are probes coloured by the "
                f"suite they were planted in. {whom} Clusters of one colour around that suite's crosses are the "
                "vote at work; dots far from every cluster of crosses are classified with less confidence.")


# -- the page --------------------------------------------------------------------------------


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222;
       line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
td.diag { font-weight: bold; }
figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.92rem; color: #444; margin-top: 0.4rem; }
.swatch { display: inline-block; width: 0.8rem; height: 0.8rem; border-radius: 0.2rem; margin-right: 0.3rem;
          vertical-align: middle; }
code { background: #f3f3f3; padding: 0 0.2rem; }
"""


def _write_html(report: ArchaeologyReport, most_likely: np.ndarray, is_probe: np.ndarray, plots: list[Plot],
                skipped: list[str], path: Path) -> Path:
    e = html.escape
    n = report.num_samples
    counts = np.bincount(most_likely[most_likely >= 0], minlength=len(report.suites))
    outside = np.bincount(most_likely[(most_likely >= 0) & ~is_probe], minlength=len(report.suites))
    unclassified = int((most_likely < 0).sum())
    facts = [("run directory", str(report.run_dir)), ("samples", f"{n:,}"),
             ("epochs of trajectory used", str(report.epochs)), ("neighbours in the vote (k)", str(report.k)),
             ("distance between trajectories", report.metric), ("held-out accuracy", _accuracy_text(report))]
    if unclassified:
        facts.append(("samples without a complete trajectory (not classified)", f"{unclassified:,}"))
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>Metadata archaeology: {e(report.run_dir.name or str(report.run_dir))}</title>",
           f"<style>{STYLE}</style></head><body>",
           "<h1>Metadata archaeology</h1>",
           "<p>Which training samples look typical, atypical, mislabeled or corrupted, judged by how their loss "
           "evolved during training (MAP-D, Siddiqui et al., ICLR 2023). Before training, small suites of "
           "<em>probes</em> with a known property were planted in the training set. After each epoch the loss of "
           "every sample was measured; each sample's loss trajectory is compared with the reference probes' "
           f"trajectories, and its k = {report.k} nearest reference probes vote: the share of votes for a suite "
           "is the sample's p(suite).</p>",
           '<table class="facts">']
    out += [f"<tr><th>{e(name)}</th><td>{e(value)}</td></tr>" for name, value in facts]
    out += ["</table>", "<h2>Suites</h2>",
            "<table><tr><th>suite</th><th>its probes are</th><th>reference probes</th><th>held-out probes</th>"
            "<th>samples most likely in it</th><th>share of all samples</th><th>of them not probes</th></tr>"]
    for j, suite in enumerate(report.suites):
        swatch = f'<span class="swatch" style="background:{_colour(report, suite)}"></span>'
        out.append(f"<tr><td>{swatch}{e(suite)}</td><td>{e(MEANINGS.get(suite, ''))}</td>"
                   f'<td class="n">{len(report.reference[suite]):,}</td>'
                   f'<td class="n">{len(report.heldout[suite]):,}</td><td class="n">{int(counts[j]):,}</td>'
                   f'<td class="n">{counts[j] / n:.1%}</td><td class="n">{int(outside[j]):,}</td></tr>')
    out.append("</table>")
    confusion = ["<table><tr><th>held-out probes of \u2193, most likely \u2192</th>"
                 + "".join(f"<th>{e(s)}</th>" for s in report.suites) + "<th>accuracy</th></tr>"]
    for i, suite in enumerate(report.suites):
        row = report.confusion[i]
        cells = "".join(f'<td class="n{" diag" if i == j else ""}">{int(v):,}</td>' for j, v in enumerate(row))
        right = f"{row[i] / row.sum():.1%}" if row.sum() else "-"
        confusion.append(f'<tr><th>{e(suite)}</th>{cells}<td class="n">{right}</td></tr>')
    confusion.append("</table>")
    for plot in plots:
        out.append(f"<h2>{e(plot.heading)}</h2>")
        if plot.file == "confusion.png":  # the same numbers as a table, to copy
            out += confusion
        out.append(f'<figure><img src="{e(plot.file)}" alt="{e(plot.heading)}">'
                   f"<figcaption>{e(plot.caption)}</figcaption></figure>")
    out += [f"<p>{e(text)}</p>" for text in skipped]
    columns = ", ".join(f"<code>p_{e(s)}</code>" for s in report.suites)
    out += ["<h2>Every sample</h2>",
            f'<p><a href="samples.csv">samples.csv</a>: one row per sample ({n:,} rows): <code>index</code> (its '
            f"index in the dataset), {columns} (the vote's shares, summing to 1), <code>most_likely</code> (the "
            "suite with the highest share; empty for a sample without a complete trajectory) and <code>probe</code> "
            "(<code>SUITE/reference</code> or <code>SUITE/heldout</code> for a probe, empty otherwise). Sort by a "
            "<code>p_</code> column to list the samples to inspect.</p>",
            "</body></html>"]
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path
