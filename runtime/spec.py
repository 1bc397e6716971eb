"""``JobSpec``: what the user asked for, validated before any expensive work.

The spec alone fixes the training trajectory. Its ``fingerprint()`` names, field by field, everything
that changes the trajectory, so a checkpoint can refuse to resume under a different job and say which
field differs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import pickle
import types
from typing import Any, Callable, Optional

from .errors import InvalidJobSpec

RUNNING_STATS_POLICIES = ("mean", "vnode0")
EXECUTION_MODES = ("sequential", "fused")
SEEDING_SCHEME = "blake2b-v1"  # see runtime/seeding.py; change it whenever vnode_seed changes


@dataclasses.dataclass
class JobSpec:
    """A data-parallel training job over ``virtual_nodes`` logical workers.

    Every callable is zero-argument (or takes what is said below) and picklable when processes need
    it (several workers, or ``loader_workers > 0``: those processes are spawned, not forked).

    Attributes:
        model: ``() -> nn.Module``. Called after ``torch.manual_seed(seed)``, so the initial weights
            are part of the job.
        dataset: ``() -> Dataset``: a map-style dataset of ``(input, target)`` pairs.
        optimizer: ``(params) -> Optimizer``, e.g. ``functools.partial(torch.optim.SGD, lr=0.1)``.
        loss: ``(outputs, targets) -> Tensor[b]``: one loss per sample (``reduction="none"``).
        virtual_nodes: N, the number of logical data-parallel workers. Fixed for the job's life.
        vnode_batch_size: b, the batch of each virtual node. The global batch is ``N * b``.
        seed: seeds the model initialisation, the data order and every virtual node's random stream.
        deterministic: bitwise-reproducible results for any worker count and any mapping (on one
            device type); costs ``O(log N)`` gradient buffers and fixes the thread count.
        lr_scheduler: ``(optimizer) -> LRScheduler``, stepped once per global step.
        collate_fn: turns a list of samples into a batch (default: torch's ``default_collate``).
        loader_workers: data-loader processes per worker (0: load in the training process).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None`` picks CUDA when available.
        num_threads: intra-op threads. ``None``: 1 in deterministic mode (results depend on the
            thread count), torch's default otherwise.
        running_stats: how BatchNorm running statistics advance each step. ``"mean"``: every virtual
            node starts the step from the same buffers and the step ends with the mean of what they
            left (DDP with ``broadcast_buffers=False`` plus a buffer average). ``"vnode0"``: virtual
            node 0's buffers win (what DDP's default ``broadcast_buffers=True`` keeps).
        execution: ``"sequential"`` runs a worker's virtual nodes one after another; ``"fused"``
            runs them as one batch with per-node BatchNorm statistics and Dropout streams (same math
            within float rounding, fewer kernel launches; batch dimension first; fast mode only).
        fused_group_size: virtual nodes per fused batch; ``None``: all of a worker's. Either way the
            engine makes it smaller (and remembers it) on out-of-memory, or where a module cannot
            tell where the group's samples are (``runtime/fused/``).
        cuda_graphs: replay each fused group's forward and backward from a CUDA graph captured once
            per group shape (``execution="fused"`` on a CUDA device; ``fused_group_size=1`` replays
            one node at a time). Same math; see ``runtime/graphs.py`` for what cannot be captured.
        plugins: ``vnodes.runtime.plugins.Plugin`` objects hosted by the master, e.g.
            ``[DynamicsRecorder()]`` (``vnodes.scheduler.plugins``). Their identity and settings are
            part of the fingerprint; mutators among them change training as they declare.
    """

    model: Callable[[], Any]
    dataset: Callable[[], Any]
    optimizer: Callable[[Any], Any]
    loss: Callable[[Any, Any], Any]
    virtual_nodes: int
    vnode_batch_size: int
    seed: int = 0
    deterministic: bool = False
    lr_scheduler: Optional[Callable[[Any], Any]] = None
    collate_fn: Optional[Callable[[list], Any]] = None
    loader_workers: int = 0
    device: Optional[str] = None
    num_threads: Optional[int] = None
    running_stats: str = "mean"
    execution: str = "sequential"
    fused_group_size: Optional[int] = None
    cuda_graphs: bool = False
    plugins: list = dataclasses.field(default_factory=list)

    @property
    def global_batch_size(self) -> int:
        return self.virtual_nodes * self.vnode_batch_size

    def effective_num_threads(self) -> Optional[int]:
        if self.num_threads is not None:
            return self.num_threads
        return 1 if self.deterministic else None

    # -- validation ----------------------------------------------------------------------------

    def validate(self) -> None:
        """Check every field that can be checked without building anything.

        Raises:
            InvalidJobSpec: naming the field and the fix.
        """
        for name in ("model", "dataset", "optimizer", "loss"):
            if not callable(getattr(self, name)):
                raise InvalidJobSpec(
                    name, f"must be a callable, got {getattr(self, name)!r} "
                    f"(pass a function that builds it, e.g. {name}=build_{name})"
                )
        import torch

        if isinstance(self.model, torch.nn.Module):
            raise InvalidJobSpec(
                "model", f"must be a zero-argument callable that builds the model, got the module "
                f"{type(self.model).__name__} itself (pass its class or a function: model=build_model)"
            )
        for name in ("lr_scheduler", "collate_fn"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise InvalidJobSpec(name, f"must be a callable or None, got {value!r}")
        for name in ("virtual_nodes", "vnode_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidJobSpec(name, f"must be an integer >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise InvalidJobSpec("seed", f"must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.loader_workers, int) or self.loader_workers < 0:
            raise InvalidJobSpec(
                "loader_workers", f"must be an integer >= 0, got {self.loader_workers!r}"
            )
        if self.num_threads is not None and (
            not isinstance(self.num_threads, int) or self.num_threads < 1
        ):
            raise InvalidJobSpec("num_threads", f"must be None or an integer >= 1, got {self.num_threads!r}")
        if self.running_stats not in RUNNING_STATS_POLICIES:
            raise InvalidJobSpec(
                "running_stats", f"must be one of {RUNNING_STATS_POLICIES}, got {self.running_stats!r}"
            )
        if self.execution not in EXECUTION_MODES:
            raise InvalidJobSpec("execution", f"must be one of {EXECUTION_MODES}, got {self.execution!r}")
        if self.execution == "fused" and self.deterministic:
            raise InvalidJobSpec(
                "execution", "'fused' sums a group's gradients inside one backward pass, so its bits depend "
                "on the grouping; deterministic=True needs execution='sequential'"
            )
        if self.cuda_graphs and self.execution != "fused":
            raise InvalidJobSpec(
                "cuda_graphs", "replays fused groups: set execution='fused' (with fused_group_size=1 to replay "
                "one virtual node at a time)")
        if self.fused_group_size is not None and (not isinstance(self.fused_group_size, int)
                                                  or self.fused_group_size < 1):
            raise InvalidJobSpec("fused_group_size", f"must be None or an integer >= 1, got {self.fused_group_size!r}")
        self._validate_plugins()
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise InvalidJobSpec("device", f"{self.device!r} is not a device: {exc}") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise InvalidJobSpec(
                    "device", f"{self.device!r} asked for, but CUDA is not available here; use 'cpu' or None"
                )

    def _validate_plugins(self) -> None:
        from .plugins import Plugin

        if not isinstance(self.plugins, (list, tuple)):
            raise InvalidJobSpec("plugins", f"must be a list of plugins, got {type(self.plugins).__name__}")
        names = set()
        for plugin in self.plugins:
            if not isinstance(plugin, Plugin):
                raise InvalidJobSpec("plugins", f"{plugin!r} is not a vnodes plugin; pass instances such as "
                                     "DynamicsRecorder() from vnodes.scheduler.plugins")
            if not plugin.name or plugin.name in names:
                raise InvalidJobSpec("plugins", f"two plugins are named {plugin.name!r}; each name must be "
                                     "unique (it keys reports and checkpoint state)" if plugin.name else
                                     f"{type(plugin).__name__} has no name; set the class attribute 'name'")
            plugin.validate()
            missing = [name for name in plugin.requires() if name not in names]
            if missing:
                raise InvalidJobSpec("plugins", f"{type(plugin).__name__} reads what {', '.join(missing)} "
                                     f"record{'s' if len(missing) == 1 else ''}: put "
                                     f"{' and '.join(_plugin_class(n) + '()' for n in missing)} before it in plugins=[...]")
            names.add(plugin.name)
        for plugin in self.plugins:
            plugin.validate_peers(self.plugins)
        selectors = [type(p).__name__ for p in self.plugins if "batch" in p.changes]
        if len(selectors) > 1:
            raise InvalidJobSpec("plugins", f"{selectors} each choose the rows a node trains on; keep one of them")
        if self.plugins and self.cuda_graphs:
            raise InvalidJobSpec("cuda_graphs", "a captured graph hides the per-sample losses that plugins need; "
                                 "set cuda_graphs=False or plugins=[]")

    def check_picklable(self, why: str) -> None:
        """Fail early, naming the field, if a callable cannot travel to another process.

        Raises:
            InvalidJobSpec: for the first field that does not pickle.
        """
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            try:
                pickle.dumps(value)
            except Exception as exc:  # pickling raises many types: PicklingError, AttributeError...
                raise InvalidJobSpec(
                    field.name,
                    f"{value!r} cannot be pickled ({exc}), but {why} needs it in another process. "
                    "Define it at module level (not a lambda or a nested function), or use "
                    "functools.partial of a module-level function.",
                ) from None

    # -- identity of the trajectory -------------------------------------------------------------

    #: fields whose value changes the training trajectory (compared on resume)
    TRAJECTORY_FIELDS = (
        "model", "dataset", "optimizer", "loss", "virtual_nodes", "vnode_batch_size", "seed",
        "deterministic", "lr_scheduler", "collate_fn", "running_stats",
    )

    def fingerprint(self) -> dict[str, str]:
        """A short digest per trajectory field; equal digests mean equal trajectories."""
        out = {name: _digest(describe(getattr(self, name))) for name in self.TRAJECTORY_FIELDS}
        # The thread count changes the bits only where bits are promised.
        out["num_threads"] = _digest(repr(self.effective_num_threads() if self.deterministic else None))
        # How per-node random streams derive from the seed (runtime/seeding.py): a checkpoint of
        # another scheme would resume on other dropout masks and augmentations.
        out["seeding"] = _digest(SEEDING_SCHEME)
        if self.plugins:  # absent when there are none: checkpoints written before plugins existed still resume
            out["plugins"] = _digest("; ".join(p.describe() for p in self.plugins))
        return out


def _plugin_class(name: str) -> str:
    """The class a plugin name belongs to, for error messages."""
    return {"recorder": "DynamicsRecorder", "archaeology": "MetadataArchaeology"}.get(name, name)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(obj: Any) -> str:
    """A stable description of a value or callable: name, arguments and bytecode, no addresses."""
    if isinstance(obj, functools.partial):
        args = ", ".join(describe(a) for a in obj.args)
        kwargs = ", ".join(f"{k}={describe(v)}" for k, v in sorted(obj.keywords.items()))
        return f"partial({describe(obj.func)}; {args}; {kwargs})"
    if isinstance(obj, (types.FunctionType, types.MethodType)):
        func = obj.__func__ if isinstance(obj, types.MethodType) else obj
        defaults = describe(func.__defaults__) if func.__defaults__ else ""
        return f"function {func.__qualname__} {_code_digest(func.__code__)} {defaults}"
    if inspect.isclass(obj) or isinstance(obj, types.BuiltinFunctionType):
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    if isinstance(obj, (list, tuple)):
        return type(obj).__name__ + "(" + ", ".join(describe(v) for v in obj) + ")"
    if isinstance(obj, dict):
        return "dict(" + ", ".join(f"{k!r}: {describe(v)}" for k, v in sorted(obj.items(), key=repr)) + ")"
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return repr(obj)
    # A callable object (e.g. nn.CrossEntropyLoss(reduction="none")): its class and its repr.
    return f"{type(obj).__qualname__}:{_strip_addresses(repr(obj))}"


def _code_digest(code: types.CodeType) -> str:
    parts = [code.co_code.hex()]
    for const in code.co_consts:
        parts.append(_code_digest(const) if isinstance(const, types.CodeType) else repr(const))
    parts.append(",".join(code.co_names))
    return _digest("|".join(parts))


def _strip_addresses(text: str) -> str:
    import re

    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)
