//! Exporting a point of a store that keeps being written: batches, new
//! points and retention run between the export's read steps (from its
//! progress callback, which runs between steps with no lock held), and every
//! export still equals the model of the disk at the point.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use blockferry_target::export::{ExportFormat, export_point_live};
use blockferry_target::retention::RetentionPolicy;
use blockferry_target::{ApplyBatch, Chunk, Consistency, DiskStore, StoreOptions, TargetError};
use common::*;
use rand::{Rng, SeedableRng, rngs::StdRng};

const SIZE: u64 = 16 << 20;

/// Keeps only the newest point of points made long before `now`.
fn keep_newest() -> RetentionPolicy {
    RetentionPolicy {
        keep_all_secs: 0,
        tiers: Vec::new(),
    }
}
const LATER: u64 = 4_000_000_000_000;

struct Disk {
    store: Mutex<DiskStore>,
    model: Mutex<Vec<u8>>,
    seq: Mutex<u64>,
    /// Model of every point made, by id.
    points: Mutex<BTreeMap<u64, Vec<u8>>>,
}

impl Disk {
    fn new(root: &Path) -> Disk {
        let opts = StoreOptions {
            // Small, so applies between steps also checkpoint on their own.
            checkpoint_bytes: 1 << 20,
            ..StoreOptions::default()
        };
        Disk {
            store: Mutex::new(DiskStore::create(root, DISK, SIZE, now_ms(), opts).unwrap()),
            model: Mutex::new(vec![0u8; SIZE as usize]),
            seq: Mutex::new(0),
            points: Mutex::new(BTreeMap::new()),
        }
    }

    fn apply(&self, chunks: Vec<Chunk>) {
        let mut seq = self.seq.lock().unwrap();
        *seq += 1;
        let b = ApplyBatch {
            disk: DISK.into(),
            generation: 1,
            seq: *seq,
            chunks,
        };
        self.store.lock().unwrap().apply(&b).unwrap();
        model_apply(&mut self.model.lock().unwrap(), &b);
    }

    fn random(&self, rng: &mut StdRng) {
        let seq = *self.seq.lock().unwrap() + 1;
        self.apply(random_batch(rng, seq, SIZE).chunks);
    }

    /// Overwrites `[off, off + len)` (clipped to the disk) with fresh data.
    fn overwrite(&self, rng: &mut StdRng, off: u64, len: u64) {
        let len = len.min(SIZE - off.min(SIZE));
        if len == 0 {
            return;
        }
        let data: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
        // One batch, in chunks of at most the wire's limit.
        let step = blockferry_proto::frame::MAX_CHUNK_LEN as usize;
        let chunks = data
            .chunks(step)
            .enumerate()
            .map(|(i, d)| blockferry_target::batch::raw_chunk(off + (i * step) as u64, d.to_vec()))
            .collect();
        self.apply(chunks);
    }

    fn point(&self, time_ms: u64) -> u64 {
        let p = self
            .store
            .lock()
            .unwrap()
            .create_point(Consistency::NotConsistent, time_ms)
            .unwrap();
        let model = self.model.lock().unwrap().clone();
        self.points.lock().unwrap().insert(p.id, model);
        p.id
    }

    /// Runs retention keeping only the newest point; returns what it removed.
    fn retention(&self) -> Vec<u64> {
        self.store
            .lock()
            .unwrap()
            .apply_retention(&keep_newest(), LATER)
            .unwrap()
    }
}

fn same(model: &[u8], format: ExportFormat, out: &Path, dir: &Path) -> bool {
    if format == ExportFormat::Raw {
        let got = std::fs::read(out).unwrap();
        return first_diff(&got, model).is_none();
    }
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    qemu_same(&raw, out)
}

#[test]
fn a_point_exported_while_batches_points_and_retention_run_equals_the_model() {
    if !have_qemu_img() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let disk = Disk::new(&tmp.path().join("store"));
    let mut rng = StdRng::seed_from_u64(0xe4907);
    let mut time = 1000;
    for _ in 0..20 {
        disk.random(&mut rng);
    }
    disk.point(time);
    for _ in 0..20 {
        disk.random(&mut rng);
    }
    time += 1000;
    let p = disk.point(time);
    // The open point holds undo too (in its segment and in the journal).
    for _ in 0..20 {
        disk.random(&mut rng);
    }
    let want = disk.points.lock().unwrap()[&p].clone();

    for format in [
        ExportFormat::Raw,
        ExportFormat::VmdkSparse,
        ExportFormat::VmdkFlat,
    ] {
        let out = tmp.path().join(format!("p{p}-{format:?}.img"));
        let out = out.with_extension(if format == ExportFormat::Raw {
            "raw"
        } else {
            "vmdk"
        });
        let (mut steps, mut deferred) = (0, 0);
        let mut progress = |done: u64, _total: u64| {
            steps += 1;
            // The range the next step reads, overwritten before it is read;
            // then a new point, and the same range and another one written
            // after it (undo in two segments, the older one wins).
            disk.overwrite(&mut rng, done, 1 << 20);
            disk.random(&mut rng);
            if steps % 2 == 0 {
                time += 1000;
                disk.point(time);
                disk.overwrite(&mut rng, done, 2 << 20);
                disk.overwrite(&mut rng, (done + (3 << 20)) % SIZE, 512 << 10);
                let dropped = disk.retention();
                assert!(
                    dropped.is_empty(),
                    "retention removed {dropped:?} during an export"
                );
                deferred += 1;
            }
        };
        let stop = AtomicBool::new(false);
        let files =
            export_point_live(&disk.store, p, format, &out, None, &stop, &mut progress).unwrap();
        assert!(steps >= 4, "{format:?}: only {steps} steps");
        assert!(deferred >= 2);
        assert_eq!(files[0], out);
        assert!(
            same(&want, format, &out, tmp.path()),
            "{format:?} export of point {p} differs from the model"
        );
    }
    assert!(disk.points.lock().unwrap().len() >= 6);

    // Once no export runs, retention catches up; what it keeps stays exact.
    let dropped = disk.retention();
    assert!(
        dropped.contains(&p),
        "deferred retention did not run: {dropped:?}"
    );
    let kept: Vec<u64> = disk
        .store
        .lock()
        .unwrap()
        .points()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(kept.len(), 1);
    let out = tmp.path().join("newest.raw");
    let stop = AtomicBool::new(false);
    export_point_live(
        &disk.store,
        kept[0],
        ExportFormat::Raw,
        &out,
        None,
        &stop,
        &mut |_, _| {},
    )
    .unwrap();
    let want = disk.points.lock().unwrap()[&kept[0]].clone();
    assert_eq!(first_diff(&std::fs::read(&out).unwrap(), &want), None);
}

#[test]
fn a_stopped_export_removes_its_output_and_unpins_the_points() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = Disk::new(&tmp.path().join("store"));
    let mut rng = StdRng::seed_from_u64(7);
    disk.random(&mut rng);
    let old = disk.point(1000);
    disk.random(&mut rng);
    disk.point(2000);
    for format in [
        ExportFormat::Raw,
        ExportFormat::VmdkSparse,
        ExportFormat::VmdkFlat,
    ] {
        let out = tmp.path().join("stopped.vmdk");
        let stop = AtomicBool::new(false);
        let r = export_point_live(&disk.store, old, format, &out, None, &stop, &mut |_, _| {
            stop.store(true, std::sync::atomic::Ordering::Relaxed)
        });
        let e = r.unwrap_err();
        let chain = format!("{:?}", anyhow_like(&e));
        assert!(chain.contains("export stopped"), "{format:?}: {chain}");
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "store")
            .collect();
        assert!(left.is_empty(), "{format:?} left {left:?}");
    }
    // Unpinned: retention removes the older point now.
    let dropped = disk.retention();
    assert_eq!(dropped, vec![old]);
}

#[test]
fn an_existing_output_is_replaced_and_kept_when_an_export_fails_early() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = Disk::new(&tmp.path().join("store"));
    let mut rng = StdRng::seed_from_u64(8);
    disk.random(&mut rng);
    let p = disk.point(1000);
    let out = tmp.path().join("p.raw");
    std::fs::write(&out, b"someone's file").unwrap();
    let stop = AtomicBool::new(false);
    // No such point: nothing was written, the existing file stays.
    let e = export_point_live(
        &disk.store,
        p + 10,
        ExportFormat::Raw,
        &out,
        None,
        &stop,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(e, TargetError::NoSuchPoint { .. }), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"someone's file");
    export_point_live(
        &disk.store,
        p,
        ExportFormat::Raw,
        &out,
        None,
        &stop,
        &mut |_, _| {},
    )
    .unwrap();
    let want = disk.points.lock().unwrap()[&p].clone();
    assert_eq!(first_diff(&std::fs::read(&out).unwrap(), &want), None);
}

/// The error and its sources, one line.
fn anyhow_like(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
