//! Layouts checked against what `qemu-img create` (QEMU 10.0) produced for the same options
//! (offsets read from its images), option checks, and the file handling of a create.

use super::layout::{refcount_metadata_size, Cluster, Event, Extend, Grow, Layout, Params};
use super::*;
use crate::format::{L1E_COPIED, L2E_COPIED};
use crate::storage::MemStorage;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

fn params(size: u64, cluster_bits: u32, preallocation: Preallocation) -> Params {
    Params { cluster_bits, refcount_order: 4, extended_l2: false, data_file: false, size, preallocation }
}

fn layout(p: &Params) -> Layout {
    Layout::build(p).unwrap()
}

#[test]
fn refcount_metadata_size_is_qemus_fixed_point() {
    // 64 KiB clusters, 16-bit refcounts: 32768 clusters per refblock, 8192 refblocks per
    // reftable cluster.
    assert_eq!(refcount_metadata_size(4, 16, 4, false), 1);
    assert_eq!(refcount_metadata_size(32766, 16, 4, false), 1);
    assert_eq!(refcount_metadata_size(32767, 16, 4, false), 2);
    // The generous variant adds half the table clusters to the clusters counted.
    assert_eq!(refcount_metadata_size(32765, 16, 4, true), 1);
    assert_eq!(refcount_metadata_size(32766, 16, 4, true), 2);
    // 512-byte clusters, 1-bit refcounts: 4096 clusters per refblock.
    assert_eq!(refcount_metadata_size(10_000, 9, 0, false), 3);
}

#[test]
fn default_layout_is_header_reftable_refblock_l1() {
    // qemu-img create -f qcow2 t.qcow2 1M: reftable 0x10000, refblock 0x20000, L1 0x30000,
    // the file ends after the L1 table's one entry (0x30008).
    let l = layout(&params(M, 16, Preallocation::Off));
    assert_eq!(l.reftable_offset, 0x10000);
    assert_eq!(l.reftables.last().unwrap()[0], 0x20000);
    assert_eq!((l.l1_offset, l.l1.len()), (0x30000, 1));
    assert_eq!(l.image_len, 0x30008);
    assert!((0..4).all(|c| l.refcounts.get(c)));
    assert!(!l.refcounts.get(4));
    // A zero-sized image has no L1 table at all.
    let l = layout(&params(0, 16, Preallocation::Off));
    assert_eq!((l.l1_offset, l.l1.len(), l.image_len), (0, 0, 0x30000));
}

#[test]
fn metadata_preallocation_interleaves_l2_tables_and_data() {
    let l = layout(&params(M, 16, Preallocation::Metadata));
    assert_eq!(l.l1[0], 0x40000 | L1E_COPIED);
    let l2 = &l.l2[&0];
    assert_eq!(l2[0], 0x50000 | L2E_COPIED);
    assert_eq!(l2[15], 0x140000 | L2E_COPIED);
    assert_eq!(l2[16], 0);
    // Data clusters are allocated, not written; the file is truncated to the last one.
    assert_eq!(l.image_len, 0x150000);
    assert!(l.events.contains(&Event::Grow {
        data_file: false,
        extend: Extend { from: 0x50000, to: 0x150000, mode: Grow::Truncate }
    }));
    // A size that ends inside a cluster: QEMU's copy-on-write writes zeros over the rest.
    let l = layout(&params(1024, 16, Preallocation::Metadata));
    assert!(l.events.contains(&Event::Zeros { data_file: false, offset: 0x50400, len: 0xfc00 }));
    assert_eq!(l.image_len, 0x60000);
}

#[test]
fn falloc_moves_the_reftable_and_reuses_its_cluster_for_the_l2_table() {
    // qemu-img create -o preallocation=falloc 1M: reftable at 0x40000, L2 at 0x10000 (the
    // old reftable's cluster), data fallocated at 0x50000..0x150000.
    let l = layout(&params(M, 16, Preallocation::Falloc));
    assert_eq!(l.reftable_offset, 0x40000);
    assert_eq!(l.l1[0], 0x10000 | L1E_COPIED);
    assert_eq!(l.l2[&0][0], 0x50000 | L2E_COPIED);
    assert_eq!(l.clusters[&1], Cluster::L2 { l1_index: 0 });
    assert!(l.events.contains(&Event::Grow {
        data_file: false,
        extend: Extend { from: 0x50000, to: 0x150000, mode: Grow::Fallocate }
    }));
}

#[test]
fn a_refblock_allocation_restarts_the_search_at_the_same_clusters() {
    // 4 KiB clusters, 1 GiB, metadata: the data of L2 table 406 ends exactly where refblock
    // 102 starts (0x33000000). QEMU puts L2 table 407 there, the refblock after it and the
    // data after both (update_refcount rewinds free_cluster_index on -EAGAIN).
    let l = layout(&params(1 << 30, 12, Preallocation::Metadata));
    assert_eq!(l.l1[406], 0x32dff000 | L1E_COPIED);
    assert_eq!(l.l1[407], 0x33000000 | L1E_COPIED);
    assert_eq!(l.reftables.last().unwrap()[102], 0x33001000);
    assert_eq!(l.l2[&407][0], 0x33002000 | L2E_COPIED);
    assert_eq!(l.image_len, 0x40284000);
}

#[test]
fn external_data_file_maps_guest_offsets_and_grows_the_data_file() {
    let p = Params { data_file: true, ..params(M, 16, Preallocation::Metadata) };
    let l = layout(&p);
    let l2 = &l.l2[&0];
    assert_eq!(l2[0], L2E_COPIED);
    assert_eq!(l2[1], 0x10000 | L2E_COPIED);
    assert_eq!(l.image_len, 0x50000);
    assert_eq!(l.data_len, M);
    // file-posix writes the first 4 KiB of a file it grows from length 0.
    assert!(l.events.contains(&Event::Zeros { data_file: true, offset: 0, len: 4096 }));
    // Without preallocation, the data file is only truncated to the size.
    let l = layout(&Params { data_file: true, ..params(3 * K, 16, Preallocation::Off) });
    assert_eq!(l.data_len, 3 * K);
    assert!(l.events.contains(&Event::Zeros { data_file: true, offset: 0, len: 512 }));
}

#[test]
fn a_full_reftable_moves_past_everything() {
    // 512-byte clusters, 16-bit refcounts: one reftable cluster covers 64 refblocks of 256
    // clusters (8 MiB); metadata preallocation of 64 MiB outgrows it.
    let l = layout(&params(64 * M, 9, Preallocation::Metadata));
    assert!(l.reftables.len() > 1, "the reftable moved");
    let live = l.reftables.last().unwrap();
    let used: Vec<u64> = live.iter().copied().filter(|&e| e != 0).collect();
    assert!(used.len() as u64 >= l.image_len.div_ceil(512 * 256));
    // Every structure in use is refcounted (old reftables were freed).
    for (&c, &kind) in &l.clusters {
        let old = matches!(kind, Cluster::Reftable { generation, .. } if generation + 1 < l.reftables.len());
        assert!(old || l.refcounts.get(c), "cluster {c} ({kind:?}) in use but free");
    }
}

fn opts(size: u64) -> CreateOptions {
    CreateOptions { virtual_size: size, ..CreateOptions::default() }
}

#[test]
fn option_strings_parse_as_qemu_img_accepts_them() {
    assert_eq!("0.10".parse::<Compat>().unwrap(), Compat::V2);
    assert_eq!("v2".parse::<Compat>().unwrap(), Compat::V2);
    assert_eq!("1.1".parse::<Compat>().unwrap(), Compat::V3);
    assert_eq!("v3".parse::<Compat>().unwrap(), Compat::V3);
    for (s, p) in [
        ("off", Preallocation::Off),
        ("metadata", Preallocation::Metadata),
        ("falloc", Preallocation::Falloc),
        ("full", Preallocation::Full),
    ] {
        assert_eq!(s.parse::<Preallocation>().unwrap(), p);
    }
    assert_eq!("zstd".parse::<CompressionType>().unwrap(), CompressionType::Zstd);
    for (e, name) in [
        ("0.9".parse::<Compat>().unwrap_err(), "compat"),
        ("bogus".parse::<Preallocation>().unwrap_err(), "preallocation"),
        ("lz4".parse::<CompressionType>().unwrap_err(), "compression_type"),
    ] {
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert!(e.to_string().contains(&format!("Parameter '{name}' does not accept value")), "{e}");
    }
}

#[test]
fn bad_values_are_refused_with_qemus_reasons() {
    let v2 = |o: CreateOptions| CreateOptions { compat: Compat::V2, ..o };
    let cases: Vec<(CreateOptions, &str)> = vec![
        (CreateOptions { cluster_size: 1000, ..opts(M) }, "Cluster size must be a power of two between 512 and 2048k"),
        (CreateOptions { cluster_size: 4 * M, ..opts(M) }, "Cluster size must be a power of two"),
        (CreateOptions { cluster_size: 8192, extended_l2: true, ..opts(M) }, "at least 16384 bytes"),
        (CreateOptions { refcount_bits: 3, ..opts(M) }, "Refcount width must be a power of two"),
        (CreateOptions { refcount_bits: 128, ..opts(M) }, "may not exceed 64 bits"),
        (v2(CreateOptions { refcount_bits: 8, ..opts(M) }), "Different refcount widths than 16 bits"),
        (v2(CreateOptions { lazy_refcounts: true, ..opts(M) }), "Lazy refcounts"),
        (v2(CreateOptions { extended_l2: true, ..opts(M) }), "Extended L2 entries are only supported with compat"),
        (v2(CreateOptions { compression_type: CompressionType::Zstd, ..opts(M) }), "Non-zlib compression type"),
        (v2(CreateOptions { data_file: Some("d.raw".into()), ..opts(M) }), "External data files"),
        (CreateOptions { data_file_raw: true, ..opts(M) }, "data-file-raw requires data-file"),
        (CreateOptions { backing_format: Some("raw".into()), ..opts(M) }, "Backing format cannot be used"),
        (
            CreateOptions {
                backing_file: Some("b".into()),
                preallocation: Preallocation::Metadata,
                unsafe_backing: true,
                ..opts(M)
            },
            "only be used at the same time if extended_l2 is on",
        ),
        (CreateOptions { backing_file: Some("b".into()), unsafe_backing: true, ..opts(0) }, "needs a size"),
        (CreateOptions { backing_file: Some(String::new()), ..opts(M) }, "Expected backing file name"),
        (CreateOptions { backing_file: Some("b".repeat(1024)), unsafe_backing: true, ..opts(M) }, "1023"),
        (
            CreateOptions {
                backing_file: Some("b".into()),
                backing_format: Some("vmdk".into()),
                unsafe_backing: true,
                ..opts(M)
            },
            "Parameter 'backing_format' does not accept value 'vmdk'",
        ),
        (opts(u64::MAX - 10), "Invalid image size specified"),
        (CreateOptions { cluster_size: 512, ..opts(1 << 40) }, "too large for file format 'qcow2'"),
    ];
    for (o, want) in cases {
        let e = Plan::new(Path::new("t.qcow2"), &o).unwrap_err();
        assert!(e.to_string().contains(want), "{o:?}: {e}");
        let class_ok = match &e {
            Error::InvalidClusterSize(_) => o.cluster_size != 65536,
            Error::UnsupportedFeature(_) => o.refcount_bits != 16 || o.virtual_size >= 1 << 40,
            Error::InvalidArgument(_) => true,
            _ => false,
        };
        assert!(class_ok, "{o:?}: {e:?}");
    }
}

#[test]
fn the_header_is_qemus() {
    // v2: 72-byte header, then the backing format extension, the end marker, the name.
    let o = CreateOptions {
        compat: Compat::V2,
        backing_file: Some("base.raw".into()),
        backing_format: Some("raw".into()),
        unsafe_backing: true,
        ..opts(1000)
    };
    let plan = Plan::new(Path::new("t.qcow2"), &o).unwrap();
    let h = QcowHeader::parse(&plan.header).unwrap();
    assert_eq!((h.version, h.size, h.header_length), (2, 1024, 72));
    assert_eq!((h.backing_file_offset, h.backing_file_size), (96, 8));
    assert_eq!(h.backing_format().as_deref(), Some("raw"));
    // v3 with 512-byte clusters: no feature name table (QEMU omits it up to 4 KiB clusters).
    let plan = Plan::new(Path::new("t.qcow2"), &CreateOptions { cluster_size: 512, ..opts(M) }).unwrap();
    let h = QcowHeader::parse(&plan.header).unwrap();
    assert!(h.extensions.is_empty());
    // zstd, extended L2, a data file, raw data: the feature bits and the extension.
    let o = CreateOptions {
        compression_type: CompressionType::Zstd,
        extended_l2: true,
        data_file: Some("d.raw".into()),
        data_file_raw: true,
        lazy_refcounts: true,
        ..opts(M)
    };
    let h = QcowHeader::parse(&Plan::new(Path::new("t.qcow2"), &o).unwrap().header).unwrap();
    assert_eq!(h.incompatible_features, INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2);
    assert_eq!((h.compatible_features, h.autoclear_features), (COMPAT_LAZY_REFCOUNTS, AUTOCLEAR_DATA_FILE_RAW));
    assert_eq!((h.compression_type, h.header_length), (COMPRESSION_ZSTD, 112));
    assert_eq!(h.data_file().as_deref(), Some("d.raw"));
    assert_eq!(h.extensions[0].kind, EXT_DATA_FILE);
    assert_eq!(h.extensions[1].kind, EXT_FEATURE_TABLE);
}

#[test]
fn every_preallocation_mode_makes_a_clean_image_in_memory() {
    for p in [Preallocation::Off, Preallocation::Metadata, Preallocation::Falloc, Preallocation::Full] {
        for cs in [512, 65536] {
            let mem: Arc<dyn Storage> = Arc::new(MemStorage::new(Vec::new()));
            let o = CreateOptions { cluster_size: cs, preallocation: p, ..opts(3 * M + 512) };
            let mut f = create_on(Arc::clone(&mem), &o).unwrap();
            assert_eq!(f.virtual_size(), 3 * M + 512);
            let report = f.check().unwrap();
            assert!(report.is_clean(), "{p:?} {cs}: {report:?}");
            let mut buf = vec![1u8; 4096];
            let n = f.read_at(&mut buf, 3 * M - 100).unwrap();
            assert_eq!(n, 612);
            assert!(buf[..n].iter().all(|&b| b == 0), "{p:?} {cs}");
            if p == Preallocation::Off {
                assert!(f.allocated_ranges().unwrap().is_empty());
            } else {
                let data: u64 = f.allocated_ranges().unwrap().iter().map(|r| r.1).sum();
                assert_eq!(data, 3 * M + 512, "{p:?} {cs}");
            }
        }
    }
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".qcowrs-"))
        .collect()
}

#[test]
fn create_replaces_an_existing_file_only_when_complete() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    std::fs::write(&p, vec![7u8; 3 << 20]).unwrap();
    // A bad option: the existing file is untouched and nothing is left behind.
    let bad = CreateOptions { cluster_size: 1000, ..opts(M) };
    assert!(QcowFile::create(&p, &bad).is_err());
    assert_eq!(std::fs::read(&p).unwrap(), vec![7u8; 3 << 20]);
    // overwrite = false refuses with EEXIST.
    let keep = CreateOptions { overwrite: false, ..opts(M) };
    match QcowFile::create(&p, &keep).unwrap_err() {
        Error::Io { source, .. } => assert_eq!(source.raw_os_error(), Some(libc::EEXIST)),
        e => panic!("{e:?}"),
    }
    // The default replaces it.
    drop(QcowFile::create(&p, &opts(M)).unwrap());
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 0x30008);
    assert!(temp_files(dir.path()).is_empty());
}

#[test]
fn create_refuses_an_image_another_process_holds() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    let held = QcowFile::create(&p, &opts(M)).unwrap();
    let before = std::fs::read(&p).unwrap();
    let e = QcowFile::create(&p, &opts(2 * M)).unwrap_err();
    assert!(matches!(e, Error::ImageLocked(_)), "{e:?}");
    assert_eq!(std::fs::read(&p).unwrap(), before);
    assert!(temp_files(dir.path()).is_empty());
    drop(held);
    // The same for a data file an open image holds.
    let d = dir.path().join("d.raw");
    let img = QcowFile::create(&p, &CreateOptions { data_file: Some("d.raw".into()), ..opts(M) }).unwrap();
    let other = dir.path().join("u.qcow2");
    let e = QcowFile::create(&other, &CreateOptions { data_file: Some("d.raw".into()), ..opts(M) }).unwrap_err();
    assert!(matches!(e, Error::ImageLocked(_)), "{e:?}");
    assert!(!other.exists());
    assert_eq!(std::fs::metadata(&d).unwrap().len(), M);
    drop(img);
}

#[test]
fn create_takes_the_size_of_the_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.raw"), vec![1u8; 1000]).unwrap();
    let p = dir.path().join("top.qcow2");
    let o = CreateOptions {
        backing_file: Some("base.raw".into()),
        backing_format: Some("raw".into()),
        ..CreateOptions::default()
    };
    let f = QcowFile::create(&p, &o).unwrap();
    assert_eq!(f.virtual_size(), 1024);
    let mut buf = [0u8; 1024];
    f.read_at(&mut buf, 0).unwrap();
    assert!(buf[..1000].iter().all(|&b| b == 1) && buf[1000..].iter().all(|&b| b == 0));
    drop(f);
    // The image cannot be its own backing file.
    let same = CreateOptions { backing_file: Some("top.qcow2".into()), ..o.clone() };
    let e = QcowFile::create(&p, &same).unwrap_err();
    assert!(e.to_string().contains("same filename as the backing file"), "{e}");
    // unsafe_backing: the backing file is not opened.
    let u = CreateOptions {
        backing_file: Some("missing.qcow2".into()),
        backing_format: Some("qcow2".into()),
        unsafe_backing: true,
        ..opts(M)
    };
    let f = QcowFile::create(dir.path().join("u.qcow2"), &u).unwrap();
    assert_eq!(f.header().backing_file.as_deref(), Some("missing.qcow2"));
}
