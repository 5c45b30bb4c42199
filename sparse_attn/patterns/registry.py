"""Name -> class registries: one for patterns (:mod:`.base`), one for decode page selections (:mod:`.decode`).

The checks (a name registered twice, an unknown name, a name that is not a str, a config without a
``name``) live here once; each registry only says what it holds, for its messages.

Example:
    >>> reg = Registry("widget")
    >>> @reg.register("box")
    ... class Box:
    ...     def __init__(self, side=1):
    ...         self.side = side
    >>> reg.names(), reg.get("box", side=2).side, Box.name
    (['box'], 2, 'box')
"""

from typing import Dict, Tuple


class Registry:
    """Classes by name; ``kind`` (``"pattern"``, ``"decode pattern"``) names what it holds in errors."""

    def __init__(self, kind: str):
        if not isinstance(kind, str) or not kind:
            raise TypeError(f"kind must be a non-empty str, got {kind!r}.")
        self.kind = kind
        self._classes: Dict[str, type] = {}

    def register(self, name: str):
        """Class decorator: sets ``cls.name = name`` and makes the class available as ``get(name)``."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}.")

        def deco(cls):
            if name in self._classes:
                raise ValueError(f"{self.kind} name {name!r} is already registered to "
                                 f"{self._classes[name].__name__}.")
            cls.name = name
            self._classes[name] = cls
            return cls
        return deco

    def names(self) -> list:
        """Registered names, sorted."""
        return sorted(self._classes)

    def __contains__(self, name) -> bool:
        return name in self._classes

    def cls(self, name: str) -> type:
        """The class registered as ``name``."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}.")
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of {self.names()}.")
        return self._classes[name]

    def get(self, name: str, **kw):
        """An instance of the class registered as ``name``, configured with ``kw``."""
        return self.cls(name)(**kw)

    def split_config(self, d) -> Tuple[str, dict]:
        """``{"name": n, **kw}`` (a saved config) -> ``(n, kw)``, ``kw`` a new dict."""
        if not isinstance(d, dict) or "name" not in d:
            raise ValueError(f"a {self.kind} config must be a dict with a 'name' key, got {d!r}.")
        kw = dict(d)
        return kw.pop("name"), kw
