"""`autoenroll`: the operator's command line.

`root.py` holds the `main` group and the helpers; each other module adds one area's commands to it and
imports only `root` (never another command module), so the modules form no cycle: import-linter checks
it (setup.cfg). Importing this package registers every command.
"""

from . import audit, config, directory, escrow, init, keys, operators, server  # noqa: F401  (each registers its commands)
from .root import main

__all__ = ["main"]
