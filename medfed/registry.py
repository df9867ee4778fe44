"""Small explicit registries: register by name (duplicates raise), create by name with validated options."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

T = TypeVar("T")


class UnknownComponentError(KeyError):
    def __init__(self, kind: str, name: str, allowed: list[str]) -> None:
        self.kind, self.name, self.allowed = kind, name, allowed
        super().__init__(f"unknown {kind} {name!r}; allowed: {', '.join(allowed)}")

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    factory: Callable[..., T]
    options: type[BaseModel] | None


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, *, options: type[BaseModel] | None = None
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = Entry(name, factory, options)
            return factory

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownComponentError(self.kind, name, self.names()) from None

    def options(self, name: str) -> type[BaseModel] | None:
        return self.entry(name).options

    def create(self, name: str, options: BaseModel | Mapping[str, Any] | None = None) -> T:
        """Build a component; raw mappings are validated against its options model first."""
        entry = self.entry(name)
        if entry.options is None:
            if options:
                raise ValueError(f"{self.kind} {name!r} takes no options, got {dict(options)}")
            return entry.factory()
        if options is None:
            options = {}
        if not isinstance(options, BaseModel):
            try:
                options = entry.options.model_validate(dict(options))
            except ValidationError as err:
                raise ValueError(f"invalid options for {self.kind} {name!r}: {err}") from None
        return entry.factory(options)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
