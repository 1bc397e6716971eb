"""MkDocs hook: the reference pages generated from the code at every build, so they cannot drift.

A page asks for a generated part with a marker on a line of its own:

    <!-- vnodes:cli -->       every command, argument, default and help text of ``vnodes``
                              (walked from ``vnodes.scheduler.cli._parser()``)
    <!-- vnodes:jobspec -->   every ``JobSpec`` field: type, default, whether it changes the
                              trajectory (computed from ``JobSpec.fingerprint()``), its description
                              (the Attributes section of the class docstring)

Anything this hook cannot document (a field without a description, a field whose effect on the
fingerprint cannot be tested) is logged as a warning, so ``mkdocs build --strict`` fails on it.

Run it alone to see the markdown: ``python docs/hooks/reference.py cli|jobspec``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import typing
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("mkdocs.plugins.vnodes_reference")

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!-- vnodes:(\w+) -->$", re.MULTILINE)
# Environment variables that the parser reads as defaults: cleared while it is built, so a token set
# in the shell that builds the docs never lands in the site.
PARSER_ENV = ("VNODES_TOKEN", "VNODES_TLS_CA", "VNODES_HANG_TIMEOUT")


# -- mkdocs events ---------------------------------------------------------------------------------


def on_startup(command, dirty):  # noqa: ARG001 - mkdocs hook signature
    link_api_sources()


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 - mkdocs hook signature
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            log.warning("%s: unknown generated section <!-- vnodes:%s -->", page.file.src_path, name)
            return match.group(0)
        return GENERATORS[name]()

    return MARKER.sub(replace, markdown)


def on_page_content(html, page, config, files):  # noqa: ARG001 - mkdocs hook signature
    # Docstrings introduce literal blocks the reStructuredText way ("seen from here::"); rendered
    # as code blocks already, the paragraph before them keeps one colon.
    return html.replace("::</p>", ":</p>") if page.file.src_path.startswith("reference/") else html


def link_api_sources() -> None:
    """``build/docs-api/vnodes/{runtime,scheduler,protos}`` -> the source folders.

    The package is installed in editable mode with ``package-dir`` mappings (``vnodes.runtime`` is
    ``runtime/``), which griffe, reading sources statically, cannot follow; mkdocs.yml points
    mkdocstrings at this folder instead (``build/`` is ignored by git).
    """
    base = ROOT / "build" / "docs-api" / "vnodes"
    base.mkdir(parents=True, exist_ok=True)
    for name in ("runtime", "scheduler", "protos"):
        link = base / name
        if link.is_symlink() and link.resolve() == (ROOT / name).resolve():
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(ROOT / name, target_is_directory=True)


# -- CLI reference ---------------------------------------------------------------------------------


@contextmanager
def _env(**values):
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _build_parser() -> argparse.ArgumentParser:
    with _env(COLUMNS="100", **{name: None for name in PARSER_ENV}):
        from vnodes.scheduler.cli import _parser

        return _parser()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    return parser._get_formatter()._expand_help(action)  # argparse's own %(default)s expansion


def _argument(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    if action.nargs == 0:
        value = ""
    elif action.metavar is not None:
        value = f" {action.metavar}"
    elif action.choices is not None:
        value = " {" + ",".join(map(str, action.choices)) + "}"
    else:
        value = " " + action.dest.upper()
    return ", ".join(f"`{flag}{value}`" for flag in action.option_strings)


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or action.default == []:
        return ""
    return f"`{action.default}`"


def _actions_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | default | description |", "|---|---|---|"]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction,
                                                                    argparse._SubParsersAction)):
            continue
        description = _help(parser, action)
        if action.choices is not None and action.option_strings and action.metavar is not None:
            description += f" (one of: {', '.join(map(str, action.choices))})"
        if isinstance(action, argparse._AppendAction):
            description += " (repeatable)" if "repeatable" not in description else ""
        rows.append(f"| {_argument(action)} | {_default(action)} | {_cell(description)} |")
    return rows


def cli_markdown() -> str:
    parser = _build_parser()
    out = ["```text", parser.format_usage().strip(), "```", "", parser.description or "", "",
           "Options of `vnodes` itself (before the command):", ""]
    out += _actions_table(parser)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {a.dest: a.help for a in subparsers._choices_actions}
    out += ["", "| command | what it does |", "|---|---|"]
    out += [f"| [`vnodes {name}`](#vnodes-{name}) | {_cell(summaries.get(name) or '')} |"
            for name in subparsers.choices]
    for name, sub in subparsers.choices.items():
        out += ["", f"## vnodes {name}", ""]
        if sub.description or summaries.get(name):
            out += [sub.description or summaries[name], ""]
        out += ["```text", sub.format_usage().strip(), "```", ""]
        out += _actions_table(sub)
    return "\n".join(out) + "\n"


# -- JobSpec reference -----------------------------------------------------------------------------


def _f0(*args):  # stand-in callables with different code, so their fingerprints differ
    return 0


def _f1(*args):
    return 1


def _rst_to_md(text: str) -> str:
    return re.sub(r"``(.+?)``", r"`\1`", text)


def attribute_descriptions(cls) -> dict[str, str]:
    """The ``Attributes:`` section of ``cls``'s docstring (Google style), one paragraph per name."""
    import inspect

    doc = inspect.getdoc(cls) or ""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    found: dict[str, list[str]] = {}
    current = None
    for line in lines[start + 1:]:
        if line.strip() and not line.startswith(" "):
            break  # the next section
        entry = re.match(r"^ {4}(\w+)(?: \(.*?\))?: ?(.*)$", line)
        if entry:
            current = entry.group(1)
            found[current] = [entry.group(2)]
        elif current is not None and line.strip():
            found[current].append(line.strip())
    return {name: _rst_to_md(" ".join(parts)) for name, parts in found.items()}


def _changed_value(name: str, hint, default):
    """A value of field ``name`` other than ``default``; raises ``TypeError`` if none is known."""
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else bool if bool in args else hint
    if default is dataclasses.MISSING:
        default = None
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        return not default
    if origin is int:
        return 2 if default is None else default + 1
    if origin is float:
        return 0.5 if default is None else default + 0.5
    if origin is str:
        return "cpu" if default is None else default + "-other"
    if origin in (typing.Callable, __import__("collections.abc").abc.Callable):
        return _f1
    if origin is dict:
        return {"init_scale": 1024.0}
    if name == "plugins":
        from vnodes.scheduler.plugins import DynamicsRecorder

        return [DynamicsRecorder()]
    raise TypeError(f"JobSpec.{name}: cannot make a second value of type {hint!r} to test its fingerprint")


def trajectory_effects() -> dict[str, str]:
    """For each field: ``"yes"``, ``"deterministic"`` (only with ``deterministic=True``) or ``"no"``,
    by comparing ``JobSpec.fingerprint()`` with that one field changed."""
    from vnodes.runtime import JobSpec

    hints = typing.get_type_hints(JobSpec)
    fields = dataclasses.fields(JobSpec)
    effects = {}
    for field in fields:
        changed_in = []
        for deterministic in (False, True):
            base = JobSpec(model=_f0, dataset=_f0, optimizer=_f0, loss=_f0, virtual_nodes=4,
                           vnode_batch_size=2, deterministic=deterministic)
            try:
                value = _changed_value(field.name, hints[field.name], getattr(base, field.name))
            except TypeError as exc:  # a new kind of field: teach _changed_value about it
                log.warning("%s (docs/hooks/reference.py)", exc)
                changed_in = None
                break
            other = dataclasses.replace(base, **{field.name: value})
            if base.fingerprint() != other.fingerprint():
                changed_in.append(deterministic)
        if changed_in is None:
            effects[field.name] = "unknown"
            continue
        effects[field.name] = ("yes" if len(changed_in) == 2 else "deterministic" if changed_in == [True]
                               else "no" if not changed_in else "other")
    return effects


def _settable() -> typing.Optional[set[str]]:
    try:
        from vnodes.scheduler.job_options import settable_fields
    except ImportError:
        return None
    return set(settable_fields())


def jobspec_markdown() -> str:
    from vnodes.runtime import JobSpec

    descriptions = attribute_descriptions(JobSpec)
    effects = trajectory_effects()
    settable = _settable()
    labels = {"yes": "**yes**", "deterministic": "only with `deterministic=True`", "no": "no",
              "other": "**yes** (in some modes)", "unknown": "unknown"}
    head = "| field | type | default | changes the trajectory |"
    rule = "|---|---|---|---|"
    if settable is not None:
        head, rule = head + " `--set` |", rule + "---|"
    rows = [head, rule]
    details = []
    for field in dataclasses.fields(JobSpec):
        if field.name not in descriptions:
            log.warning("JobSpec.%s has no entry in the Attributes section of its docstring "
                        "(runtime/spec.py)", field.name)
        if field.default is not dataclasses.MISSING:
            default = f"`{field.default!r}`"
        elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f"`{field.default_factory()!r}`"  # type: ignore[misc]
        else:
            default = "required"
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", repr(field.type))
        row = f"| [`{field.name}`](#{field.name}) | `{_cell(kind)}` | {default} | {labels[effects[field.name]]} |"
        if settable is not None:
            row += " yes |" if field.name in settable else " no (code: set it in the job file) |"
        rows.append(row)
        details += [f"### `{field.name}` {{#{field.name}}}", "",
                    f"`{kind}`, default {default}; changes the trajectory: {labels[effects[field.name]]}.", "",
                    descriptions.get(field.name, ""), ""]
    spec = JobSpec(model=_f0, dataset=_f0, optimizer=_f0, loss=_f0, virtual_nodes=1, vnode_batch_size=1)
    extra = sorted(set(spec.fingerprint()) - {f.name for f in dataclasses.fields(JobSpec)})
    notes = []
    if extra:
        notes = ["", "The fingerprint also holds " + ", ".join(f"`{k}`" for k in extra)
                 + (": the scheme that derives each virtual node's random streams from the seed, which "
                    "changes only with the vnodes version" if extra == ["seeding"] else "") + "."]
    return "\n".join(rows + notes + ["", "## Fields", ""] + details) + "\n"


GENERATORS = {"cli": cli_markdown, "jobspec": jobspec_markdown}


if __name__ == "__main__":
    sys.stdout.write(GENERATORS[sys.argv[1]]())
