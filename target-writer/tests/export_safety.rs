//! An export never writes into the store it reads (the replica, the journal,
//! anything in the store's directory), and an existing output is replaced
//! only once the export succeeded.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use blockferry_target::export::{ExportFormat, export_point, export_point_live};
use blockferry_target::{ApplyBatch, Consistency, DiskStore, StoreOptions, TargetError};
use common::*;

const SIZE: u64 = 4 << 20;

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn store_with_a_point(root: &Path) -> (DiskStore, u64) {
    let mut s = DiskStore::create(root, DISK, SIZE, now_ms(), StoreOptions::default()).unwrap();
    let data = vec![0x5au8; 65536];
    let b = ApplyBatch {
        disk: DISK.into(),
        generation: 1,
        seq: 1,
        chunks: vec![blockferry_target::batch::raw_chunk(0, data)],
    };
    s.apply_many(&[b]).unwrap();
    let p = s
        .create_point(Consistency::NotConsistent, now_ms())
        .unwrap();
    (s, p.id)
}

#[test]
fn an_export_into_the_store_is_refused_and_the_store_stays_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let (mut s, point) = store_with_a_point(&root);
    s.checkpoint().unwrap();
    let before = snapshot(&root);
    let disk_dir = s.dir().to_path_buf();
    let targets = [
        (s.replica_path().to_path_buf(), ExportFormat::VmdkFlat),
        (s.replica_path().to_path_buf(), ExportFormat::VmdkSparse),
        (disk_dir.join("journal.wal"), ExportFormat::Raw),
        (disk_dir.join("new-file.raw"), ExportFormat::Raw),
        // Through a path that climbs back in.
        (
            disk_dir.join("..").join(DISK).join("state.json"),
            ExportFormat::Raw,
        ),
        (
            root.join("another-disk").join("x.vmdk"),
            ExportFormat::VmdkSparse,
        ),
    ];
    for (out, format) in &targets {
        let e = export_point(&mut s, point, *format, out, None, &mut |_, _| {}).unwrap_err();
        assert!(
            matches!(e, TargetError::ExportIntoStore { .. }),
            "{} ({format:?}): {e}",
            out.display()
        );
        assert!(e.to_string().contains("outside the store"), "{e}");
    }
    // Through a symbolic link from outside.
    let link = tmp.path().join("innocent.raw");
    std::os::unix::fs::symlink(disk_dir.join("journal.wal"), &link).unwrap();
    let e = export_point(
        &mut s,
        point,
        ExportFormat::Raw,
        &link,
        None,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(e, TargetError::ExportIntoStore { .. }), "{e}");
    // The live path (the control socket's) refuses the same.
    let live = Mutex::new(s);
    let stop = AtomicBool::new(false);
    let replica = live.lock().unwrap().replica_path().to_path_buf();
    let e = export_point_live(
        &live,
        point,
        ExportFormat::VmdkFlat,
        &replica,
        None,
        &stop,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(e, TargetError::ExportIntoStore { .. }), "{e}");
    live.into_inner().unwrap().close().unwrap();
    assert_eq!(snapshot(&root), before, "the store changed");
    // Outside the store the same export works.
    let (mut s, _) = (
        DiskStore::open(&root, DISK, StoreOptions::default()).unwrap(),
        (),
    );
    let out = tmp.path().join("out.raw");
    export_point(&mut s, point, ExportFormat::Raw, &out, None, &mut |_, _| {}).unwrap();
    assert_eq!(&std::fs::read(&out).unwrap()[..65536], &[0x5au8; 65536][..]);
}

#[test]
fn an_existing_output_is_replaced_only_once_the_export_succeeded() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, point) = store_with_a_point(&tmp.path().join("store"));
    let live = Mutex::new(s);
    for format in [
        ExportFormat::Raw,
        ExportFormat::VmdkFlat,
        ExportFormat::VmdkSparse,
    ] {
        let out = tmp.path().join(format!("{format:?}.img"));
        let flat = tmp.path().join(format!("{format:?}.img-flat.vmdk"));
        std::fs::write(&out, b"the previous export").unwrap();
        std::fs::write(&flat, b"its extent").unwrap();
        // Stopped at its first read step: the export fails.
        let stop = AtomicBool::new(true);
        let r = export_point_live(&live, point, format, &out, None, &stop, &mut |_, _| {});
        assert!(r.is_err(), "{format:?}: a stopped export succeeded");
        assert_eq!(
            std::fs::read(&out).unwrap(),
            b"the previous export",
            "{format:?}"
        );
        assert_eq!(std::fs::read(&flat).unwrap(), b"its extent", "{format:?}");
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains("partial"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // The same export, not stopped, replaces it.
        let stop = AtomicBool::new(false);
        let files =
            export_point_live(&live, point, format, &out, None, &stop, &mut |_, _| {}).unwrap();
        assert!(files.contains(&out), "{files:?}");
        assert_ne!(std::fs::read(&out).unwrap(), b"the previous export");
    }
}
