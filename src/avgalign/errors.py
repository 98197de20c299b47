"""Errors the library raises for input it cannot carry out. The command line (cli.py) prints each
as one line and exits with code 2; library code never exits the process itself."""

from __future__ import annotations


class UsageError(Exception):
    """A command's arguments cannot be carried out (a model that cannot be loaded, options that
    exclude each other, a data set too small to split): said in one line, no traceback."""
