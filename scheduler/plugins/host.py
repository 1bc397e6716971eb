"""The master's plugin host: the master halves of a job's plugins, fed in step order.

The master calls the host at three of its events (``runtime/events.py``), with its lock held:

- ``PLAN``: ``eval_due(step)`` (does the plan carry the end-of-epoch evaluation pass?) and
  ``inputs_for(step, vnodes)`` (the mutators' per-sample inputs for one member's nodes);
- ``STEP_COMMITTED``: ``on_commit`` hands every plugin the reports of the committed step, merged
  across members in virtual-node order (so the merged report does not depend on the workers), and
  those of the evaluation pass the step carried;
- a checkpoint plan: ``state_dict()`` goes into the checkpoint; a roll-back to a checkpoint (every
  worker that held the state lost) and a restart load it back (``load_state_dict``).

Everything here is a function of the committed history and of ``(seed, step, vnode_id)``: the
inputs for step ``s`` are computed once, from the state after step ``s - 1`` committed.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from vnodes.runtime.plugins import Plugin, PluginJob, SampleColumns
from vnodes.runtime.sampler import VNodeSampler


class PluginHost:
    def __init__(self, plugins: Sequence[Plugin], job: PluginJob, sampler: VNodeSampler):
        self.plugins = [copy.deepcopy(p) for p in plugins]  # the job's objects stay settings only
        job = dataclasses.replace(job, peers={p.name: p for p in self.plugins})
        self.job = job
        self.sampler = sampler
        self.names = {p.name for p in self.plugins}
        self.eval_batch_size = max((p.eval_pass_batch_size() or 0 for p in self.plugins), default=0) or None
        self.evaluated = 0  # epochs whose evaluation pass the plugins consumed
        self._inputs: tuple[int, dict[str, SampleColumns]] = (-1, {})  # (step, mutator -> rows of all nodes)
        for plugin in self.plugins:
            plugin.on_attach(job)

    # -- PLAN ----------------------------------------------------------------------------------

    def eval_due(self, step: int) -> int:
        """The epoch whose evaluation pass runs with the weights held at ``step`` (before it is
        computed), or -1. Due at the first step of an epoch (and, alone, at the end of the run)."""
        spe = self.job.steps_per_epoch
        if self.eval_batch_size is None or step == 0 or step % spe:
            return -1
        epoch = step // spe - 1
        return epoch if epoch >= self.evaluated else -1

    def inputs_for(self, step: int, vnodes: Sequence[int]) -> dict[str, SampleColumns]:
        """Each mutator's per-sample inputs for ``vnodes``' samples at ``step``, rows in node order."""
        mutators = [p for p in self.plugins if p.changes]
        if not mutators:
            return {}
        if self._inputs[0] != step:  # computed once per step, for every node, then cut per member
            every = range(self.job.virtual_nodes)
            indices = [np.asarray(self.sampler.indices(step, v), dtype=np.int64) for v in every]
            made = {}
            for plugin in mutators:
                cols = plugin.on_plan(step, list(every), indices)
                if cols is not None:
                    expected = np.concatenate(indices)
                    if not np.array_equal(cols.indices, expected):
                        raise ValueError(f"plugin {plugin.name!r}: on_plan must return one row per sample of "
                                         f"step {step}, in virtual-node order")
                    made[plugin.name] = cols
            self._inputs = (step, made)
        b = self.job.vnode_batch_size
        rows = np.concatenate([np.arange(v * b, (v + 1) * b) for v in vnodes]) if len(vnodes) else np.zeros(0, int)
        return {name: cols.select(rows) for name, cols in self._inputs[1].items()}

    # -- STEP_COMMITTED --------------------------------------------------------------------------

    def check_reports(self, reports: dict[str, SampleColumns]) -> None:
        """Raises ``ValueError`` for a report of a plugin this job does not have."""
        unknown = sorted(set(reports) - self.names)
        if unknown:
            raise ValueError(f"reports for plugins {unknown} that this job does not have (it has {sorted(self.names)})")

    def on_commit(self, step: int, reports: Sequence[dict[str, SampleColumns]], eval_epoch: int = -1,
                  eval_reports: Sequence[dict[str, SampleColumns]] = (), training: bool = True) -> None:
        """Step ``step`` committed (``training``; False: only an evaluation pass). ``reports`` and
        ``eval_reports``: one dict per member, in virtual-node order of the members."""
        if eval_epoch >= 0:
            for plugin in self.plugins:
                parts = [r[plugin.name] for r in eval_reports if plugin.name in r]
                plugin.on_eval(eval_epoch, SampleColumns.concat(parts) if parts else None)
            self.evaluated = eval_epoch + 1
        if training:
            for plugin in self.plugins:
                parts = [r[plugin.name] for r in reports if plugin.name in r]
                plugin.on_step_committed(step, SampleColumns.concat(parts) if parts else None)

    def on_fit_end(self) -> None:
        for plugin in self.plugins:
            plugin.on_fit_end()

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"evaluated": self.evaluated, "plugins": {p.name: p.state_dict() for p in self.plugins}}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """Back to a checkpoint's state (``None`` or ``{}``: the state of step 0)."""
        state = state or {}
        self.evaluated = int(state.get("evaluated", 0))
        saved = state.get("plugins", {})
        for plugin in self.plugins:
            plugin.load_state_dict(saved.get(plugin.name, {}))
        self._inputs = (-1, {})
