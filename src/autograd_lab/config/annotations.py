"""Whether a config value fits a class's type annotation, in the words of the error lines
("an integer", "null or a string"); plain config values as hashable keys. Torch-free: the
preflight checks `_target_` nodes' arguments with these (config/targets.py)."""

from __future__ import annotations

import os
from pathlib import Path

from autograd_lab.config.keys import is_int, show_value


def freeze(value):
    """A hashable copy of a plain config value (the cache key of _check_node_arguments)."""
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("__list__", *(freeze(v) for v in value))
    return value


def thaw(value):
    if isinstance(value, tuple) and value[:1] == ("__list__",):
        return [thaw(v) for v in value[1:]]
    if isinstance(value, tuple):
        return {k: thaw(v) for k, v in value}
    return value


def fits(value, hint) -> bool:
    """Whether a config value can be passed where `hint` is annotated. A type no config value
    can spell (timedelta, Optimizer) passes: the class says what it thinks of it."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if origin is typing.Union or origin is types.UnionType:
        return any(fits(value, a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_int(value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str or hint is Path or hint is os.PathLike:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, list)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def describe(hint) -> str:
    """A type annotation in the words of the error lines: "an integer", "null or a string"."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(hint)
        words = [describe(a) for a in args if a is not type(None)]
        words = list(dict.fromkeys(words))
        return " or ".join((["null"] if type(None) in args else []) + words)
    if origin is typing.Literal:
        return "one of: " + ", ".join(a if isinstance(a, str) else show_value(a)
                                      for a in typing.get_args(hint))
    words = {type(None): "null", bool: "true or false", int: "an integer", float: "a number",
             str: "a string", Path: "a path"}
    if hint in words:
        return words[hint]
    if origin in (list, tuple) or hint in (list, tuple):
        return "a list"
    return getattr(hint, "__name__", str(hint))
