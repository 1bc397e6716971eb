"""The examples load and train as shipped (a few steps each; `make demo` runs digits_cnn.py whole)."""

import importlib.util
import math
from pathlib import Path

import pytest

from vnodes.runtime import train

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, metrics", [("digits_cnn", {"loss", "accuracy"}),
                                           ("text_transformer", {"loss", "accuracy"})])
def test_an_example_trains_and_evaluates(name, metrics):
    pytest.importorskip("sklearn")
    module = _load(name)
    result = train(module.spec, steps=3)
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert [e["step"] for e in result.evaluations] == [3]  # after the last step
    assert set(result.evaluations[0]) - {"step"} == metrics and 0 <= result.evaluations[0]["accuracy"] <= 1


def test_the_text_example_is_a_step_fn_job_in_bf16_with_clipping():
    spec = _load("text_transformer").spec
    assert (spec.loss, spec.precision, spec.clip_grad_norm) == (None, "bf16", 1.0) and spec.step_fn is not None
