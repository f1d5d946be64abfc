//! "No lost write" (DESIGN invariant 1) on the real kernel: writers overwrite
//! random blocks as fast as they can while a drain loop copies every reported
//! range into a shadow copy; after the writers stop and a last drain, the
//! shadow must equal the device byte for byte. A range read while a write to it
//! was in flight must come back through the completion event, or the shadow
//! keeps stale data. (A tracker that ignores completions fails this test with
//! tens to hundreds of differing blocks per run.)

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use blockferry_agent::tracker::{DeviceId, Tracker};
use blockferry_testkit::devices::{BLOCK, Block, LoopDev, open_direct};
use blockferry_testkit::privileged::require_root;

const BLOCKS: u64 = 2048; // 8 MiB: small, so writes collide with reads often
const WRITERS: u64 = 3;
const WRITES_PER_WRITER: u64 = 12_000;

/// xorshift: deterministic per writer, no shared state.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn copy_ranges(dev: &std::fs::File, ranges: &[Range<u64>], shadow: &mut [u8], buf: &mut Block) {
    for r in ranges {
        // Writers write whole aligned blocks, so reported ranges are block-aligned.
        assert_eq!(
            (r.start % BLOCK as u64, r.end % BLOCK as u64),
            (0, 0),
            "unaligned range {r:?}"
        );
        for off in (r.start..r.end).step_by(BLOCK) {
            dev.read_exact_at(&mut buf.0, off).expect("read device");
            shadow[off as usize..off as usize + BLOCK].copy_from_slice(&buf.0);
        }
    }
}

fn no_lost_write(direct_io: bool) {
    let disk = LoopDev::new(BLOCKS * BLOCK as u64, direct_io);
    let mut tracker = Tracker::load().expect("load tracker");
    let id: DeviceId = tracker.protect(&disk.path).expect("protect");
    let mut shadow = vec![0u8; (BLOCKS as usize) * BLOCK]; // the device starts zeroed

    let written = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let path = disk.path.clone();
            let written = Arc::clone(&written);
            std::thread::spawn(move || {
                let dev = open_direct(&path, true);
                let mut block = Box::new(Block([0; BLOCK]));
                let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (w + 1);
                for i in 0..WRITES_PER_WRITER {
                    let b = next(&mut seed) % BLOCKS;
                    // Content unique per (writer, write): a stale copy cannot match.
                    let stamp = (w << 48) | (i << 16) | 1;
                    for (k, word) in block.0.chunks_mut(8).enumerate() {
                        word.copy_from_slice(&(stamp ^ k as u64).to_le_bytes());
                    }
                    dev.write_all_at(&block.0, b * BLOCK as u64).expect("write");
                    written.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    // The drain reads the backing file, not the loop device: the loop driver
    // runs a device's commands in order, so a read queued behind a write never
    // overtakes it and the race would never happen. The file holds the same
    // bytes, and reading it directly overlaps writes still queued in the loop
    // driver: exactly a read of a range whose write is in flight.
    let reader = if direct_io {
        open_direct(disk.backing(), false)
    } else {
        std::fs::File::open(disk.backing()).expect("open backing file")
    };
    let mut buf = Box::new(Block([0; BLOCK]));
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    let joiner = std::thread::spawn(move || {
        for w in writers {
            w.join().expect("writer panicked");
        }
        let _ = done_tx.send(true);
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut passes = 0u64;
    rt.block_on(async {
        loop {
            tokio::select! {
                r = tracker.next() => { r.expect("tracker"); }
                _ = done_rx.changed() => break,
            }
            let ranges = tracker.take_dirty(id, 1 << 20);
            copy_ranges(&reader, &ranges, &mut shadow, &mut buf);
            passes += 1;
        }
    });
    joiner.join().expect("joiner");
    // Every write has completed: its events are in the ring buffer. Drain to the end.
    loop {
        tracker.poll_now().expect("poll");
        let ranges = tracker.take_dirty(id, u64::MAX);
        if ranges.is_empty() {
            break;
        }
        copy_ranges(&reader, &ranges, &mut shadow, &mut buf);
    }
    assert!(
        !tracker.needs_resync(id),
        "events were dropped: the test proves nothing"
    );
    assert_eq!(written.load(Ordering::Relaxed), WRITERS * WRITES_PER_WRITER);

    let device = disk.read_all();
    let differing: Vec<usize> = (0..BLOCKS as usize)
        .filter(|&b| device[b * BLOCK..(b + 1) * BLOCK] != shadow[b * BLOCK..(b + 1) * BLOCK])
        .collect();
    assert!(
        differing.is_empty(),
        "lost writes: {} blocks differ, first {:?}",
        differing.len(),
        &differing[..differing.len().min(8)]
    );
    eprintln!(
        "{} writes, {passes} drain passes, shadow equals device",
        WRITERS * WRITES_PER_WRITER
    );
}

#[test]
#[ignore = "needs root: loop devices and eBPF"]
fn tracker_loses_no_write_direct_io_loop() {
    require_root("tracker_loses_no_write_direct_io_loop");
    no_lost_write(true);
}

#[test]
#[ignore = "needs root: loop devices and eBPF"]
fn tracker_loses_no_write_buffered_loop() {
    require_root("tracker_loses_no_write_buffered_loop");
    no_lost_write(false);
}
