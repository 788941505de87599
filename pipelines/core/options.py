"""One definition of each option: a dataclass field carries its default, its choices and its help, and
the command line is generated from the fields (`add_arguments`, `from_arguments`), so no default or
choice list is restated anywhere else."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import MISSING, Field, field, fields, is_dataclass


def option(
    default=MISSING,
    help: str = "",
    *,
    choices: tuple | None = None,
    flag: str | None = None,
    negate: bool = False,
    repeat: Callable | None = None,
    default_factory=MISSING,
    type: Callable | None = None,
) -> Field:
    """A dataclass field that is also a command-line option: `flag` overrides `--field-name`; `negate` makes a
    true default a `--flag` that turns it off; `repeat` makes a repeatable option whose strings it parses;
    `type` parses the value where the default's type cannot (a default of None: derived from other options,
    its help says how)."""
    meta = {"help": help, "choices": choices, "flag": flag, "negate": negate, "repeat": repeat, "type": type}
    return field(default=default, default_factory=default_factory, metadata={"option": meta})


def check_choice(name: str, value, choices) -> None:
    """The one check of a value against its allowed values.

    Args:
        name: what the message calls the value ("precision", "option precision", ...).
        value: the value given.
        choices: the allowed values, shown in the message as given (a tuple, or a sorted list).

    Raises:
        ValueError: one line, "<name> must be one of <choices>, got <value>", when value is not a choice.
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _nested(f: Field):
    return f.default if f.default is not MISSING and is_dataclass(f.default) else None


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One argparse option per `option` field of `cls` (and of nested option dataclasses)."""
    for f in fields(cls):
        if _nested(f) is not None:
            add_arguments(parser, type(f.default))
            continue
        meta = f.metadata.get("option")
        if meta is None:
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        kw: dict = {"dest": f.name, "help": meta["help"]}
        if f.default is MISSING and f.default_factory is MISSING:
            kw["required"] = True
        elif meta["repeat"] is not None:
            kw.update(action="append", default=[], metavar="KEY=VALUE")
        elif isinstance(f.default, bool):
            kw.update(action="store_false" if meta["negate"] else "store_true", default=f.default)
        else:
            kw.update(type=meta.get("type") or type(f.default), default=f.default, choices=meta["choices"])
            if meta["choices"] is None:
                kw["metavar"] = flag.lstrip("-").upper().replace("-", "_")
            if f.default is not None:  # (a None default is derived; its help says from what)
                kw["help"] += f" (default: {f.default if f.default != '' else 'none'})"
        parser.add_argument(flag, **kw)


def from_arguments(cls, args: argparse.Namespace):
    """An instance of `cls` from parsed arguments (nested option dataclasses included)."""
    values = {}
    for f in fields(cls):
        if _nested(f) is not None:
            values[f.name] = from_arguments(type(f.default), args)
        elif "option" in f.metadata and hasattr(args, f.name):
            value = getattr(args, f.name)
            repeat = f.metadata["option"]["repeat"]
            values[f.name] = repeat(value) if repeat is not None else value
    return cls(**values)


def check_types(obj) -> None:
    """Refuse, in one line naming the option, a field value of the wrong type (`case_sensitive="no"`,
    `max_length="512"` or 512.7) or outside its choices: the values a setter, `load(**options)` or a config
    accepts are the ones that run. Types are read from the dataclass's annotations (bool, int, str, float,
    `X | None`); a bool is not an int here, an int is a float."""
    import typing

    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value, hint = getattr(obj, f.name), hints.get(f.name)
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
        if value is None and type(None) in allowed:
            continue
        simple = [t for t in allowed if t in (bool, int, str, float)]
        ok = any(
            (isinstance(value, t) and not (t is int and isinstance(value, bool)))
            or (t is float and isinstance(value, int) and not isinstance(value, bool))
            for t in simple
        )
        if simple and not ok:
            want = " or ".join(t.__name__ for t in simple)
            raise ValueError(f"option {f.name} must be {want}, got {value!r}")
        choices = f.metadata.get("option", {}).get("choices")
        if choices:
            check_choice(f"option {f.name}", value, tuple(choices))


try:
    from types import UnionType as _UnionType
except ImportError:  # pragma: no cover - Python < 3.10
    _UnionType = type(None)


# Longformer's global attention in embeddings (EmbedOptions.global_attention, Encoder): none, as Hugging
# Face's LongformerModel runs without a global_attention_mask; cls: on the <s> of every sequence (each note,
# window or sentence), as LongformerForSequenceClassification sets it.
GLOBAL_ATTENTION = ("none", "cls")
