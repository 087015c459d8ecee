"""Registry of training methods: ``@register`` a Method subclass, ``get_method(name)``."""

from __future__ import annotations

import importlib

from medsemi.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}
_MODULES = ("supervised", "mean_teacher", "uamt", "cps", "fixmatch", "unimatch", "bcp", "midss", "ustrun",
            "versemi")


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for module in _MODULES:
        try:
            importlib.import_module(f"medsemi.methods.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"medsemi.methods.{module}":
                raise


def available_methods() -> dict[str, type[Method]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[Method]:
    methods = available_methods()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(methods)}")
    return methods[name]
