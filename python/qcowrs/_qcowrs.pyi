"""Type stubs for the native module (hand-written; keep in step with rust/src/python/)."""

import datetime
from collections.abc import Callable
from typing import Any, final

from typing_extensions import Buffer

from qcowrs._map import MapEntry

__all__ = [
    "Bitmap",
    "CheckReport",
    "CompareResult",
    "Problem",
    "QcowFile",
    "QcowHeader",
    "QcowRawFile",
    "Snapshot",
    "__version__",
    "_error_for_test",
    "_fail_after_ops",
    "_io_ops",
    "amend",
    "bitmap",
    "check",
    "commit",
    "compare",
    "convert",
    "image_info",
    "measure",
    "mount",
    "qcow1_info",
    "rebase",
    "rebuild_refcounts",
    "resize",
    "serve",
]

__version__: str

@final
class QcowHeader:
    magic: int
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int
    compression_type: int
    backing_file: str | None
    backing_format: str | None
    data_file: str | None
    cluster_size: int
    refcount_bits: int
    dirty: bool
    corrupt: bool
    lazy_refcounts: bool
    extended_l2: bool
    @staticmethod
    def read(path: str) -> QcowHeader: ...
    def extensions(self) -> list[tuple[int, bytes]]: ...
    def feature_names(self) -> list[tuple[int, int, str]]: ...
    def to_bytes(self) -> bytes: ...
    def to_dict(self) -> dict[str, object]: ...

@final
class Snapshot:
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_ns: int
    vm_state_size: int
    virtual_size: int | None
    icount: int | None
    l1_size: int
    l1_table_offset: int
    @property
    def date(self) -> datetime.datetime: ...

@final
class Bitmap:
    name: str
    granularity: int
    enabled: bool
    in_use: bool
    persistent: bool

@final
class Problem:
    kind: str
    host_offset: int | None
    guest_offset: int | None
    message: str
    qemu_message: str | None

@final
class CheckReport:
    check_errors: int
    corruptions: int
    leaks: int
    corruptions_fixed: int
    leaks_fixed: int
    image_end_offset: int
    total_clusters: int
    allocated_clusters: int
    fragmented_clusters: int
    compressed_clusters: int
    rebuilt: bool
    problems: list[Problem]
    unlisted_problems: int
    dropped: list[Problem]
    exit_code: int
    is_clean: bool
    def to_dict(self) -> dict[str, int]: ...

@final
class QcowRawFile:
    @staticmethod
    def open(path: str, writable: bool = False) -> QcowRawFile: ...
    @property
    def cluster_size(self) -> int: ...
    @property
    def refcount_bits(self) -> int: ...
    def read_pointer_table(self, offset: int, count: int, mask: int | None = None) -> list[int]: ...
    def write_pointer_table(
        self, offset: int, table: list[int], non_zero_flags: int = 0
    ) -> None: ...
    def read_refcount_block(self, offset: int) -> list[int]: ...
    def write_refcount_block(self, offset: int, refcounts: list[int]) -> None: ...

@final
class QcowFile:
    @staticmethod
    def open(
        path: str,
        writable: bool = False,
        rebuild: bool = False,
        backing: str | None = None,
        no_backing: bool = False,
        force_share: bool = False,
        snapshot: str | None = None,
    ) -> QcowFile: ...
    @staticmethod
    def create(
        path: str,
        virtual_size: int | None = None,
        *,
        cluster_size: int = 65536,
        refcount_bits: int = 16,
        backing_file: str | None = None,
        backing_format: str | None = None,
        lazy_refcounts: bool = False,
        extended_l2: bool = False,
        compat: str = "1.1",
        preallocation: str = "off",
        compression_type: str = "zlib",
        data_file: str | None = None,
        data_file_raw: bool = False,
        unsafe: bool = False,
        overwrite: bool = True,
    ) -> QcowFile: ...
    @property
    def writable(self) -> bool: ...
    def write_at(self, buf: Buffer, offset: int) -> int: ...
    def write_compressed_at(self, buf: Buffer, offset: int) -> int: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def truncate(self, size: int) -> None: ...
    def flush(self) -> None: ...
    @property
    def virtual_size(self) -> int: ...
    @property
    def cluster_size(self) -> int: ...
    @property
    def header(self) -> QcowHeader: ...
    @property
    def closed(self) -> bool: ...
    @property
    def refcounts_stale(self) -> bool: ...
    @property
    def rebuild_report(self) -> CheckReport | None: ...
    def snapshots(self) -> list[Snapshot]: ...
    def create_snapshot(self, name: str) -> Snapshot: ...
    def apply_snapshot(self, id_or_name: str) -> None: ...
    def delete_snapshot(self, id_or_name: str) -> None: ...
    def bitmaps(self) -> list[Bitmap]: ...
    def dirty_ranges(self, name: str) -> list[tuple[int, int]]: ...
    def readinto_at(self, buf: Buffer, offset: int) -> int: ...
    def read_at(self, offset: int, length: int) -> bytes: ...
    def allocated_ranges(self) -> list[tuple[int, int, str]]: ...
    def check(self) -> CheckReport: ...
    def rebuild_refcounts(self) -> CheckReport: ...
    def close(self) -> None: ...
    def map(
        self, start_offset: int = 0, max_length: int | None = None, with_files: bool = False
    ) -> list[MapEntry]: ...

@final
class CompareResult:
    identical: bool
    first_difference: int | None
    reason: str | None
    size_a: int
    size_b: int

def check(path: str, repair: str | None = None, force_share: bool = False) -> CheckReport: ...
def compare(
    a: str,
    b: str,
    *,
    strict: bool = False,
    format_a: str | None = None,
    format_b: str | None = None,
    force_share: bool = False,
    threads: int = 0,
    progress: Callable[[int, int], object] | None = None,
) -> CompareResult: ...
def image_info(path: str, force_share: bool = False) -> dict[str, Any]: ...
def qcow1_info(path: str, force_share: bool = False) -> dict[str, Any]: ...
def convert(
    sources: list[str],
    target: str,
    output_format: str,
    *,
    source_format: str | None = None,
    compress: bool = False,
    compression_type: str = "zlib",
    backing_file: str | None = None,
    backing_format: str | None = None,
    sparse_size: int = 4096,
    existing_target: bool = False,
    target_is_zero: bool = False,
    cluster_size: int = 65536,
    refcount_bits: int = 16,
    compat: str = "1.1",
    lazy_refcounts: bool = False,
    extended_l2: bool = False,
    preallocation: str = "off",
    data_file: str | None = None,
    data_file_raw: bool = False,
    threads: int = 0,
    force_share: bool = False,
    unsafe_cache: bool = False,
    window: tuple[int, int] | None = None,
    snapshot: str | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> None: ...
def mount(path: str, mountpoint: str, *, writable: bool = False) -> None: ...
def measure(
    size: int | None,
    source: str | None,
    output_format: str,
    *,
    size_option: int | None = None,
    cluster_size: int = 65536,
    compat: str | None = None,
    refcount_bits: int = 16,
    extended_l2: bool = False,
    preallocation: str | None = None,
    backing_file: str | None = None,
    encrypt_format: str | None = None,
    encrypt_key_secret: str | None = None,
    source_format: str | None = None,
    force_share: bool = False,
    snapshot: str | None = None,
) -> tuple[int, int, int | None]: ...
def rebuild_refcounts(path: str) -> CheckReport: ...
def amend(
    path: str,
    *,
    compat: str | None = None,
    refcount_bits: int | None = None,
    lazy_refcounts: bool | None = None,
    data_file: str | None = None,
    data_file_raw: bool | None = None,
    size: int | None = None,
    backing_file: str | None = None,
    backing_format: str | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> None: ...
def commit(
    path: str,
    *,
    base: str | None = None,
    drop: bool = False,
    progress: Callable[[int, int], object] | None = None,
) -> None: ...
def rebase(
    path: str,
    backing_file: str,
    backing_format: str | None = None,
    *,
    unsafe: bool = False,
    progress: Callable[[int, int], object] | None = None,
) -> None: ...
def serve(
    path: str,
    *,
    socket: str | None = None,
    host: str = "127.0.0.1",
    port: int = 10809,
    writable: bool = False,
    shared: int = 8,
) -> None: ...
def resize(
    path: str,
    *,
    size: int | None = None,
    delta: int | None = None,
    shrink: bool = False,
    format: str | None = None,
) -> int: ...
def bitmap(
    path: str,
    action: str,
    name: str,
    *,
    granularity: int | None = None,
    source: str | None = None,
) -> None: ...
def _fail_after_ops(n: int | None) -> None: ...
def _io_ops() -> int: ...
def _error_for_test(name: str) -> None: ...
