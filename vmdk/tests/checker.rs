//! The structural checker against injected damage, and the refusals of
//! accesses out of range or to read-only images.

mod support;

use blockferry_vmdk::check::{Problem, check};
use blockferry_vmdk::{CreateOptions, DiskKind, DiskRead, OpenMode, VmdkError, VmdkImage};
use support::{gt_sectors, peek_u32, poke_u32};

const GRAIN: u64 = 64 << 10;

#[test]
fn checker_finds_injected_corruptions() {
    let dir = tempfile::tempdir().unwrap();
    let make = |name: &str| {
        let path = dir.path().join(name);
        let mut img = VmdkImage::create(
            &path,
            &CreateOptions::new(4 << 20, DiskKind::MonolithicSparse),
        )
        .unwrap();
        for g in 0..4u64 {
            img.write_at(&[g as u8 + 1; 512], g * GRAIN).unwrap();
        }
        drop(img);
        assert!(check(&path).unwrap().is_clean());
        path
    };

    // Primary and redundant tables differ.
    let p = make("differ.vmdk");
    let (_, _, rgt) = gt_sectors(&p);
    poke_u32(&p, rgt * 512 + 4, 0);
    let r = check(&p).unwrap();
    assert!(
        r.problems.iter().any(|x| matches!(
            x,
            Problem::TablesDiffer {
                grain: 1,
                redundant: 0,
                ..
            }
        )),
        "{:?}",
        r.problems
    );

    // Grain 2 points into grain 1 (both tables, so only the overlap is wrong).
    let p = make("overlap.vmdk");
    let (_, gt, rgt) = gt_sectors(&p);
    let g1 = peek_u32(&p, gt * 512 + 4);
    poke_u32(&p, gt * 512 + 8, g1 + 8);
    poke_u32(&p, rgt * 512 + 8, g1 + 8);
    let r = check(&p).unwrap();
    assert_eq!(r.problem_count, 1, "{:?}", r.problems);
    assert!(
        matches!(r.problems[0], Problem::GrainOverlap { .. }),
        "{:?}",
        r.problems
    );

    // Grain 3 points at the grain directory.
    let p = make("meta.vmdk");
    let (h, gt, rgt) = gt_sectors(&p);
    poke_u32(&p, gt * 512 + 12, h.gd_offset as u32);
    poke_u32(&p, rgt * 512 + 12, h.gd_offset as u32);
    let r = check(&p).unwrap();
    assert!(
        r.problems
            .iter()
            .any(|x| matches!(x, Problem::GrainOverlapsMetadata { grain: 3, .. })),
        "{:?}",
        r.problems
    );

    // Grain 0 points past the end of the file.
    let p = make("eof.vmdk");
    let (_, gt, rgt) = gt_sectors(&p);
    poke_u32(&p, gt * 512, 1 << 30);
    poke_u32(&p, rgt * 512, 1 << 30);
    let r = check(&p).unwrap();
    assert!(
        r.problems
            .iter()
            .any(|x| matches!(x, Problem::GrainPastEof { grain: 0, .. })),
        "{:?}",
        r.problems
    );

    // A flat extent of the wrong size.
    let flat = dir.path().join("flat.vmdk");
    drop(VmdkImage::create(&flat, &CreateOptions::new(1 << 20, DiskKind::Vmfs)).unwrap());
    assert!(check(&flat).unwrap().is_clean());
    let extent = dir.path().join("flat-flat.vmdk");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&extent)
        .unwrap()
        .set_len(1000)
        .unwrap();
    let r = check(&flat).unwrap();
    assert_eq!(
        r.problems,
        vec![Problem::FlatSizeMismatch {
            file: extent.clone(),
            expected: 1 << 20,
            actual: 1000
        }]
    );
    // And open names the file and what is wrong.
    let e = VmdkImage::open(&flat, OpenMode::ReadOnly).unwrap_err();
    assert!(e.to_string().contains("flat-flat.vmdk"), "{e}");
}

#[test]
fn out_of_range_and_read_only_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.vmdk");
    let mut img = VmdkImage::create(
        &path,
        &CreateOptions::new(1 << 20, DiskKind::MonolithicSparse),
    )
    .unwrap();
    assert!(matches!(
        img.write_at(&[1; 1024], (1 << 20) - 512),
        Err(VmdkError::OutOfRange { .. })
    ));
    let mut b = [0u8; 2];
    assert!(matches!(
        img.read_at(&mut b, (1 << 20) - 1),
        Err(VmdkError::OutOfRange { .. })
    ));
    drop(img);
    let mut ro = VmdkImage::open(&path, OpenMode::ReadOnly).unwrap();
    assert!(matches!(
        ro.write_at(&[1; 512], 0),
        Err(VmdkError::ReadOnly { .. })
    ));
    // Nothing was written by the refused writes.
    assert!(ro.allocated_ranges().unwrap().is_empty());
}
