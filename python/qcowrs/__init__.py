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
from qcowrs._qcowrs import QcowHeader, QcowRawFile, __version__

__all__ = [
    "CorruptImage",
    "InvalidClusterIndex",
    "InvalidClusterSize",
    "InvalidMagic",
    "InvalidOffset",
    "InvalidRefcountTableSize",
    "QcowError",
    "QcowFile",
    "QcowHeader",
    "QcowRawFile",
    "RefcountRebuildRequired",
    "UnsupportedFeature",
    "UnsupportedVersion",
    "__version__",
]
