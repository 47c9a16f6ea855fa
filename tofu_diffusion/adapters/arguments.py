"""A module's forward arguments by name, whether passed by position or by keyword.

Hooks read the signature once, in ``initialize_hook`` (as diffusers' own hooks do), from the module's class:
no positional index is written by hand, so a model whose forward orders its parameters differently is read
by name all the same.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

_MISSING = object()


class Signature:
    """The parameter names of ``type(module).forward`` (without ``self``), in order."""

    def __init__(self, module: torch.nn.Module):
        parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]
        self.names = tuple(p.name for p in parameters
                           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        self.var_positional = any(p.kind == p.VAR_POSITIONAL for p in parameters)  # a forward(..., *args)
        self.owner = type(module).__name__

    def position(self, name: str):
        return self.names.index(name) if name in self.names else None

    def has(self, args: tuple, kwargs: dict, name: str) -> bool:
        return self.get(args, kwargs, name, _MISSING) is not _MISSING

    def get(self, args: tuple, kwargs: dict, name: str, default: Any = None) -> Any:
        if name in kwargs:
            return kwargs[name]
        index = self.position(name)
        if index is not None and index < len(args):
            return args[index]
        return default

    def first(self, args: tuple, kwargs: dict) -> Any:
        """The first parameter (the tokens, the latent or the feature map of every module we hook)."""
        if args:
            return args[0]
        if self.names and self.names[0] in kwargs:
            return kwargs[self.names[0]]
        raise TypeError(f"{self.owner}.forward was called without its first argument "
                        f"({self.names[0] if self.names else 'none'})")

    def replace(self, args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with ``name`` set to ``value`` where it was passed (by keyword if it was not)."""
        index = self.position(name)
        if name not in kwargs and index is not None and index < len(args):
            return args[:index] + (value,) + args[index + 1:], kwargs
        return args, {**kwargs, name: value}

    def replace_first(self, args: tuple, kwargs: dict, value: Any) -> tuple[tuple, dict]:
        if args:
            return (value,) + tuple(args[1:]), kwargs
        return self.replace(args, kwargs, self.names[0], value)

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """Every passed argument by name (positional ones beyond the named parameters are left out)."""
        return self.split(args, kwargs)[0]

    def split(self, args: tuple, kwargs: dict) -> tuple[dict, tuple]:
        """``(every named argument, the extra positional ones a forward(..., *args) received)``."""
        if len(args) > len(self.names) and not self.var_positional:
            raise TypeError(f"{self.owner}.forward got {len(args)} positional arguments; it takes "
                            f"{len(self.names)}")
        return {**dict(zip(self.names, args)), **kwargs}, tuple(args[len(self.names):])

    def join(self, bound: dict, extra: tuple = ()) -> tuple[tuple, dict]:
        """``split``'s inverse: the call's ``(args, kwargs)``; extra positional arguments follow every named one."""
        if not extra:
            return (), dict(bound)
        rest = dict(bound)
        return tuple(rest.pop(name, None) for name in self.names) + tuple(extra), rest
