"""qcowrs: qcow2 disk images from Python — read, write, check and repair, with a Rust core."""

# The native classes and the exceptions are loaded with the package; the Python modules of the
# operations only when first used (PEP 562), so that a command-line call pays only for its
# own command.
from qcowrs._errors import (
    CorruptImage,
    ImageLocked,
    InvalidClusterIndex,
    InvalidClusterSize,
    InvalidMagic,
    InvalidOffset,
    InvalidRefcountTableSize,
    QcowError,
    ReadOnlyImage,
    RefcountRebuildRequired,
    UnsupportedFeature,
    UnsupportedVersion,
)
from qcowrs._qcowrs import (
    Bitmap,
    CheckReport,
    CompareResult,
    Problem,
    QcowHeader,
    QcowRawFile,
    Snapshot,
    __version__,
    check,
    rebuild_refcounts,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qcowrs._amend import amend
    from qcowrs._bitmap import bitmap
    from qcowrs._commit import commit
    from qcowrs._compare import compare
    from qcowrs._convert import convert, dd
    from qcowrs._file import QcowFile
    from qcowrs._info import info
    from qcowrs._measure import measure
    from qcowrs._mount import mount
    from qcowrs._rebase import rebase
    from qcowrs._resize import resize
    from qcowrs._serve import serve

_LAZY = {
    "QcowFile": "qcowrs._file",
    "amend": "qcowrs._amend",
    "bitmap": "qcowrs._bitmap",
    "commit": "qcowrs._commit",
    "compare": "qcowrs._compare",
    "convert": "qcowrs._convert",
    "dd": "qcowrs._convert",
    "info": "qcowrs._info",
    "measure": "qcowrs._measure",
    "mount": "qcowrs._mount",
    "rebase": "qcowrs._rebase",
    "resize": "qcowrs._resize",
    "serve": "qcowrs._serve",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qcowrs' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Bitmap",
    "CheckReport",
    "CompareResult",
    "CorruptImage",
    "ImageLocked",
    "InvalidClusterIndex",
    "InvalidClusterSize",
    "InvalidMagic",
    "InvalidOffset",
    "InvalidRefcountTableSize",
    "Problem",
    "QcowError",
    "QcowFile",
    "QcowHeader",
    "QcowRawFile",
    "ReadOnlyImage",
    "RefcountRebuildRequired",
    "Snapshot",
    "UnsupportedFeature",
    "UnsupportedVersion",
    "__version__",
    "amend",
    "bitmap",
    "check",
    "commit",
    "compare",
    "convert",
    "dd",
    "info",
    "measure",
    "mount",
    "rebase",
    "rebuild_refcounts",
    "resize",
    "serve",
]
