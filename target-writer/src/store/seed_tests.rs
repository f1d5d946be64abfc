//! Seed replicas: an existing VMDK or block device taken as the replica,
//! written by the stream after the record's point, reopened from its path.

use super::*;
use blockferry_proto::{
    Barrier, CopyRole, Generation, GenerationEntry, GenerationId, GenerationRecord, Seq,
};

use crate::batch::{ApplyBatch, raw_chunk};
use crate::vmdk::{CreateOptions, DiskKind, VmdkImage, WriteOp};

const SIZE: u64 = 4 << 20;

/// The seed's record as reprotect makes it: the source's generation 3 through
/// sequence 10, content unproven.
fn seed_record() -> blockferry_proto::GenerationRecord {
    GenerationRecord::new(
        generation::disk_id_of("d"),
        CopyRole::Seed,
        GenerationEntry {
            id: GenerationId::from_bytes([3; 16]),
            number: Generation(3),
            seq: Seq(10),
        },
    )
}

fn batch(seq: u64, offset: u64, byte: u8) -> ApplyBatch {
    ApplyBatch {
        disk: "d".into(),
        generation: 3,
        seq,
        chunks: vec![raw_chunk(offset, vec![byte; 8192])],
    }
}

fn barrier(seq: u64) -> Barrier {
    Barrier {
        disk: blockferry_proto::DiskId::default(),
        generation: Generation(3),
        seq: Seq(seq),
        consistency: Consistency::CrashConsistent,
        timestamp_ns: 0,
    }
}

/// What the seed held before reprotect: a pattern over the whole disk.
fn old_content() -> Vec<u8> {
    blockferry_testkit::data::mixed_data(SIZE as usize, 7)
}

fn vmdk_seed(dir: &Path, kind: DiskKind) -> PathBuf {
    let path = dir.join("seed.vmdk");
    let mut img = VmdkImage::create(&path, &CreateOptions::new(SIZE, kind)).unwrap();
    img.apply(&[WriteOp::Data {
        offset: 0,
        data: &old_content(),
    }])
    .unwrap();
    path
}

/// Every file of the VMDK at `path`, read whole.
fn files_of(path: &Path) -> Vec<Vec<u8>> {
    let img = VmdkImage::open(path, crate::vmdk::OpenMode::ReadOnly).unwrap();
    img.files()
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect()
}

/// Creates a seed store over `seed`, checks that creation wrote nothing to
/// it, applies two batches and a barrier after the record's point, reopens
/// the store and returns the model of what the disk must now hold.
fn create_apply_reopen(
    root: &Path,
    seed: &ExternalReplica,
    before: impl Fn() -> Vec<Vec<u8>>,
) -> Vec<u8> {
    let was = before();
    let mut s =
        DiskStore::create_seed(root, "d", seed, seed_record(), 1, StoreOptions::default()).unwrap();
    assert_eq!(
        before(),
        was,
        "creating the store wrote nothing to the seed"
    );
    assert_eq!((s.generation(), s.applied_seq(), s.size()), (3, 10, SIZE));
    assert!(!s.is_complete(), "its first sync is a checksum resync");
    assert_eq!(s.seed(), Some(seed));
    // The source's next frame continues after the record's sequence.
    assert!(matches!(
        s.apply(&batch(12, 0, 1)),
        Err(TargetError::Gap { expected: 11, .. })
    ));
    s.apply_many(&[batch(11, 65536, 0xa1), batch(12, SIZE - 8192, 0xb2)])
        .unwrap();
    s.barrier(&barrier(13), 5).unwrap().unwrap();
    assert!(s.is_complete());
    assert_eq!(
        s.generation_record().role(),
        CopyRole::Replica,
        "a barrier ends the seed's resync"
    );
    s.close().unwrap();
    let s = DiskStore::open(root, "d", StoreOptions::default()).unwrap();
    assert_eq!(s.seed(), Some(seed), "reopened from its path");
    assert_eq!((s.generation(), s.applied_seq()), (3, 13));
    assert_eq!(s.generation_record().role(), CopyRole::Replica);
    let mut model = old_content();
    model[65536..65536 + 8192].fill(0xa1);
    model[(SIZE - 8192) as usize..].fill(0xb2);
    let mut got = vec![0u8; SIZE as usize];
    s.read_at(&mut got, 0).unwrap();
    assert!(
        got == model,
        "first difference at {:?}",
        blockferry_testkit::data::first_diff(&got, &model)
    );
    s.close().unwrap();
    model
}

#[test]
fn a_vmdk_seed_takes_the_stream_after_its_records_point_and_reopens_from_its_path() {
    for kind in [
        DiskKind::Vmfs,
        DiskKind::MonolithicFlat,
        DiskKind::MonolithicSparse,
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (root, seeds) = (tmp.path().join("store"), tmp.path().join("seeds"));
        std::fs::create_dir_all(&seeds).unwrap();
        let path = vmdk_seed(&seeds, kind);
        let seed = ExternalReplica::at(&path).unwrap();
        assert_eq!(seed.kind, SeedKind::Vmdk);
        let model = create_apply_reopen(&root, &seed, || files_of(&path));
        assert!(
            crate::vmdk::check::check(&path).unwrap().is_clean(),
            "{kind:?}"
        );
        if blockferry_testkit::qemu::have_qemu_img() {
            let raw = tmp.path().join("model.raw");
            std::fs::write(&raw, &model).unwrap();
            assert!(blockferry_testkit::qemu::qemu_same(&raw, &path), "{kind:?}");
        }
    }
}

#[test]
fn a_seed_refuses_to_grow_and_stays_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let path = vmdk_seed(tmp.path(), DiskKind::Vmfs);
    let seed = ExternalReplica::at(&path).unwrap();
    let root = tmp.path().join("store");
    let mut s =
        DiskStore::create_seed(&root, "d", &seed, seed_record(), 1, StoreOptions::default())
            .unwrap();
    let e = s.grow(SIZE * 2).unwrap_err();
    assert!(matches!(e, TargetError::SeedCannotGrow { .. }), "{e}");
    assert!(e.to_string().contains("grow the seed"), "{e}");
    s.apply(&batch(11, 0, 9)).unwrap();
    assert_eq!(s.size(), SIZE);
}

#[test]
fn a_relative_seed_path_and_a_record_of_another_disk_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = vmdk_seed(tmp.path(), DiskKind::Vmfs);
    assert!(matches!(
        ExternalReplica::at(Path::new("seed.vmdk")),
        Err(TargetError::NotASeed { .. })
    ));
    let seed = ExternalReplica::at(&path).unwrap();
    let root = tmp.path().join("store");
    let e = DiskStore::create_seed(
        &root,
        "other",
        &seed,
        seed_record(),
        1,
        StoreOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, TargetError::Generation { .. }), "{e}");
    assert!(!root.join("other").exists(), "nothing was made");
}

#[test]
#[ignore = "needs root: loop device"]
fn a_device_seed_is_held_exclusively_and_takes_the_stream() {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    blockferry_testkit::privileged::require_root(
        "a_device_seed_is_held_exclusively_and_takes_the_stream",
    );
    let dev = blockferry_testkit::devices::LoopDev::new(SIZE, false);
    let f = OpenOptions::new().write(true).open(&dev.path).unwrap();
    f.write_all_at(&old_content(), 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let tmp = tempfile::tempdir().unwrap();
    let seed = ExternalReplica::at(&dev.path).unwrap();
    assert_eq!(seed.kind, SeedKind::Device);
    let excl = || {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&dev.path)
    };
    {
        let _s = DiskStore::create_seed(
            tmp.path(),
            "d",
            &seed,
            seed_record(),
            1,
            StoreOptions::default(),
        )
        .unwrap();
        let e = excl().unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EBUSY),
            "held while the store is open"
        );
        // And a second store over the same device is refused as busy.
        let e = DiskStore::create_seed(
            &tmp.path().join("again"),
            "d",
            &seed,
            seed_record(),
            1,
            StoreOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(e, TargetError::SeedBusy { .. }), "{e}");
    }
    std::fs::remove_dir_all(tmp.path().join("d")).unwrap();
    let model = create_apply_reopen(tmp.path(), &seed, || vec![dev.read_all()]);
    assert!(excl().is_ok(), "released once the store is closed");
    assert!(
        dev.read_all() == model,
        "the device holds the stream's writes"
    );
    // A promoted seed belongs to the workload: opening its store holds it no more.
    let mut s = DiskStore::open(tmp.path(), "d", StoreOptions::default()).unwrap();
    s.promote(GenerationId::from_bytes([8; 16])).unwrap();
    s.close().unwrap();
    let mut s = DiskStore::open(tmp.path(), "d", StoreOptions::default()).unwrap();
    assert!(s.is_promoted());
    assert!(excl().is_ok(), "a promoted seed is opened shared");
    assert!(s.grow(SIZE * 2).is_err());
}

#[test]
#[ignore = "needs root: loop device"]
fn a_vmdk_seed_attached_as_a_loop_device_is_refused_until_detached() {
    blockferry_testkit::privileged::require_root(
        "a_vmdk_seed_attached_as_a_loop_device_is_refused_until_detached",
    );
    let tmp = tempfile::tempdir().unwrap();
    let path = vmdk_seed(tmp.path(), DiskKind::Vmfs);
    let flat = tmp.path().join("seed-flat.vmdk");
    let seed = ExternalReplica::at(&path).unwrap();
    let root = tmp.path().join("store");
    {
        let dev = blockferry_testkit::devices::LoopDev::attach(&flat, false);
        let e =
            DiskStore::create_seed(&root, "d", &seed, seed_record(), 1, StoreOptions::default())
                .unwrap_err();
        assert!(
            matches!(&e, TargetError::SeedAttached { device, .. } if *device == dev.path),
            "{e}"
        );
        assert!(e.to_string().contains("losetup -d"), "{e}");
        assert!(!root.join("d").exists(), "nothing was made");
    }
    DiskStore::create_seed(&root, "d", &seed, seed_record(), 1, StoreOptions::default()).unwrap();
}
