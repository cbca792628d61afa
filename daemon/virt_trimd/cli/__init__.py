"""The command line: parses arguments, calls the library, prints results."""

from virt_trimd.cli.commands import main

__all__ = ["main"]
