"""vnodes.runtime imports and trains without Ray (the GPU image has none)."""

import subprocess
import sys
from pathlib import Path

CODE = """
import sys
sys.modules["ray"] = None  # any `import ray` now fails, as on a machine without Ray
sys.path.insert(0, %r)
from jobs import cnn_spec
from vnodes.runtime import train
import vnodes.scheduler.launcher
r = train(cnn_spec(), steps=2)
print(len(r.losses), "ray" in sys.modules and sys.modules["ray"] is not None)
"""


def test_runtime_runs_without_ray():
    out = subprocess.run([sys.executable, "-c", CODE % str(Path(__file__).parent)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "False"]
