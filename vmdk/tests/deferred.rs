//! The deferred-tables API as a journaled writer uses it: what a reader of
//! the same image sees before the checkpoint, what the file holds if the
//! process stops before it, and after it.

mod support;

use blockferry_vmdk::check::check;
use blockferry_vmdk::{CreateOptions, DiskKind, DiskRead, OpenMode, VmdkImage, WriteOp};
use support::{gt_sectors, poke_u32};

const SIZE: u64 = 4 << 20;
const GRAIN: u64 = 64 << 10;

fn read(img: &VmdkImage, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    img.read_at(&mut b, offset).unwrap();
    b
}

#[test]
fn deferred_writes_are_read_back_at_once_and_reach_the_file_only_at_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("thin.vmdk");
    let mut img =
        VmdkImage::create(&path, &CreateOptions::new(SIZE, DiskKind::MonolithicSparse)).unwrap();
    img.apply_deferred(&[WriteOp::Data {
        offset: GRAIN,
        data: &[0x42; 4096],
    }])
    .unwrap();
    assert_eq!(read(&img, GRAIN, 4096), [0x42; 4096], "same image reads it");
    assert!(!img.reads_unallocated(GRAIN, 4096));

    // A stop before the checkpoint: the tables on disk do not point at the
    // new grain, so the disk reads as before and is structurally sound.
    let before = VmdkImage::open(&path, OpenMode::ReadOnly).unwrap();
    assert_eq!(read(&before, GRAIN, 4096), [0u8; 4096]);
    assert!(before.allocated_ranges().unwrap().is_empty());
    drop(before);
    assert!(check(&path).unwrap().is_clean());

    // The checkpoint: barrier, tables, sync.
    img.sparse_file().unwrap().sync_data().unwrap();
    assert!(img.write_deferred_tables().unwrap());
    img.sparse_file().unwrap().sync_data().unwrap();
    assert!(
        !img.write_deferred_tables().unwrap(),
        "nothing left to write"
    );
    drop(img);
    let after = VmdkImage::open(&path, OpenMode::ReadOnly).unwrap();
    assert_eq!(read(&after, GRAIN, 4096), [0x42; 4096]);
    assert_eq!(after.allocated_ranges().unwrap(), vec![GRAIN..2 * GRAIN]);
    assert!(check(&path).unwrap().is_clean());
}

#[test]
fn deferred_zeros_where_nothing_was_written_allocate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("thin.vmdk");
    let mut img =
        VmdkImage::create(&path, &CreateOptions::new(SIZE, DiskKind::MonolithicSparse)).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    img.apply_deferred(&[WriteOp::Zero {
        offset: 0,
        len: SIZE,
    }])
    .unwrap();
    assert!(!img.write_deferred_tables().unwrap());
    assert!(img.reads_unallocated(0, SIZE));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
}

#[test]
fn repair_makes_a_redundant_table_that_differs_equal_to_the_primary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("thin.vmdk");
    let mut img =
        VmdkImage::create(&path, &CreateOptions::new(SIZE, DiskKind::MonolithicSparse)).unwrap();
    img.write_at(&[7; 4096], 0).unwrap();
    drop(img);
    // Clear the redundant table's first entry, as a crash between the two
    // table copies of a checkpoint can leave it.
    let (_, gt, rgt) = gt_sectors(&path);
    assert_ne!(gt, rgt);
    poke_u32(&path, rgt * 512, 0);
    assert!(!check(&path).unwrap().is_clean());
    let mut img = VmdkImage::open(&path, OpenMode::ReadWrite).unwrap();
    assert_eq!(img.repair_redundant_tables().unwrap(), 1);
    assert_eq!(img.repair_redundant_tables().unwrap(), 0);
    drop(img);
    assert!(check(&path).unwrap().is_clean());
}
