//! Buffered writes through ext4 (page cache, journal, writeback) on a loop
//! device: every 4 KiB block that changed on the device, comparing images taken
//! before and after, is reported, and every changed sector inside it is covered.

use std::io::Write;

use blockferry_agent::tracker::{Notice, Tracker};
use blockferry_testkit::devices::{BLOCK, LoopDev, Mounted};
use blockferry_testkit::privileged::{require_root, run};

#[test]
#[ignore = "needs root: loop devices, mkfs and mount, eBPF"]
fn tracker_covers_every_block_ext4_changed() {
    require_root("tracker_covers_every_block_ext4_changed");
    let disk = LoopDev::new(64 << 20, false);
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            disk.path_str(),
        ],
    );
    let before = disk.read_all();

    let mut t = Tracker::load().expect("load tracker");
    let id = t.protect(&disk.path).expect("protect");
    let mnt = tempfile::tempdir().expect("mount point");
    let mount = Mounted::new(&["-t", "ext4", disk.path_str()], mnt.path());

    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..40u64 {
        let dir = mnt.path().join(format!("d{}", i % 5));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let len = (rand() % (300 << 10)) as usize + 1;
        let data: Vec<u8> = (0..len).map(|_| rand() as u8).collect();
        let mut f = std::fs::File::create(dir.join(format!("f{i}"))).expect("create");
        f.write_all(&data).expect("write");
    }
    // Overwrite parts of some files in place and delete others.
    for i in (0..40u64).step_by(3) {
        let p = mnt.path().join(format!("d{}", i % 5)).join(format!("f{i}"));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .expect("open");
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xa5; 5000], 100).expect("overwrite");
    }
    for i in (1..40u64).step_by(7) {
        std::fs::remove_file(mnt.path().join(format!("d{}", i % 5)).join(format!("f{i}")))
            .expect("rm");
    }
    run("sync", &[]);
    drop(mount); // umount writes the superblock: tracked too
    let mut notices = t.poll_now().expect("poll");
    notices.retain(|n| matches!(n, Notice::Resync { .. }));
    assert!(notices.is_empty(), "events were dropped: {notices:?}");

    let after = disk.read_all();
    let dirty = t.dirty(id).expect("dirty").clone();
    let mut changed = 0;
    let mut missed = Vec::new();
    for b in 0..after.len() / BLOCK {
        let r = b * BLOCK..(b + 1) * BLOCK;
        if before[r.clone()] == after[r.clone()] {
            continue;
        }
        changed += 1;
        // Within a changed block, every changed sector must be dirty (ext4 may
        // write only part of a block, e.g. the 1 KiB superblock).
        let covered = (r.start..r.end).step_by(512).all(|s| {
            before[s..s + 512] == after[s..s + 512] || dirty.contains(s as u64..s as u64 + 512)
        });
        if !covered {
            missed.push(b);
        }
    }
    assert!(changed > 100, "the workload changed only {changed} blocks");
    assert!(
        missed.is_empty(),
        "{} of {changed} changed blocks unreported, first {:?}",
        missed.len(),
        &missed[..missed.len().min(8)]
    );
    eprintln!(
        "{changed} changed blocks, all reported ({} bytes dirty)",
        dirty.total_bytes()
    );
}
