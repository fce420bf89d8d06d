"""The ``qcowrs`` command line (also ``python -m qcowrs``): qemu-img's subcommands, options,
output and exit codes. Each subcommand is a thin module over the Python API; the framework
(sizes, ``-o`` lists, ``--output``, errors) is in ``_common``."""

from qcowrs.cli._main import main

__all__ = ["main"]
