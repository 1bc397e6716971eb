"""The suite's order: the longest files first, so that `make test`'s two processes (pytest-xdist,
``--dist loadfile``: a file at a time each) do not end with one long file running alone. The order
of the tests within a file is unchanged."""

from __future__ import annotations

# Measured with `pytest --durations`: the files whose tests add up to a minute or more, longest first.
LONGEST_FIRST = ("test_cluster_service.py", "test_master_restart.py", "test_training_features.py", "test_ray.py",
                 "test_elastic.py", "test_ddp_equivalence.py", "test_hosts.py", "test_plugins.py", "test_chaos.py",
                 "test_kill_resume.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items[:] = sorted(items, key=rank)  # stable: each file keeps its own order
