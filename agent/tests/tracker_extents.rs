//! Root tests on the real kernel: each write reaches the tracker as exactly the
//! byte range and operation that was issued, and nothing else does.

use std::collections::BTreeMap;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use blockferry_agent::tracker::{ExtentSet, Notice, Op, Tracker};
use blockferry_testkit::devices::{Block, LoopDev, Zram, dd_write, open_direct};
use blockferry_testkit::privileged::{require_root, run};

const MIB: u64 = 1 << 20;

/// The submitted extents of a batch, per op, and whether a flush was seen.
fn collect(notices: &[Notice]) -> (BTreeMap<Op, ExtentSet>, usize) {
    let mut by_op: BTreeMap<Op, ExtentSet> = BTreeMap::new();
    let mut flushes = 0;
    for n in notices {
        match n {
            Notice::Extent {
                offset, len, op, ..
            } => by_op.entry(*op).or_default().insert(*offset..offset + len),
            Notice::Flush { .. } => flushes += 1,
            Notice::Resync { .. } => panic!("unexpected resync: {n:?}"),
        }
    }
    (by_op, flushes)
}

fn only(op: Op, r: Range<u64>) -> BTreeMap<Op, ExtentSet> {
    BTreeMap::from([(op, ExtentSet::from_iter([r]))])
}

#[test]
#[ignore = "needs root: loop devices, partitions, zram and eBPF"]
fn tracker_reports_exact_extents_on_a_loop_device() {
    require_root("tracker_reports_exact_extents_on_a_loop_device");
    let disk = LoopDev::new(16 * MIB, true);
    let other = LoopDev::new(16 * MIB, true);
    let mut t = Tracker::load().expect("load tracker");
    let id = t.protect(&disk.path).expect("protect");
    let dev = disk.path_str();

    let check = |what: &str, expect: BTreeMap<Op, ExtentSet>, t: &mut Tracker| {
        // The command has returned, so its completions are in the ring buffer.
        let notices = t.poll_now().expect("poll");
        let (got, _) = collect(&notices);
        assert_eq!(got, expect, "{what}: reported extents");
        // The dirty set (submission and completion) covers exactly the same bytes.
        let mut want = ExtentSet::new();
        expect.values().for_each(|s| want.extend_from(s));
        assert_eq!(
            t.dirty(id).cloned().unwrap_or_default(),
            want,
            "{what}: dirty set"
        );
        assert_eq!(
            t.in_flight_bytes(id),
            0,
            "{what}: every submission completed"
        );
        t.take_dirty(id, u64::MAX);
    };

    dd_write(dev, 512, (MIB + 512) / 512, 1, &[]);
    check(
        "512 B write",
        only(Op::Write, MIB + 512..MIB + 1024),
        &mut t,
    );

    dd_write(dev, 4096, 2 * MIB / 4096, 1, &[]);
    check(
        "4 KiB write",
        only(Op::Write, 2 * MIB..2 * MIB + 4096),
        &mut t,
    );

    dd_write(dev, 65536, 3 * MIB / 65536, 1, &[]);
    check(
        "64 KiB write",
        only(Op::Write, 3 * MIB..3 * MIB + 65536),
        &mut t,
    );

    // 1536 bytes at 4 MiB + 512: sector-aligned, not block-aligned.
    dd_write(dev, 1536, (4 * MIB + 512) / 1536, 1, &[]);
    check(
        "unaligned 1536 B write",
        only(Op::Write, 4 * MIB + 512..4 * MIB + 2048),
        &mut t,
    );

    run(
        "blkdiscard",
        &["-z", "-o", &(5 * MIB).to_string(), "-l", "131072", dev],
    );
    check(
        "blkdiscard -z",
        only(Op::WriteZeroes, 5 * MIB..5 * MIB + 131072),
        &mut t,
    );

    run(
        "blkdiscard",
        &["-o", &(6 * MIB).to_string(), "-l", "131072", dev],
    );
    check(
        "blkdiscard",
        only(Op::Discard, 6 * MIB..6 * MIB + 131072),
        &mut t,
    );

    run(
        "dd",
        &[
            &format!("if={dev}"),
            "of=/dev/null",
            "bs=65536",
            "count=64",
            "iflag=direct",
            "status=none",
        ],
    );
    run(
        "dd",
        &[
            &format!("if={dev}"),
            "of=/dev/null",
            "bs=4096",
            "count=64",
            "status=none",
        ],
    );
    check("reads", BTreeMap::new(), &mut t);

    dd_write(other.path_str(), 4096, 0, 16, &[]);
    run("blkdiscard", &["-o", "0", "-l", "65536", other.path_str()]);
    check("writes to another loop device", BTreeMap::new(), &mut t);

    // fsync sends an empty PREFLUSH bio when the device has a volatile cache.
    let write_back = std::fs::read_to_string(disk.sysfs().join("queue/write_cache"))
        .map(|s| s.trim() == "write back")
        .unwrap_or(false);
    let f = open_direct(&disk.path, true);
    let block = Box::new(Block([7; 4096]));
    f.write_all_at(&block.0, 7 * MIB).expect("write");
    f.sync_all().expect("fsync");
    let notices = t.poll_now().expect("poll");
    let (got, flushes) = collect(&notices);
    assert_eq!(got, only(Op::Write, 7 * MIB..7 * MIB + 4096));
    if write_back {
        assert!(
            flushes >= 1,
            "fsync on a write-back device gave no flush: {notices:?}"
        );
        let pos_w = notices
            .iter()
            .position(|n| matches!(n, Notice::Extent { .. }));
        let pos_f = notices
            .iter()
            .position(|n| matches!(n, Notice::Flush { .. }));
        assert!(
            pos_w < pos_f,
            "the write must come before the flush that orders it: {notices:?}"
        );
    }
}

#[test]
#[ignore = "needs root: loop devices, partitions, zram and eBPF"]
fn tracker_reports_partition_ranges_relative_to_the_partition() {
    require_root("tracker_reports_partition_ranges_relative_to_the_partition");
    let disk = LoopDev::new(16 * MIB, true);
    // Partition 1: sectors 2048..10240 (1 MiB..5 MiB of the disk).
    let part = disk.add_partition(1, 2048, 8192);
    let mut t = Tracker::load().expect("load tracker");
    let id = t.protect(&part.path).expect("protect partition");
    let info = t.device(id).expect("device").clone();
    assert!(info.is_partition());
    assert_eq!(info.sector_range(), 2048..10240);

    let reported = |t: &mut Tracker| {
        let (got, _) = collect(&t.poll_now().expect("poll"));
        t.take_dirty(id, u64::MAX);
        got
    };

    // Through the partition node: offset 4 KiB of the partition.
    dd_write(part.path.to_str().expect("path"), 4096, 1, 1, &[]);
    assert_eq!(
        reported(&mut t),
        only(Op::Write, 4096..8192),
        "write through the partition"
    );

    // Through the whole disk, inside the partition: disk byte 1 MiB + 8 KiB.
    dd_write(disk.path_str(), 4096, (MIB + 8192) / 4096, 1, &[]);
    assert_eq!(
        reported(&mut t),
        only(Op::Write, 8192..12288),
        "write through the disk into the partition"
    );

    // One 8 KiB bio straddling the partition's end: only the half inside counts.
    dd_write(
        disk.path_str(),
        8192,
        5 * MIB - 4096,
        1,
        &["oflag=seek_bytes"],
    );
    assert_eq!(
        reported(&mut t),
        only(Op::Write, 4 * MIB - 4096..4 * MIB),
        "write straddling the end"
    );

    // Outside the partition, before and after it: nothing.
    dd_write(disk.path_str(), 4096, 0, 16, &[]);
    dd_write(disk.path_str(), 4096, 6 * MIB / 4096, 16, &[]);
    assert_eq!(
        reported(&mut t),
        BTreeMap::new(),
        "writes outside the partition"
    );
}

#[test]
#[ignore = "needs root: loop devices, partitions, zram and eBPF"]
fn tracker_sees_completions_on_bio_based_zram() {
    require_root("tracker_sees_completions_on_bio_based_zram");
    let Some(z) = Zram::new("16M") else {
        eprintln!("skipping: zram is not available on this kernel (no /sys/class/zram-control)");
        return;
    };
    let mut t = Tracker::load().expect("load tracker");
    let id = t.protect(&z.path).expect("protect zram");
    let dev = z.path.to_str().expect("path");
    dd_write(dev, 4096, 5, 3, &[]);
    let (got, _) = collect(&t.poll_now().expect("poll"));
    assert_eq!(got, only(Op::Write, 5 * 4096..8 * 4096));
    // zram has no requests: the completion comes from tp_btf/block_bio_complete.
    assert_eq!(
        t.in_flight_bytes(id),
        0,
        "bio-based completions were not seen"
    );
}

/// A ring buffer too small for the burst: the kernel counts the lost events,
/// and the tracker turns them into a resync of the whole device, never silence.
#[test]
#[ignore = "needs root: loop devices, partitions, zram and eBPF"]
fn tracker_turns_ring_buffer_overflow_into_resync() {
    require_root("tracker_turns_ring_buffer_overflow_into_resync");
    let disk = LoopDev::new(16 * MIB, true);
    // One page: 128 records of 32 bytes with their headers.
    let mut t = Tracker::load_with_ring_bytes(4096).expect("load tracker");
    let id = t.protect(&disk.path).expect("protect");
    // 400 writes, 800 events, not drained while they happen.
    dd_write(disk.path_str(), 4096, 0, 400, &[]);
    let notices = t.poll_now().expect("poll");
    let resync: Vec<_> = notices
        .iter()
        .filter(|n| matches!(n, Notice::Resync { .. }))
        .collect();
    assert_eq!(resync.len(), 1, "one resync notice: {notices:?}");
    assert!(matches!(resync[0], Notice::Resync { dropped, .. } if *dropped > 0));
    assert!(t.needs_resync(id));
    assert_eq!(
        t.dirty(id).expect("dirty").iter().collect::<Vec<_>>(),
        vec![0..16 * MIB],
        "the whole device must be marked dirty"
    );
}

/// A grown device (loop capacity change): the tracker signals it, marks the
/// added range dirty, and its kernel filter covers the new size.
#[test]
#[ignore = "needs root: loop devices, partitions, zram and eBPF"]
fn tracker_signals_a_grow_and_marks_the_added_range() {
    require_root("tracker_signals_a_grow_and_marks_the_added_range");
    let disk = LoopDev::new(8 * MIB, true);
    let mut t = Tracker::load().expect("load tracker");
    let id = t.protect(&disk.path).expect("protect");
    assert!(
        t.check_geometry().expect("check").is_empty(),
        "no change yet"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(disk.backing())
        .and_then(|f| f.set_len(12 * MIB))
        .expect("grow backing file");
    run("losetup", &["-c", disk.path_str()]);
    let notices = t.check_geometry().expect("check");
    assert!(
        matches!(notices.as_slice(), [Notice::Resync { .. }]),
        "{notices:?}"
    );
    assert_eq!(t.device(id).expect("device").size_bytes(), 12 * MIB);
    assert_eq!(
        t.dirty(id).expect("dirty").iter().collect::<Vec<_>>(),
        vec![8 * MIB..12 * MIB]
    );
    t.take_dirty(id, u64::MAX);
    // The kernel filter follows the new size: a write past the old end is seen.
    dd_write(disk.path_str(), 4096, 10 * MIB / 4096, 1, &[]);
    let (got, _) = collect(&t.poll_now().expect("poll"));
    assert_eq!(got, only(Op::Write, 10 * MIB..10 * MIB + 4096));
}
