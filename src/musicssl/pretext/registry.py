"""Registry of pretext methods, filled by discovering every module in :mod:`musicssl.pretext`.

Writing ``src/musicssl/pretext/<name>.py`` with a ``@register`` class is all it takes to add a method.
"""

from __future__ import annotations

import importlib
import pkgutil

from musicssl.pretext.base import PretextMethod

__all__ = ["register", "get_method", "available_methods", "UnknownMethodError"]

_METHODS: dict[str, type[PretextMethod]] = {}
_NOT_METHOD_MODULES = {"base", "registry"}


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one reads as a sentence
        return str(self.args[0])


def register(cls: type[PretextMethod]) -> type[PretextMethod]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    existing = _METHODS.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"two pretext methods are named {cls.name!r}: {existing} and {cls}")
    _METHODS[cls.name] = cls
    return cls


def _discover() -> None:
    import musicssl.pretext as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in _NOT_METHOD_MODULES and not module.name.startswith("_"):
            importlib.import_module(f"musicssl.pretext.{module.name}")


def available_methods() -> list[str]:
    _discover()
    return sorted(_METHODS)


def get_method(name: str) -> type[PretextMethod]:
    _discover()
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown pretext method {name!r}; available: {', '.join(sorted(_METHODS))}") from None
