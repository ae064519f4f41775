"""The `vsal` command's entry point: huge pages first (a restart, before anything is imported or
allocated: runtime.hugepages), then the command line (runtime.cli)."""

from __future__ import annotations


def main() -> None:
    from vsal.runtime.hugepages import restart_with_hugepages

    restart_with_hugepages()
    from vsal.runtime.cli import main as cli_main

    cli_main()
