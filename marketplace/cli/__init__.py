"""The `marketplace` command and its subcommands (`marketplace.cli:main` is the console script)."""
from marketplace.cli.main import main

__all__ = ["main"]
