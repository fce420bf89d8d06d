"""The qcowrs exception hierarchy (the single source of truth; the Rust core raises these)."""

from __future__ import annotations

import io

__all__ = [
    "CorruptImage",
    "ImageLocked",
    "InvalidClusterIndex",
    "InvalidClusterSize",
    "InvalidMagic",
    "InvalidOffset",
    "InvalidRefcountTableSize",
    "QcowError",
    "ReadOnlyImage",
    "RefcountRebuildRequired",
    "UnsupportedFeature",
    "UnsupportedVersion",
]


class QcowError(OSError):
    """Every qcowrs failure. A subclass of OSError, so ``except OSError`` catches it too.

    Messages name the header field or structure at fault and its offset in hex.
    OS-level failures keep ``errno``/``strerror``/``filename`` as OSError does.
    """


class InvalidMagic(QcowError):
    """The file does not start with the qcow2 magic ``QFI\\xfb`` (or is too short to)."""


class UnsupportedVersion(QcowError):
    """The header's version is neither 2 nor 3."""


class UnsupportedFeature(QcowError):
    """The image uses a feature qcowrs cannot handle: unknown incompatible bits, encryption,
    an unknown compression type."""


class InvalidClusterSize(QcowError):
    """cluster_bits is outside 9..21 (or below 14 with extended L2 entries)."""


class InvalidOffset(QcowError):
    """A table offset is misaligned, or a table lies (partly) outside the file."""


class InvalidRefcountTableSize(QcowError):
    """The refcount table is empty, too large, or cannot describe the file."""


class InvalidClusterIndex(QcowError):
    """A reference points at a cluster outside the range the structure can describe."""


class CorruptImage(QcowError):
    """The image's metadata is inconsistent (or the image is marked corrupt)."""


class RefcountRebuildRequired(QcowError):
    """The refcounts cannot be trusted (dirty bit, or cluster 0 has refcount 0): open with
    ``rebuild=True`` or call ``rebuild_refcounts()`` before writing."""


class ImageLocked(QcowError):
    """Another process (QEMU or qcowrs) holds the image in a conflicting way (errno EAGAIN),
    as ``qemu-img`` reports 'Failed to get "write" lock'."""


class ReadOnlyImage(QcowError, io.UnsupportedOperation):
    """A write through a handle opened read-only (errno EBADF). Also an
    ``io.UnsupportedOperation``, what ``io.RawIOBase`` users expect from a write to a file not
    opened for writing."""
