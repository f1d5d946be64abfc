//! Crash injection with a real SIGKILL: the real binary applies a feed of
//! batches and barriers and is killed at random moments; after each kill the
//! replica must sit exactly at a batch boundary at or after the last one it
//! acknowledged, and every sealed recovery point must still be exact.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use blockferry_proto::{DiskId, Generation, Seq};
use blockferry_target::feed::{FeedItem, encode};
use blockferry_target::{Barrier, Consistency, DiskStore, StoreOptions};
use common::*;
use rand::{Rng, SeedableRng, rngs::StdRng};

const SIZE: u64 = 4 << 20;

fn small() -> StoreOptions {
    StoreOptions {
        checkpoint_bytes: 200_000,
        ..StoreOptions::default()
    }
}
const BATCHES: u64 = 60;

#[test]
fn sigkill_at_random_moments_leaves_the_replica_at_a_batch_boundary() {
    sigkill_at_random_moments(false);
}

#[test]
fn sigkill_at_random_moments_leaves_a_thin_replica_at_a_batch_boundary() {
    sigkill_at_random_moments(true);
}

fn sigkill_at_random_moments(thin: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let seed: u64 = std::env::var("BLOCKFERRY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xdead);
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    // A barrier after every 4 batches; it takes its own sequence number.
    let mut batches = Vec::new();
    let mut barrier_seqs = Vec::new();
    let mut feed = Vec::new();
    let mut seq = 0;
    for i in 1..=BATCHES {
        seq += 1;
        let b = random_batch(&mut rng, seq, SIZE);
        encode(&FeedItem::Batch(b.clone()), &mut feed);
        batches.push(b);
        if i % 4 == 0 {
            seq += 1;
            let barrier = Barrier {
                disk: DiskId::default(),
                generation: Generation(1),
                seq: Seq(seq),
                consistency: Consistency::CrashConsistent,
                timestamp_ns: 0,
            };
            encode(&FeedItem::Barrier(barrier), &mut feed);
            barrier_seqs.push(seq);
        }
    }
    let last_seq = seq;
    let feed_path = tmp.path().join("feed.bin");
    std::fs::write(&feed_path, &feed).unwrap();

    let mut acked = 0u64;
    let mut kills = 0;
    for round in 0..40 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_blockferry-target"))
            .args(["apply-file", "--disk", DISK, "--create-size"])
            .arg(SIZE.to_string())
            .args(["--checkpoint-bytes", "200000", "--store"])
            .arg(&root)
            .arg("--input")
            .arg(&feed_path)
            .args(thin.then_some("--thin"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn blockferry-target");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        // Kill after a random number of acknowledged steps, often zero, so the
        // kill also lands in recovery and in creation.
        let wait_for = rng.gen_range(0..6);
        let mut seen = 0;
        let mut finished = true;
        while let Some(Ok(line)) = lines.next() {
            // Count only new steps: replays of what is already durable are quick.
            if line.ends_with("Applied") {
                seen += 1;
            }
            if let Some(rest) = line.strip_prefix("applied ") {
                let seq: u64 = rest.split(' ').next().unwrap().parse().unwrap();
                acked = acked.max(seq);
            }
            if seen >= wait_for && round < 14 {
                // Spin a random, short while so the kill lands inside a step.
                let spin = rng.gen_range(0..200_000u32);
                let mut x = 0u64;
                for i in 0..spin {
                    x = x.wrapping_add(std::hint::black_box(i as u64));
                }
                std::hint::black_box(x);
                child.kill().unwrap();
                kills += 1;
                finished = false;
                break;
            }
        }
        let status = child.wait().unwrap();
        // A run that printed nothing may have been killed before creation.
        if !root.join(DISK).join("state.json").exists() {
            continue;
        }
        if finished {
            assert!(status.success(), "round {round}: {status}");
        }
        let mut s = DiskStore::open(&root, DISK, small()).unwrap();
        let applied = s.applied_seq();
        assert!(
            applied >= acked,
            "round {round}: acked {acked} but applied {applied}"
        );
        let mut replica = vec![0u8; SIZE as usize];
        s.read_at(&mut replica, 0).unwrap();
        assert_eq!(
            first_diff(&replica, &model_at(&batches, SIZE, applied)),
            None,
            "round {round}: replica is not at batch boundary {applied}"
        );
        if thin {
            // Opening replayed the journal and checkpointed: the file's own
            // tables are consistent.
            let report = blockferry_target::vmdk::check::check(s.replica_path()).unwrap();
            assert!(report.is_clean(), "round {round}: {report:?}");
        }
        let points = s.points().to_vec();
        for p in &points {
            assert!(
                barrier_seqs.contains(&p.marker_seq),
                "round {round}: point without barrier"
            );
            assert_eq!(
                p.seq + 1,
                p.marker_seq,
                "round {round}: point not at its barrier"
            );
            let img = s.point_image(p.id).unwrap();
            let mut got = vec![0u8; SIZE as usize];
            img.read_at(&mut got, 0).unwrap();
            assert_eq!(
                first_diff(&got, &model_at(&batches, SIZE, p.seq)),
                None,
                "round {round}: point {} (seq {})",
                p.id,
                p.seq
            );
        }
        // Exactly one point per barrier applied, even across replays.
        let n = points.len();
        let expected = barrier_seqs.iter().filter(|q| **q <= applied).count();
        assert_eq!(n, expected, "round {round}: points after seq {applied}");
        s.close().unwrap();
        eprintln!(
            "round {round}: killed={} applied={applied} points={n}",
            !finished
        );
        if applied == last_seq {
            break;
        }
    }
    assert!(kills >= 3, "only {kills} kills");
    let s = DiskStore::open(&root, DISK, small()).unwrap();
    if s.applied_seq() == last_seq && have_qemu_img() {
        let model = tmp.path().join("model.raw");
        std::fs::write(&model, model_at(&batches, SIZE, last_seq)).unwrap();
        assert!(qemu_same(&model, s.replica_path()));
    }
}
