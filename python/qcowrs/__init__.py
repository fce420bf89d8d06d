"""qcowrs: qcow2 disk images from Python — read, write, check and repair, with a Rust core."""

from qcowrs._errors import (
    CorruptImage,
    InvalidClusterIndex,
    InvalidClusterSize,
    InvalidMagic,
    InvalidOffset,
    InvalidRefcountTableSize,
    QcowError,
    RefcountRebuildRequired,
    UnsupportedFeature,
    UnsupportedVersion,
)
from qcowrs._file import QcowFile
from qcowrs._qcowrs import (
    CheckReport,
    Problem,
    QcowHeader,
    QcowRawFile,
    __version__,
    check,
    rebuild_refcounts,
)

__all__ = [
    "CheckReport",
    "CorruptImage",
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
    "RefcountRebuildRequired",
    "UnsupportedFeature",
    "UnsupportedVersion",
    "__version__",
    "check",
    "rebuild_refcounts",
]
