"""A click choice whose values are a registry's rows, read each time a command line is parsed or
its help is shown: a row a plug-in registers after the CLI module was imported is a choice too."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import click


class RegistryChoice(click.Choice):
    """`click.Choice` over `names()` (e.g. vsal.runtime.precisions.names), never a copy of them."""

    def __init__(self, names: Callable[[], Iterable[str]], case_sensitive: bool = True):
        self._names = names
        super().__init__((), case_sensitive)

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._names())

    @choices.setter
    def choices(self, _value) -> None:
        pass  # click.Choice.__init__ assigns a fixed tuple: the registry is the source instead


def precision_choice() -> RegistryChoice:
    """The `--precision` choices: every registered precision (vsal.runtime.precisions)."""
    from vsal.runtime import precisions

    return RegistryChoice(precisions.names)


def backend_choice() -> RegistryChoice:
    """The `--backend` choices: every registered backend (vsal.runtime.backends)."""
    from vsal.runtime.backends import backend_names

    return RegistryChoice(backend_names)
