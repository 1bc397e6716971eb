"""The job options that ``vnodes run`` and ``vnodes master`` share, defined once.

    --steps K  --deterministic  --checkpoint-dir D (alias --run-dir)  --checkpoint-every N
    --set FIELD=VALUE (repeatable)

``--set`` overrides any JobSpec field that is plain data (numbers, flags, strings), typed from the
dataclass: ``--set vnode_batch_size=32 --set device=cuda --set num_threads=none``. Callable fields
(``model``, ``dataset``...) are code: they are set in the job file.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any, Optional, Sequence

from vnodes.runtime import JobSpec, VnodesError


MAX_STEPS = 2**53  # steps are counted in 64-bit fields and float losses index them


class BadOverride(VnodesError):
    """A ``--set FIELD=VALUE`` names no settable field or a value of the wrong type."""


def int_in_range(minimum: int, maximum: Optional[int] = None):
    """An argparse type: an integer in [minimum, maximum], refused with the range otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: it must be {bound}")
        return value

    return parse


def seconds_at_least(minimum: float):
    """An argparse type: a finite number of seconds, at least ``minimum``, refused with the bound otherwise."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number of seconds; give one of at least "
                                             f"{minimum:g}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be at least {minimum:g} seconds")
        return value

    return parse


def add_job_options(parser: argparse.ArgumentParser, run_dir_required: bool) -> None:
    """The options both ``run`` and ``master`` take, with the same names, types and meanings."""
    parser.add_argument("job", metavar="JOB.py[:NAME]",
                        help="a Python file defining a JobSpec (`spec`, the only one, NAME, or a function `job()`)")
    parser.add_argument("--steps", type=int_in_range(0, MAX_STEPS), required=True,
                        help="total global steps of the run (resumed steps count)")
    parser.add_argument("--checkpoint-dir", "--run-dir", dest="run_dir", metavar="D", required=run_dir_required,
                        help="where checkpoints (and a master's resumable state) live: resume from the newest "
                             "one there, write one at the end" + ("" if run_dir_required else
                                                                  " (default: none, nothing is kept)"))
    parser.add_argument("--checkpoint-every", type=int_in_range(1), metavar="N",
                        help="also write a checkpoint every N steps (default: only at the end)")
    parser.add_argument("--deterministic", action="store_true",
                        help="bitwise-reproducible mode (fixes the thread count, canonical reduction order); "
                             "same as --set deterministic=true")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a JobSpec field that is plain data, typed from the dataclass "
                             f"(repeatable; fields: {', '.join(settable_fields())})")
    from .plugins import PLUGINS

    parser.add_argument("--plugin", dest="plugins", action="append", default=[], choices=sorted(PLUGINS),
                        help="host this plugin on the master with its default settings (repeatable, in "
                             "order): recorder records every sample's loss per epoch into the run directory "
                             "(vnodes.scheduler.plugins.load_dynamics); archaeology plants MAP-D's probe "
                             "suites (after recorder; then vnodes analyze RUN_DIR); correction and "
                             "prioritized correct labels and backpropagate the samples worth it (after "
                             "archaeology)")


def settable_fields() -> list[str]:
    """JobSpec fields a command line can set: those whose type is plain data, not code."""
    return [name for name, kind in _field_types().items() if _plain(kind) is not None]


def apply_job_options(spec: JobSpec, args: argparse.Namespace) -> JobSpec:
    """``spec`` with ``--set`` overrides, ``--deterministic`` and ``--plugin`` applied, validated.

    Raises:
        BadOverride: an unknown or unsettable field, or a value of the wrong type.
        InvalidJobSpec: the overridden spec is invalid (names the field and the fix).
    """
    changes = parse_overrides(args.overrides)
    if args.deterministic:
        changes["deterministic"] = True
    if getattr(args, "plugins", None):
        from .plugins import PLUGINS

        changes["plugins"] = list(spec.plugins) + [PLUGINS[name]() for name in args.plugins]
    if not changes:
        return spec
    spec = dataclasses.replace(spec, **changes)
    spec.validate()
    return spec


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["FIELD=VALUE", ...]`` as typed JobSpec field values.

    Raises:
        BadOverride: as for ``apply_job_options``.
    """
    types = _field_types()
    changes: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        valid = ", ".join(settable_fields())
        if not sep:
            raise BadOverride(f"--set {item!r}: write FIELD=VALUE (fields: {valid})")
        if name not in types:
            raise BadOverride(f"--set {item!r}: JobSpec has no field {name!r}; settable fields: {valid}")
        plain = _plain(types[name])
        if plain is None:
            raise BadOverride(f"--set {item!r}: {name} is code (a callable); set it in the job file. "
                              f"Settable fields: {valid}")
        kind, optional = plain
        changes[name] = _convert(name, text.strip(), kind, optional)
    return changes


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(JobSpec)
    return {f.name: hints[f.name] for f in dataclasses.fields(JobSpec)}


def _plain(kind: Any) -> Optional[tuple[type, bool]]:
    """``(base type, accepts None)`` for int/float/bool/str and their Optionals; None for anything else."""
    optional = False
    if typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) != 1:
            return None
        kind, optional = args[0], True
    return (kind, optional) if kind in (int, float, bool, str) else None


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _convert(name: str, text: str, kind: type, optional: bool) -> Any:
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
        raise BadOverride(f"--set {name}={text}: {name} takes {expected}" + (" or none" if optional else "")) from None
