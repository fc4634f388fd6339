"""One name -> one constructor (timm's `register_model` pattern), shared by the weighting
methods, the defences, the distillation methods and the classifier architectures."""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, error: type[Exception] = KeyError):
        self.kind = kind
        self.error = error  # what an unknown name raises (UserError where users type the name)
        self._table: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj):
            if name in self._table:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            if isinstance(obj, type):
                obj.name = name
            self._table[name] = obj
            return obj
        return deco

    def names(self) -> list[str]:
        return list(self._table)

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._table:
            raise self.error(f"unknown {self.kind} {name!r} (choose from {', '.join(self._table)})")
        return self._table[name]

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        return self.get(name)(*args, **kwargs)


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a one-line UserError naming the option."""
    from shared.errors import UserError

    if value not in choices:
        raise UserError(f"{option} must be {' or '.join(repr(c) for c in choices)}, got {value!r}")
    return value
