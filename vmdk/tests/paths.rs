//! Paths a descriptor names (extent files, `parentFileNameHint`) are confined
//! to the descriptor's directory unless the caller allows otherwise; what
//! this crate writes itself opens with the default.

use std::path::Path;

use blockferry_vmdk::check::{Problem, check, check_with};
use blockferry_vmdk::export::{ExportOptions, export_delta, export_sparse};
use blockferry_vmdk::{
    CreateOptions, DiskKind, DiskRead, OpenMode, OpenOptions, ParentLink, RawDisk, VmdkError,
    VmdkImage,
};

const SIZE: u64 = 1 << 20;

fn allowed() -> OpenOptions {
    OpenOptions::new(OpenMode::ReadOnly).allow_external_paths(true)
}

fn read_all(d: &dyn DiskRead) -> Vec<u8> {
    let mut b = vec![0u8; d.size() as usize];
    d.read_at(&mut b, 0).unwrap();
    b
}

/// A vmfs disk in `dir` whose flat extent holds 0x5a, then its descriptor
/// rewritten to name the flat extent as `named`.
fn vmfs_naming(dir: &Path, named: &str) -> std::path::PathBuf {
    let desc = dir.join("disk.vmdk");
    let mut img = VmdkImage::create(&desc, &CreateOptions::new(SIZE, DiskKind::Vmfs)).unwrap();
    img.write_at(&[0x5a; 4096], 0).unwrap();
    drop(img);
    let text = std::fs::read_to_string(&desc).unwrap();
    assert!(text.contains("\"disk-flat.vmdk\""), "{text}");
    std::fs::write(
        &desc,
        text.replace("\"disk-flat.vmdk\"", &format!("\"{named}\"")),
    )
    .unwrap();
    desc
}

fn assert_refused(r: Result<VmdkImage, VmdkError>, what: &str, named: &str) {
    match r {
        Err(VmdkError::PathOutsideDirectory {
            what: w, named: n, ..
        }) => assert_eq!((w, n.as_str()), (what, named)),
        other => panic!("expected {what} path {named} to be refused, got {other:?}"),
    }
}

#[test]
fn an_absolute_extent_path_is_refused_by_default_and_opens_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let abs = dir.path().join("disk-flat.vmdk");
    let abs = abs.to_str().unwrap();
    let desc = vmfs_naming(dir.path(), abs);
    assert_refused(VmdkImage::open(&desc, OpenMode::ReadOnly), "extent", abs);
    let img = VmdkImage::open_with(&desc, allowed()).unwrap();
    assert_eq!(&read_all(&img)[..4096], &[0x5a; 4096]);
}

#[test]
fn an_extent_path_climbing_out_is_refused_by_default_and_opens_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let inner = dir.path().join("inner");
    std::fs::create_dir(&inner).unwrap();
    let desc = vmfs_naming(dir.path(), "disk-flat.vmdk");
    // The descriptor moves one level down and names its extent with `..`.
    let moved = inner.join("disk.vmdk");
    let text = std::fs::read_to_string(&desc).unwrap();
    std::fs::write(
        &moved,
        text.replace("\"disk-flat.vmdk\"", "\"../disk-flat.vmdk\""),
    )
    .unwrap();
    assert_refused(
        VmdkImage::open(&moved, OpenMode::ReadWrite),
        "extent",
        "../disk-flat.vmdk",
    );
    let img = VmdkImage::open_with(&moved, allowed()).unwrap();
    assert_eq!(&read_all(&img)[..4096], &[0x5a; 4096]);
    // The checker reports the path instead of following it.
    let report = check(&moved).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| matches!(p, Problem::BadExtent { error, .. } if error.contains("leaves the descriptor's directory"))),
        "{:?}",
        report.problems
    );
    assert!(check_with(&moved, true).unwrap().is_clean());
}

#[test]
fn a_dotdot_that_stays_inside_the_directory_opens_by_default() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let desc = vmfs_naming(dir.path(), "sub/../disk-flat.vmdk");
    let img = VmdkImage::open(&desc, OpenMode::ReadOnly).unwrap();
    assert_eq!(&read_all(&img)[..4096], &[0x5a; 4096]);
}

#[test]
fn a_parent_outside_the_directory_is_refused_by_default_and_opens_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    let base_path = a.join("base.vmdk");
    let mut base = VmdkImage::create(
        &base_path,
        &CreateOptions::new(SIZE, DiskKind::MonolithicSparse),
    )
    .unwrap();
    base.write_at(&[0x11; 4096], 0).unwrap();
    let cid = base.cid();
    drop(base);
    for (i, hint) in [
        "../a/base.vmdk".to_owned(),
        base_path.to_str().unwrap().to_owned(),
    ]
    .into_iter()
    .enumerate()
    {
        let delta_path = b.join(format!("delta{i}.vmdk"));
        let mut opts = CreateOptions::new(SIZE, DiskKind::MonolithicSparse);
        opts.parent = Some(ParentLink {
            cid,
            file_name_hint: hint.clone(),
        });
        // The creator named the parent itself: create follows it.
        let delta = VmdkImage::create(&delta_path, &opts).unwrap();
        assert_eq!(&read_all(&delta)[..4096], &[0x11; 4096]);
        drop(delta);
        assert_refused(
            VmdkImage::open(&delta_path, OpenMode::ReadOnly),
            "parentFileNameHint",
            &hint,
        );
        let delta = VmdkImage::open_with(&delta_path, allowed()).unwrap();
        assert_eq!(&read_all(&delta)[..4096], &[0x11; 4096], "{hint}");
        assert!(
            check(&delta_path)
                .unwrap()
                .problems
                .iter()
                .any(|p| matches!(p, Problem::BadParent { .. })),
            "{hint}"
        );
        assert!(check_with(&delta_path, true).unwrap().is_clean(), "{hint}");
    }
}

#[test]
fn what_this_crate_writes_opens_with_the_default() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, name) in [
        (DiskKind::Vmfs, "vmfs.vmdk"),
        (DiskKind::MonolithicFlat, "flat.vmdk"),
        (DiskKind::MonolithicSparse, "sparse.vmdk"),
    ] {
        let path = dir.path().join(name);
        let mut img = VmdkImage::create(&path, &CreateOptions::new(SIZE, kind)).unwrap();
        img.write_at(&[7; 512], 512).unwrap();
        drop(img);
        VmdkImage::open(&path, OpenMode::ReadWrite).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(check(&path).unwrap().is_clean(), "{name}");
    }
    // A chain of exports in one directory: each delta names its parent by
    // file name alone.
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, vec![3u8; SIZE as usize]).unwrap();
    let src = RawDisk::open(&raw).unwrap();
    let base = dir.path().join("e-base.vmdk");
    let opts = ExportOptions::default();
    export_sparse(&src, None, &base, &opts, &mut |_| {}).unwrap();
    let d1 = dir.path().join("e-d1.vmdk");
    export_delta(
        &src,
        &[0..4096, 16384..20000],
        &base,
        &d1,
        &opts,
        &mut |_| {},
    )
    .unwrap();
    let d2 = dir.path().join("e-d2.vmdk");
    export_delta(
        &src,
        &[8192..9000, 30000..31000],
        &d1,
        &d2,
        &opts,
        &mut |_| {},
    )
    .unwrap();
    let img = VmdkImage::open(&d2, OpenMode::ReadOnly).unwrap();
    assert_eq!(read_all(&img), vec![3u8; SIZE as usize]);
    assert!(check(&d2).unwrap().is_clean());
}

#[test]
fn a_delta_exported_into_another_directory_opens_only_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, vec![9u8; SIZE as usize]).unwrap();
    let src = RawDisk::open(&raw).unwrap();
    let base = dir.path().join("base.vmdk");
    let opts = ExportOptions::default();
    export_sparse(&src, None, &base, &opts, &mut |_| {}).unwrap();
    let delta = out.join("delta.vmdk");
    export_delta(
        &src,
        &[0..4096, 16384..20000],
        &base,
        &delta,
        &opts,
        &mut |_| {},
    )
    .unwrap();
    // The parent is named by absolute path, so qemu-img finds it from anywhere.
    assert!(matches!(
        VmdkImage::open(&delta, OpenMode::ReadOnly),
        Err(VmdkError::PathOutsideDirectory { .. })
    ));
    let img = VmdkImage::open_with(&delta, allowed()).unwrap();
    assert_eq!(read_all(&img), vec![9u8; SIZE as usize]);
}
