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
from typing import Any, Callable, Optional, Union

from .errors import InvalidJobSpec

RUNNING_STATS_POLICIES = ("mean", "vnode0")
EXECUTION_MODES = ("sequential", "fused")
COMPILE_OPTIONS = ("backend", "mode", "fullgraph", "dynamic", "options")  # JobSpec.compile: torch.compile's
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
        loss: ``(outputs, targets) -> Tensor[b]``: one loss per sample (``reduction="none"``), for
            ``(input, target)`` batches run as ``loss(model(input), target)``. Leave it None when
            ``step_fn`` is set.
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
        step_fn: ``(model, batch) -> Tensor[b]``, instead of ``loss``: the per-sample loss of a
            collated batch of any shape (dicts of tensors, several inputs, ``model(**batch)``, an
            output object with ``.logits``...). Batches are whatever ``collate_fn`` makes of the
            dataset's items. Plugins need ``loss`` (they read outputs and targets). Each row's loss
            must depend on that row alone (no in-batch negatives, no loss normalised over the
            batch): a virtual node's batch is its own only in sequential execution, and fused
            execution passes several nodes' rows at once. It may return ``(loss, {name: Tensor[b]})``:
            per-sample training metrics, averaged over the nodes as the loss is (``RunState.metrics``,
            the metrics stream, the loggers).
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: each forward and loss runs under
            ``torch.autocast`` with that dtype; parameters, gradients and the optimizer keep the
            model's dtype. ``"fp16"`` scales the loss with one scaler for the whole job: an overflow
            anywhere skips the step everywhere, as DDP with ``torch.amp.GradScaler`` on every rank
            does (``runtime/precision.py``).
        grad_scaler: for ``precision="fp16"``: ``torch.amp.GradScaler`` settings (``init_scale``,
            ``growth_factor``, ``backoff_factor``, ``growth_interval``); None: its defaults.
        clip_grad_norm: clip the reduced global gradient to this total 2-norm before the optimizer
            step (``torch.nn.utils.clip_grad_norm_`` on it, as DDP plus that call computes).
        param_groups: ``(model) -> list`` of parameter groups (dicts with ``"params"`` and their
            own settings), passed to ``optimizer`` instead of ``model.parameters()``, e.g. to exclude
            biases and norms from weight decay by name (``model.named_parameters()``).
        eval_dataset: ``() -> Dataset``, evaluated every ``eval_every`` steps and after the last
            step: sharded over the virtual nodes (node ``v`` takes samples ``v, v + N, ...``), in eval
            mode under ``no_grad``; running statistics and random streams are untouched, and the
            result is the same on any number of workers. Never part of the trajectory.
        eval_every: evaluate before every step that is a multiple of this (and after the last);
            None: after the last step only.
        eval_metrics: per-sample metrics of an evaluation batch, a dict of name -> ``Tensor[b]``:
            called as ``eval_metrics(outputs, targets)`` with ``loss``, ``eval_metrics(model, batch)``
            with ``step_fn``. Each is averaged over the whole evaluation set. None: ``{"loss": ...}``,
            the job's own per-sample loss.
        lr_scheduler_metric: the evaluation metric (a name in ``eval_metrics``, e.g. ``"loss"``)
            that ``lr_scheduler`` steps on, for schedulers whose ``step`` takes a metric such as
            ``ReduceLROnPlateau``: the scheduler then steps once per evaluation, with the metric's
            exact mean over the evaluation set, before the optimizer step of the step it preceded
            (as ``scheduler.step(evaluate())`` at the top of a DDP loop). None: it steps once per step.
        compile: run the model's forward and backward through ``torch.compile``: True, or a dict
            of its settings (``backend``, ``mode``, ``fullgraph``, ``dynamic``, ``options``). The
            model's ``forward`` is compiled in place (``engine.compile_in_place``), so its
            ``state_dict`` and checkpoints are those of the plain model. See the training guide for
            where it helps.
    """

    model: Callable[[], Any]
    dataset: Callable[[], Any]
    optimizer: Callable[[Any], Any]
    loss: Optional[Callable[[Any, Any], Any]] = None
    virtual_nodes: int = dataclasses.field(kw_only=True)
    vnode_batch_size: int = dataclasses.field(kw_only=True)
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
    step_fn: Optional[Callable[[Any, Any], Any]] = None
    precision: str = "fp32"
    grad_scaler: Optional[dict] = None
    clip_grad_norm: Optional[float] = None
    param_groups: Optional[Callable[[Any], Any]] = None
    eval_dataset: Optional[Callable[[], Any]] = None
    eval_every: Optional[int] = None
    eval_metrics: Optional[Callable[..., Any]] = None
    lr_scheduler_metric: Optional[str] = None
    compile: Union[bool, dict] = False

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
        for name in ("model", "dataset", "optimizer"):
            if not callable(getattr(self, name)):
                raise InvalidJobSpec(
                    name, f"must be a callable, got {getattr(self, name)!r} "
                    f"(pass a function that builds it, e.g. {name}=build_{name})"
                )
        if self.loss is None and self.step_fn is None:
            raise InvalidJobSpec("loss", "is missing: pass loss=(outputs, targets) -> per-sample loss, or "
                                 "step_fn=(model, batch) -> per-sample loss for batches of another shape")
        if self.loss is not None and self.step_fn is not None:
            raise InvalidJobSpec("step_fn", "replaces loss(model(inputs), targets): set one of loss and step_fn, "
                                 "not both")
        for name in ("loss", "step_fn", "param_groups"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise InvalidJobSpec(name, f"must be a callable or None, got {value!r}")
        self._validate_precision()
        for name in ("eval_dataset", "eval_metrics"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise InvalidJobSpec(name, f"must be a callable or None, got {value!r}")
        if self.eval_every is not None and (isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int)
                                            or self.eval_every < 1):
            raise InvalidJobSpec("eval_every", f"must be None or an integer >= 1, got {self.eval_every!r}")
        if self.eval_dataset is None and (self.eval_every is not None or self.eval_metrics is not None):
            which = "eval_every" if self.eval_every is not None else "eval_metrics"
            raise InvalidJobSpec(which, "applies to the evaluation: set eval_dataset=build_eval_dataset too")
        self._validate_scheduler_metric()
        self._validate_compile()
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

    def _validate_precision(self) -> None:
        from .precision import PRECISIONS, SCALER_DEFAULTS

        if self.precision not in PRECISIONS:
            raise InvalidJobSpec("precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        if self.grad_scaler is not None:
            if self.precision != "fp16":
                raise InvalidJobSpec("grad_scaler", f"scales fp16 losses; precision is {self.precision!r}: set "
                                     "precision='fp16' or grad_scaler=None")
            if not isinstance(self.grad_scaler, dict) or set(self.grad_scaler) - set(SCALER_DEFAULTS):
                raise InvalidJobSpec("grad_scaler", f"must be a dict of {sorted(SCALER_DEFAULTS)}, got "
                                     f"{self.grad_scaler!r}")
            for key, value in self.grad_scaler.items():
                bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or (key == "growth_interval" and not isinstance(value, int)) \
                    or (key == "backoff_factor" and not value < 1) or (key == "growth_factor" and not value > 1)
                if bad:
                    raise InvalidJobSpec("grad_scaler", f"{key}={value!r} is out of range (init_scale > 0, "
                                         "growth_factor > 1, 0 < backoff_factor < 1, growth_interval an integer >= 1)")
        if self.clip_grad_norm is not None:
            value = self.clip_grad_norm
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise InvalidJobSpec("clip_grad_norm", f"must be None or a positive finite number, got {value!r}")

    def _validate_scheduler_metric(self) -> None:
        metric = self.lr_scheduler_metric
        if metric is None:
            return
        if not isinstance(metric, str) or not metric:
            raise InvalidJobSpec("lr_scheduler_metric", f"must be None or the name of an evaluation metric, "
                                 f"got {metric!r}")
        if self.lr_scheduler is None:
            raise InvalidJobSpec("lr_scheduler_metric", f"names the metric lr_scheduler steps on, but there is "
                                 "no lr_scheduler: set lr_scheduler=functools.partial("
                                 "torch.optim.lr_scheduler.ReduceLROnPlateau, ...) or lr_scheduler_metric=None")
        if self.eval_dataset is None:
            raise InvalidJobSpec("lr_scheduler_metric", f"{metric!r} is an evaluation metric, but the job does "
                                 "not evaluate: set eval_dataset=build_eval_dataset (and eval_every=K)")

    def _validate_compile(self) -> None:
        value = self.compile
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(COMPILE_OPTIONS), key=str)
            if unknown:
                raise InvalidJobSpec("compile", f"{unknown} {'is' if len(unknown) == 1 else 'are'} not "
                                     f"torch.compile settings here; use any of {list(COMPILE_OPTIONS)}")
        elif not isinstance(value, bool):
            raise InvalidJobSpec("compile", f"must be True, False or a dict of torch.compile settings, got {value!r}")
        if value is not False and self.cuda_graphs:
            raise InvalidJobSpec("compile", "and cuda_graphs both capture the step; keep one (torch.compile's own "
                                 "CUDA graphs: compile={'mode': 'reduce-overhead'})")

    def compile_options(self) -> Optional[dict]:
        """The ``torch.compile`` settings of the job, or None when it runs eagerly."""
        if self.compile is False:
            return None
        # Static shapes unless asked otherwise: every virtual node's batch has the same shape, and the
        # fused patches branch on shapes in Python (a shape seen anew compiles once more).
        options = {"dynamic": False, **({} if self.compile is True else self.compile)}
        if options.get("backend", "inductor") == "inductor" and "mode" not in options:
            # Random ops (Dropout) draw from torch's generators as in eager mode, so a compiled job
            # keeps the eager trajectory within float rounding (inductor's own generator would not).
            options["options"] = {"fallback_random": True, **options.get("options", {})}
        return options

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
        if self.plugins and self.step_fn is not None:
            raise InvalidJobSpec("plugins", "read each batch's outputs and targets, which step_fn does not expose; "
                                 "use loss=(outputs, targets) -> per-sample loss, or plugins=[]")
        if self.step_fn is not None and self.cuda_graphs:
            raise InvalidJobSpec("cuda_graphs", "replays loss(model(inputs), targets); with step_fn set "
                                 "cuda_graphs=False")
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
        if self.deterministic and self.compile is not False:  # compiled kernels round otherwise than eager ones
            out["compile"] = _digest(describe(self.compile))
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in self.OPTIONAL_TRAJECTORY_FIELDS:  # likewise absent at their defaults
            if getattr(self, name) != defaults[name]:
                out[name] = _digest(describe(getattr(self, name)))
        return out

    #: trajectory fields added later: in the fingerprint only when set, so older checkpoints resume
    OPTIONAL_TRAJECTORY_FIELDS = ("step_fn", "precision", "grad_scaler", "clip_grad_norm", "param_groups",
                                  "lr_scheduler_metric")


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
