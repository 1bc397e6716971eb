"""``analyze(run_dir)``, its report (``report.py``) and ``vnodes analyze``, on a run directory made by
hand: probe suites and loss trajectories of known shapes, no training."""

import csv
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from vnodes.scheduler.plugins.analysis import analyze
from vnodes.scheduler.plugins.probes import ProbeSuites
from vnodes.scheduler.plugins.recorder import DynamicsStore

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

TESTS = Path(__file__).parent
N, EPOCHS, PER_SUITE = 1200, 8, 20  # samples; epochs recorded; reference (and held-out) probes per suite
SUITES = ("typical", "atypical", "mislabeled", "corrupted")


def shape(suite, epochs):
    """The loss curve of a suite's samples: what tells the suites apart."""
    e = np.arange(epochs, dtype=np.float64)
    return {"typical": 2.3 * np.exp(-e / 1.0),  # learnt at once
            "atypical": 2.3 * np.exp(-e / 6.0),  # learnt slowly
            "mislabeled": np.full(epochs, 2.3),  # never learnt
            "corrupted": 1.2 + 1.1 * np.exp(-e / 2.0)}[suite]  # learnt halfway


def fabricate(run, num_samples=N, seed=0):
    """A run directory with probes.json and ``EPOCHS`` epochs of evaluation losses; returns each
    sample's true suite (an index into SUITES)."""
    rng = np.random.default_rng(seed)
    member = rng.integers(0, len(SUITES), num_samples)
    reference, heldout = {}, {}
    for j, suite in enumerate(SUITES):
        chosen = rng.permutation(np.flatnonzero(member == j))[:2 * PER_SUITE]
        reference[suite], heldout[suite] = chosen[:PER_SUITE], chosen[PER_SUITE:]
    (run / "archaeology").mkdir(parents=True)
    ProbeSuites(SUITES, reference, heldout, 10, 0.5).write(run / "archaeology" / "probes.json",
                                                           {"k": 5, "metric": "euclidean"})
    curves = np.stack([shape(s, EPOCHS) for s in SUITES])[member]
    loss = curves + rng.normal(0, 0.08, curves.shape)
    store = DynamicsStore(run / "dynamics", num_samples)
    for epoch in range(EPOCHS):
        store.write_epoch("eval", epoch, {"loss": loss[:, epoch].astype(np.float32)})
    return member


def digits(num_samples=N, layout=(64,)):
    """8x8 images (as 64 values, or another layout) with integer labels: a stand-in for the run's dataset."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(num_samples, *layout, generator=g)
    return TensorDataset(x, torch.randint(0, 10, (num_samples,), generator=g))


def read_samples(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_the_vote_finds_the_suites_it_was_built_to_find(tmp_path):
    member = fabricate(tmp_path)
    rep = analyze(tmp_path, write=False)
    assert rep.suites == SUITES and rep.epochs == EPOCHS and rep.k == 5 and rep.metric == "euclidean"
    p = np.stack([rep.p[s] for s in SUITES], axis=1)
    assert p.shape == (N, len(SUITES))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    assert rep.heldout_accuracy > 0.9
    assert rep.confusion.shape == (4, 4) and rep.confusion.sum() == len(SUITES) * PER_SUITE
    for s in SUITES:
        np.testing.assert_array_equal(rep.probes[s], np.concatenate([rep.reference[s], rep.heldout[s]]))
    probe = np.zeros(N, bool)
    probe[np.concatenate(list(rep.probes.values()))] = True
    assert (rep.most_likely()[~probe] == member[~probe]).mean() > 0.9  # the samples that are not probes too
    assert rep.files == {}


def test_report_files_agree_with_the_numbers(tmp_path):
    fabricate(tmp_path)
    rep = analyze(tmp_path, dataset=digits())
    out = tmp_path / "analysis"
    assert sorted(rep.files) == ["confusion.png", "flagged.png", "map.png", "report.html", "samples.csv",
                                 "trajectories.png"]
    for name, path in rep.files.items():
        assert path == out / name and path.stat().st_size > 0, name
    for name in rep.files:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    header, rows = read_samples(out / "samples.csv")
    assert header == ["index", *(f"p_{s}" for s in SUITES), "most_likely", "probe"]
    assert len(rows) == N
    assert [int(r[0]) for r in rows] == list(range(N))
    parsed = np.array([[float(v) for v in r[1:1 + len(SUITES)]] for r in rows])
    np.testing.assert_allclose(parsed, np.stack([rep.p[s] for s in SUITES], axis=1), atol=1e-6)
    assert [r[5] for r in rows] == [SUITES[j] for j in rep.most_likely()]
    roles = {i: f"{s}/{role}" for s in SUITES for role, table in (("reference", rep.reference),
                                                                    ("heldout", rep.heldout)) for i in table[s]}
    assert [r[6] for r in rows] == [roles.get(i, "") for i in range(N)]

    page = (out / "report.html").read_text()
    for s in SUITES:
        assert s in page
    assert set(re.findall(r'src="([^"]+)"', page)) == {n for n in rep.files if n.endswith(".png")}
    assert 'href="samples.csv"' in page and str(tmp_path) in page
    assert f"{rep.heldout_accuracy:.1%}" in page
    for i, s in enumerate(SUITES):  # the confusion matrix as a table: its diagonal counts, in order
        assert f'<td class="n diag">{rep.confusion[i, i]:,}</td>' in page


def test_without_a_dataset_the_flagged_samples_are_loss_curves(tmp_path):
    fabricate(tmp_path)
    rep = analyze(tmp_path)
    assert sorted(rep.files) == ["confusion.png", "flagged.png", "map.png", "report.html", "samples.csv",
                                 "trajectories.png"]
    page = rep.files["report.html"].read_text()
    assert "vnodes analyze RUN_DIR --job" in page and "shown as images" not in page


@pytest.mark.parametrize("layout", [(64,), (1, 8, 8), (8, 8), (3, 8, 8), (8, 8, 3)])
def test_flagged_inputs_of_image_shapes_are_drawn_as_images(tmp_path, layout):
    from vnodes.scheduler.plugins import report

    kind, picture = report._picture(digits(2, layout)[0][0])
    assert kind == "image" and picture.shape[:2] == (8, 8) and picture.shape[2:] in ((), (3,))
    if layout == (1, 8, 8):  # the whole plot, once: another layout than the report test's
        fabricate(tmp_path)
        rep = analyze(tmp_path, write=False)
        plot = report._plot_flagged(rep, digits(layout=layout), tmp_path / "flagged.png")
        assert "shown as images" in plot.caption and (tmp_path / "flagged.png").stat().st_size > 0


@pytest.mark.parametrize("x", [torch.rand(10), torch.rand(4, 8, 8), torch.rand(2, 3, 4, 5)])
def test_other_inputs_are_drawn_as_curves(x):
    from vnodes.scheduler.plugins import report

    kind, picture = report._picture(x)
    assert kind == "curve" and picture.shape == (x.numel(),)


def test_a_dataset_of_the_wrong_size_is_refused(tmp_path):
    fabricate(tmp_path)
    with pytest.raises(ValueError, match=f"{N - 1} samples.*recorded {N}"):
        analyze(tmp_path, dataset=digits(N - 1))


def test_one_epoch_has_no_map_and_says_so(tmp_path):
    fabricate(tmp_path)
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "map.png").write_bytes(b"an earlier report's map")
    rep = analyze(tmp_path, epochs=1)
    assert rep.epochs == 1 and rep.loss.shape == (N, 1)
    assert "map.png" not in rep.files and not (tmp_path / "analysis" / "map.png").exists()  # no stale map
    page = rep.files["report.html"].read_text()
    assert "map.png" not in page and "No map" in page


def test_a_big_run_maps_a_bounded_sample(tmp_path, monkeypatch):
    from vnodes.scheduler.plugins import report

    is_probe = np.arange(N) < 160
    picked = report._map_sample(is_probe, 500, 0)
    assert len(picked) == 500 and np.all(np.diff(picked) > 0) and np.all(np.isin(np.arange(160), picked))
    np.testing.assert_array_equal(picked, report._map_sample(is_probe, 500, 0))
    np.testing.assert_array_equal(report._map_sample(is_probe, N, 0), np.arange(N))
    fabricate(tmp_path)
    rep = analyze(tmp_path, write=False)
    plot = report._plot_map(rep, report._most_likely(rep), is_probe, picked, tmp_path / "map.png")
    assert f"A seeded random 500 of the {N:,} samples" in plot.caption


# -- the command line ------------------------------------------------------------------------


def vnodes(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "vnodes.scheduler.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_analyze_prints_a_summary_and_writes_the_report(tmp_path):
    run = tmp_path / "run"
    fabricate(run)
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(f"""
        import sys
        import torch
        from torch.utils.data import TensorDataset
        sys.path.insert(0, {str(TESTS)!r})
        from jobs import cnn_spec

        def digits():
            return TensorDataset(torch.rand({N}, 64), torch.randint(0, 10, ({N},)))

        spec = cnn_spec(dataset=digits)
    """))
    out = vnodes("analyze", str(run), "--job", str(job), "--k", "7")
    assert out.returncode == 0, out.stderr
    rep = analyze(run, k=7, write=False)
    assert f"held-out probes classified correctly {rep.heldout_accuracy:.1%}" in out.stdout
    assert "k=7" in out.stdout and f"{N:,} samples, {EPOCHS} epochs" in out.stdout
    for s in SUITES:
        assert f"{s} {int((rep.most_likely() == SUITES.index(s)).sum()):,}" in out.stdout
    assert str(run / "analysis" / "report.html") in out.stdout
    assert "shown as images" in (run / "analysis" / "report.html").read_text()


def test_cli_analyze_help_names_every_option(capsys):
    from vnodes.scheduler.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["analyze", "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for word in ("RUN_DIR", "--job", "--set", "--epochs", "--k", "--metric", "report.html", "samples.csv"):
        assert word in text, word


def test_cli_analyze_without_probes_is_one_line_naming_the_directory(tmp_path):
    out = vnodes("analyze", str(tmp_path))
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert str(tmp_path) in out.stderr and "MetadataArchaeology()" in out.stderr


@pytest.mark.parametrize("case", ["missing", "too many epochs", "k above the references", "set without job"])
def test_cli_analyze_mistakes_get_one_clear_line(tmp_path, capsys, case):
    from vnodes.scheduler.cli import main

    run = tmp_path / "run"
    if case != "missing":
        fabricate(run)
    flags = {"missing": [], "too many epochs": ["--epochs", "99"], "k above the references": ["--k", "81"],
             "set without job": ["--set", "seed=3"]}[case]
    assert main(["analyze", str(run), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vnodes: error: ") and err.count("\n") == 1, err
    expected = {"missing": [str(run), "does not exist"], "too many epochs": [str(run), "epochs=99", "1..8"],
                "k above the references": ["k=81", "80 references"], "set without job": ["--set", "--job"]}[case]
    for word in expected:
        assert word in err, (word, err)
    assert not (run / "analysis").exists()
