//! The VMDK crate against qemu-img, the independent oracle. qemu only ever
//! reads our images (`compare`, `info`, `map`, `convert` from them); it
//! writes only images it creates itself, which we then read.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use blockferry_testkit::qemu::have_qemu_img;
use blockferry_vmdk::check::{Problem, check};
use blockferry_vmdk::export::{ExportOptions, export_delta, export_flat, export_sparse};
use blockferry_vmdk::image::ParentLink;
use blockferry_vmdk::{
    CreateOptions, DiskKind, DiskRead, OpenMode, RawDisk, VmdkError, VmdkImage, WriteOp,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const GRAIN: u64 = 64 << 10;

fn qemu(args: &[&str], paths: &[&Path]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .args(paths)
        .output()
        .expect("run qemu-img")
}

/// `qemu-img compare -f raw -F vmdk`: panics with qemu's words when they differ.
fn assert_qemu_same(raw: &Path, vmdk: &Path) {
    let out = qemu(&["compare", "-f", "raw", "-F", "vmdk"], &[raw, vmdk]);
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {} {}",
        raw.display(),
        vmdk.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check` (read-only) finds nothing wrong.
fn assert_qemu_check_clean(vmdk: &Path) {
    let out = qemu(&["check", "-f", "vmdk"], &[vmdk]);
    assert!(
        out.status.success(),
        "qemu-img check {}: {} {}",
        vmdk.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_json(args: &[&str], path: &Path) -> serde_json::Value {
    let out = qemu(args, &[path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("qemu-img json")
}

/// A raw model of the disk kept beside the image under test.
struct Model {
    path: PathBuf,
    file: File,
    size: u64,
}

impl Model {
    fn new(path: PathBuf, size: u64) -> Model {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(size).unwrap();
        Model { path, file, size }
    }

    fn apply(&self, ops: &[WriteOp<'_>]) {
        for op in ops {
            match *op {
                WriteOp::Data { offset, data } => self.file.write_all_at(data, offset).unwrap(),
                WriteOp::Zero { offset, len } => self
                    .file
                    .write_all_at(&vec![0u8; len as usize], offset)
                    .unwrap(),
            }
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.size as usize];
        self.file.read_exact_at(&mut b, 0).unwrap();
        b
    }
}

fn read_all(d: &dyn DiskRead) -> Vec<u8> {
    let mut b = vec![0u8; d.size() as usize];
    d.read_at(&mut b, 0).unwrap();
    b
}

/// A random batch: sector-aligned and unaligned writes of 1 byte to 200 KiB,
/// some zero ranges (whole grains and partial), some overlapping.
fn random_batch(rng: &mut StdRng, size: u64) -> Vec<(u64, Option<Vec<u8>>, u64)> {
    let n = rng.gen_range(1..8);
    (0..n)
        .map(|_| {
            let len = match rng.gen_range(0..4) {
                0 => rng.gen_range(1..2048),
                1 => 4096,
                2 => GRAIN * rng.gen_range(1..4),
                _ => rng.gen_range(1..200_000),
            }
            .min(size);
            let mut off = rng.gen_range(0..=size - len);
            if rng.gen_bool(0.5) {
                off -= off % 512;
            }
            if rng.gen_bool(0.15) {
                (off, None, len)
            } else {
                let fill: u8 = rng.r#gen();
                let mut data = vec![fill; len as usize];
                // Some bytes vary so misplaced data is caught.
                for b in data.iter_mut().step_by(509) {
                    *b = rng.r#gen();
                }
                (off, Some(data), len)
            }
        })
        .collect()
}

fn as_ops(batch: &[(u64, Option<Vec<u8>>, u64)]) -> Vec<WriteOp<'_>> {
    batch
        .iter()
        .map(|(offset, data, len)| match data {
            Some(d) => WriteOp::Data {
                offset: *offset,
                data: d,
            },
            None => WriteOp::Zero {
                offset: *offset,
                len: *len,
            },
        })
        .collect()
}

fn random_writes_match_model(kind: DiskKind, seed: u64) {
    // Our own reads are checked against the model even without qemu-img.
    let qemu = have_qemu_img();
    let dir = tempfile::tempdir().unwrap();
    // Not a grain multiple: the last grain is partial.
    let size = 5 * 1024 * 1024 + 7 * 512;
    let model = Model::new(dir.path().join("model.raw"), size);
    let path = dir.path().join("disk.vmdk");
    let mut img = VmdkImage::create(&path, &CreateOptions::new(size, kind)).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    for round in 0..40 {
        let batch = random_batch(&mut rng, size);
        let ops = as_ops(&batch);
        img.apply(&ops).unwrap();
        model.apply(&ops);
        if round % 8 == 7 {
            img.set_cid(blockferry_vmdk::new_cid()).unwrap();
            assert_eq!(read_all(&img), model.bytes(), "round {round}");
            if qemu {
                assert_qemu_same(&model.path, &path);
            }
        }
    }
    drop(img);
    let img = VmdkImage::open(&path, OpenMode::ReadOnly).unwrap();
    assert_eq!(read_all(&img), model.bytes());
    if qemu {
        assert_qemu_same(&model.path, &path);
        assert_qemu_check_clean(&path);
    }
    let report = check(&path).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

#[test]
fn sparse_random_writes_match_model() {
    random_writes_match_model(DiskKind::MonolithicSparse, 1);
    random_writes_match_model(DiskKind::MonolithicSparse, 2);
}

#[test]
fn vmfs_random_writes_match_model() {
    random_writes_match_model(DiskKind::Vmfs, 3);
}

#[test]
fn monolithic_flat_random_writes_match_model() {
    random_writes_match_model(DiskKind::MonolithicFlat, 4);
}

#[test]
fn qemu_info_shows_size_create_type_and_cid() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (kind, name, create_type) in [
        (DiskKind::Vmfs, "a.vmdk", "vmfs"),
        (DiskKind::MonolithicFlat, "b.vmdk", "monolithicFlat"),
        (DiskKind::MonolithicSparse, "c.vmdk", "monolithicSparse"),
    ] {
        let path = dir.path().join(name);
        let mut opts = CreateOptions::new(3 << 20, kind);
        opts.cid = Some(0x1234_5678);
        let mut img = VmdkImage::create(&path, &opts).unwrap();
        img.set_cid(0x0bad_cafe).unwrap();
        drop(img);
        let info = qemu_json(&["info", "--output=json"], &path);
        assert_eq!(info["virtual-size"], 3 << 20, "{info}");
        assert_eq!(info["format"], "vmdk");
        let data = &info["format-specific"]["data"];
        assert_eq!(data["create-type"], create_type, "{info}");
        assert_eq!(data["cid"], 0x0bad_cafe_u32, "{info}");
        assert_eq!(data["parent-cid"], 0xffff_ffff_u32, "{info}");
    }
}

#[test]
fn qemu_map_shows_data_only_where_written() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.vmdk");
    let mut img = VmdkImage::create(
        &path,
        &CreateOptions::new(8 << 20, DiskKind::MonolithicSparse),
    )
    .unwrap();
    img.write_at(&[0xa5; 4096], (1 << 20) + 8192).unwrap();
    img.write_at(&[0x5a; 100], 5 << 20).unwrap();
    drop(img);
    let map = qemu_json(&["map", "--output=json", "-f", "vmdk"], &path);
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, vec![(1 << 20, GRAIN), (5 << 20, GRAIN)], "{map}");
    assert_eq!(
        img_allocated(&path),
        vec![(1 << 20)..(1 << 20) + GRAIN, (5 << 20)..(5 << 20) + GRAIN]
    );
}

fn img_allocated(path: &Path) -> Vec<Range<u64>> {
    VmdkImage::open(path, OpenMode::ReadOnly)
        .unwrap()
        .allocated_ranges()
        .unwrap()
}

#[test]
fn delta_reads_through_parent_and_zero_grains_hide_it() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 4 << 20;
    let model = Model::new(dir.path().join("model.raw"), size);
    let base_path = dir.path().join("base.vmdk");
    let mut base = VmdkImage::create(
        &base_path,
        &CreateOptions::new(size, DiskKind::MonolithicSparse),
    )
    .unwrap();
    let full = vec![0x11u8; size as usize];
    let ops = [WriteOp::Data {
        offset: 0,
        data: &full,
    }];
    base.apply(&ops).unwrap();
    model.apply(&ops);
    let base_cid = base.cid();
    drop(base);

    let delta_path = dir.path().join("delta.vmdk");
    let mut opts = CreateOptions::new(size, DiskKind::MonolithicSparse);
    opts.parent = Some(ParentLink {
        cid: base_cid,
        file_name_hint: "base.vmdk".into(),
    });
    let mut delta = VmdkImage::create(&delta_path, &opts).unwrap();
    let d = vec![0x22u8; 3000];
    let ops = [
        // Partial grain: the rest of the grain must come from the parent.
        WriteOp::Data {
            offset: 100_000,
            data: &d,
        },
        // Whole grains zeroed: must hide the parent's 0x11.
        WriteOp::Zero {
            offset: 2 * GRAIN * 4,
            len: 3 * GRAIN,
        },
        // Partial zero.
        WriteOp::Zero {
            offset: 3 << 20,
            len: 1000,
        },
    ];
    delta.apply(&ops).unwrap();
    model.apply(&ops);
    assert_eq!(read_all(&delta), model.bytes());
    drop(delta);
    assert_qemu_same(&model.path, &delta_path);

    let info = qemu_json(&["info", "--output=json", "--backing-chain"], &delta_path);
    let chain = info.as_array().unwrap();
    assert_eq!(chain.len(), 2, "{info}");
    let child = &chain[0]["format-specific"]["data"];
    let parent = &chain[1]["format-specific"]["data"];
    assert_eq!(child["parent-cid"], parent["cid"], "{info}");
    assert_eq!(parent["cid"], base_cid, "{info}");
    assert_eq!(chain[0]["virtual-size"], size);

    // A parent that changed after the delta was taken is refused by name.
    let mut base = VmdkImage::open(&base_path, OpenMode::ReadWrite).unwrap();
    base.set_cid(base_cid ^ 1).unwrap();
    drop(base);
    match VmdkImage::open(&delta_path, OpenMode::ReadOnly) {
        Err(VmdkError::ParentCidMismatch {
            expected, found, ..
        }) => {
            assert_eq!((expected, found), (base_cid, base_cid ^ 1))
        }
        other => panic!("expected a CID mismatch, got {other:?}"),
    }
    let report = check(&delta_path).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| matches!(p, Problem::BadParent { .. })),
        "{:?}",
        report.problems
    );
}

#[test]
fn reads_every_qemu_subformat() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 3 << 20;
    let model = Model::new(dir.path().join("model.raw"), size);
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..10 {
        let batch = random_batch(&mut rng, size);
        model.apply(&as_ops(&batch));
    }
    let expect = model.bytes();
    for sub in [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "streamOptimized",
    ] {
        let path = dir.path().join(format!("q-{sub}.vmdk"));
        let out = qemu(
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
            ],
            &[&model.path, &path],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let img =
            VmdkImage::open(&path, OpenMode::ReadOnly).unwrap_or_else(|e| panic!("{sub}: {e}"));
        assert_eq!(img.size(), size, "{sub}");
        assert!(read_all(&img) == expect, "{sub} reads differently");
        drop(img);
        let report = check(&path).unwrap();
        assert!(report.is_clean(), "{sub}: {:?}", report.problems);
        if sub == "streamOptimized" {
            // VMware's one-pass writers put the directory offset only in a
            // footer: rewrite qemu's file into that shape and read it again.
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            let mut header = [0u8; 512];
            f.read_exact_at(&mut header, 0).unwrap();
            let len = f.metadata().unwrap().len().next_multiple_of(512);
            let mut tail = vec![0u8; 1536];
            tail[512..1024].copy_from_slice(&header);
            f.write_all_at(&tail, len).unwrap();
            f.write_all_at(&u64::MAX.to_le_bytes(), 56).unwrap();
            drop(f);
            let img = VmdkImage::open(&path, OpenMode::ReadOnly).unwrap();
            assert!(
                read_all(&img) == expect,
                "footer-addressed stream reads differently"
            );
            let report = check(&path).unwrap();
            assert!(report.is_clean(), "{:?}", report.problems);

            // Compressed grains cannot be rewritten in place: refused by name.
            match VmdkImage::open(&path, OpenMode::ReadWrite) {
                Err(VmdkError::Unsupported { what, .. }) => {
                    assert!(what.contains("streamOptimized"), "{what}")
                }
                other => panic!("expected unsupported, got {other:?}"),
            }
        }
    }
}

#[test]
fn exports_compare_equal_and_delta_chains_by_cid() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 6 << 20;
    let model = Model::new(dir.path().join("model.raw"), size);
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..6 {
        model.apply(&as_ops(&random_batch(&mut rng, size)));
    }
    let src = RawDisk::open(&model.path).unwrap();
    let opts = ExportOptions::default();
    let mut calls = 0u64;
    let mut last = None;
    let mut progress = |p: blockferry_vmdk::export::Progress| {
        calls += 1;
        last = Some(p);
    };

    let flat = dir.path().join("e-flat.vmdk");
    let s = export_flat(&src, None, &flat, DiskKind::Vmfs, &opts, &mut progress).unwrap();
    assert_eq!(s.files.len(), 2);
    assert_qemu_same(&model.path, &flat);
    assert!(check(&flat).unwrap().is_clean());

    let sparse = dir.path().join("e-sparse.vmdk");
    let base = export_sparse(&src, None, &sparse, &opts, &mut progress).unwrap();
    assert_qemu_same(&model.path, &sparse);
    assert_qemu_check_clean(&sparse);
    assert!(check(&sparse).unwrap().is_clean());
    // Grains only where the data is non-zero.
    let bytes = model.bytes();
    let nonzero: u64 = bytes
        .chunks(GRAIN as usize)
        .filter(|g| g.iter().any(|&b| b != 0))
        .count() as u64;
    assert_eq!(base.data_bytes, nonzero * GRAIN);

    // Change the model; export only the changed ranges as a delta.
    let mut changed: Vec<Range<u64>> = Vec::new();
    for _ in 0..4 {
        let batch = random_batch(&mut rng, size);
        for (off, _, len) in &batch {
            changed.push(*off..off + len);
        }
        model.apply(&as_ops(&batch));
    }
    let src = RawDisk::open(&model.path).unwrap();
    let delta = dir.path().join("e-delta.vmdk");
    let d = export_delta(&src, &changed, &sparse, &delta, &opts, &mut progress).unwrap();
    assert_ne!(d.cid, base.cid);
    assert_qemu_same(&model.path, &delta);
    assert_qemu_check_clean(&delta);
    assert!(check(&delta).unwrap().is_clean());
    let info = qemu_json(&["info", "--output=json", "--backing-chain"], &delta);
    let chain = info.as_array().unwrap();
    assert_eq!(chain.len(), 2, "{info}");
    assert_eq!(chain[0]["format-specific"]["data"]["parent-cid"], base.cid);
    assert_eq!(chain[1]["format-specific"]["data"]["cid"], base.cid);
    assert_eq!(
        chain[0]["format-specific"]["data"]["create-type"],
        "monolithicSparse"
    );
    // Only grains of changed ranges are in the delta.
    for r in img_allocated(&delta) {
        assert!(
            changed.iter().any(|c| c.start < r.end && r.start < c.end),
            "{r:?} not changed"
        );
    }
    // A delta may not overwrite its own parent.
    assert!(matches!(
        export_delta(&src, &changed, &sparse, &sparse, &opts, &mut |_| {}),
        Err(VmdkError::Invalid { .. })
    ));
    assert_eq!(
        VmdkImage::open(&sparse, OpenMode::ReadOnly).unwrap().cid(),
        base.cid
    );
    let p = last.unwrap();
    assert_eq!(p.done, p.total);
    assert!(calls >= 3);

    // A flat export restricted to ranges writes only those.
    let part = dir.path().join("e-part.vmdk");
    let wanted = GRAIN..3 * GRAIN;
    let s = export_flat(
        &src,
        Some(&[wanted]),
        &part,
        DiskKind::MonolithicFlat,
        &opts,
        &mut |_| {},
    )
    .unwrap();
    let img = VmdkImage::open(&part, OpenMode::ReadOnly).unwrap();
    let got = read_all(&img);
    let want = model.bytes();
    assert_eq!(
        got[GRAIN as usize..3 * GRAIN as usize],
        want[GRAIN as usize..3 * GRAIN as usize]
    );
    assert!(got[..GRAIN as usize].iter().all(|&b| b == 0));
    assert!(s.data_bytes <= 2 * GRAIN);
}

#[test]
fn writes_into_qemu_made_multi_extent_images() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Three 2 GiB extents, all thin on the file system.
    let size: u64 = (4 << 30) + (512 << 20);
    for sub in [
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "monolithicSparse",
    ] {
        let model = Model::new(dir.path().join(format!("{sub}.raw")), size);
        let path = dir.path().join(format!("{sub}.vmdk"));
        let out = qemu(
            &[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
            ],
            &[&path, Path::new(&size.to_string())],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut img = VmdkImage::open(&path, OpenMode::ReadWrite).unwrap();
        assert_eq!(img.size(), size);
        let mut rng = StdRng::seed_from_u64(5);
        // Straddle both extent boundaries, then random places.
        let a = vec![0x77u8; 300_000];
        let b = vec![0x99u8; 8192];
        let mut ops = vec![
            WriteOp::Data {
                offset: (2 << 30) - 100_000,
                data: &a,
            },
            WriteOp::Data {
                offset: (4 << 30) - 4096,
                data: &b,
            },
            WriteOp::Zero {
                offset: (2 << 30) - 10_000,
                len: 2 * GRAIN,
            },
        ];
        let batches: Vec<_> = (0..6).map(|_| random_batch(&mut rng, size)).collect();
        for batch in &batches {
            ops.extend(as_ops(batch));
        }
        img.apply(&ops).unwrap();
        model.apply(&ops);
        drop(img);
        assert_qemu_same(&model.path, &path);
        let report = check(&path).unwrap();
        assert!(report.is_clean(), "{sub}: {:?}", report.problems);
    }
}

/// A crash between a grain's data write and its table entry leaves an
/// unreferenced grain at the end of the file. Reads must not see it, and
/// later writes must not place grains over it or over each other.
#[test]
fn unreferenced_tail_from_a_crash_is_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let size = 2 << 20;
    let model = Model::new(dir.path().join("model.raw"), size);
    let path = dir.path().join("t.vmdk");
    let mut img =
        VmdkImage::create(&path, &CreateOptions::new(size, DiskKind::MonolithicSparse)).unwrap();
    let a = vec![0x31u8; 5000];
    let ops = [WriteOp::Data {
        offset: 70_000,
        data: &a,
    }];
    img.apply(&ops).unwrap();
    model.apply(&ops);
    drop(img);
    // The grain that was being appended when the writer died: data, no entry.
    let f = OpenOptions::new().append(true).open(&path).unwrap();
    std::io::Write::write_all(&mut &f, &vec![0xeeu8; (GRAIN + 700) as usize]).unwrap();
    drop(f);
    let mut img = VmdkImage::open(&path, OpenMode::ReadWrite).unwrap();
    assert_eq!(read_all(&img), model.bytes());
    let b = vec![0x42u8; 3 * GRAIN as usize];
    let ops = [WriteOp::Data {
        offset: GRAIN * 10,
        data: &b,
    }];
    img.apply(&ops).unwrap();
    model.apply(&ops);
    drop(img);
    let img = VmdkImage::open(&path, OpenMode::ReadOnly).unwrap();
    assert_eq!(read_all(&img), model.bytes());
    let report = check(&path).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    if have_qemu_img() {
        assert_qemu_same(&model.path, &path);
    }
}

#[test]
fn read_only_and_zero_extents_refuse_writes_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.vmdk");
    drop(
        VmdkImage::create(
            &path,
            &CreateOptions::new(1 << 20, DiskKind::MonolithicFlat),
        )
        .unwrap(),
    );
    let text = std::fs::read_to_string(&path).unwrap();
    // Half the disk read-only, then a ZERO extent.
    let text = text.replace(
        "RW 2048 FLAT \"ro-flat.vmdk\" 0",
        "RW 1024 FLAT \"ro-flat.vmdk\" 0\nRDONLY 1024 FLAT \"ro-flat.vmdk\" 1024\nRW 1024 ZERO",
    );
    std::fs::write(&path, text).unwrap();
    let mut img = VmdkImage::open(&path, OpenMode::ReadWrite).unwrap();
    assert_eq!(img.size(), 3 << 19);
    let data = vec![7u8; 4096];
    for offset in [(1 << 19) - 1024, 1 << 20] {
        let e = img
            .apply(&[
                WriteOp::Data {
                    offset: 0,
                    data: &data,
                },
                WriteOp::Data {
                    offset,
                    data: &data,
                },
            ])
            .unwrap_err();
        assert!(matches!(e, VmdkError::Invalid { .. }), "{e}");
    }
    // Nothing of either refused batch reached the file.
    let mut buf = vec![1u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn set_parent_links_and_unlinks_a_delta() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 1 << 20;
    let base_path = dir.path().join("p.vmdk");
    let mut base = VmdkImage::create(
        &base_path,
        &CreateOptions::new(size, DiskKind::MonolithicSparse),
    )
    .unwrap();
    base.write_at(&[0x44; 4096], 0).unwrap();
    let base_cid = base.cid();
    drop(base);
    let child_path = dir.path().join("c.vmdk");
    let mut child = VmdkImage::create(
        &child_path,
        &CreateOptions::new(size, DiskKind::MonolithicSparse),
    )
    .unwrap();
    child
        .set_parent(Some(ParentLink {
            cid: base_cid,
            file_name_hint: "p.vmdk".into(),
        }))
        .unwrap();
    drop(child);
    let child = VmdkImage::open(&child_path, OpenMode::ReadOnly).unwrap();
    let mut b = [0u8; 4096];
    child.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x44; 4096], "reads through to the new parent");
    drop(child);
    let info = qemu_json(&["info", "--output=json", "--backing-chain"], &child_path);
    assert_eq!(info.as_array().unwrap().len(), 2, "{info}");
    assert_eq!(info[0]["format-specific"]["data"]["parent-cid"], base_cid);

    let mut child = VmdkImage::open(&child_path, OpenMode::ReadWrite).unwrap();
    child.set_parent(None).unwrap();
    drop(child);
    let info = qemu_json(&["info", "--output=json", "--backing-chain"], &child_path);
    assert_eq!(info.as_array().unwrap().len(), 1, "{info}");
    let child = VmdkImage::open(&child_path, OpenMode::ReadOnly).unwrap();
    child.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0u8; 4096]);
}
