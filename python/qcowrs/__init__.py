"""qcowrs: qcow2 disk images from Python — read, write, check and repair, with a Rust core."""

from qcowrs._amend import amend
from qcowrs._bitmap import bitmap
from qcowrs._commit import commit
from qcowrs._compare import compare
from qcowrs._convert import convert, dd
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
from qcowrs._file import QcowFile
from qcowrs._info import info
from qcowrs._measure import measure
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
from qcowrs._rebase import rebase
from qcowrs._resize import resize

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
    "rebase",
    "rebuild_refcounts",
    "resize",
]
