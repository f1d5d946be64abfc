//! The real `DiskStore` under the in-memory simulation: the agent's sender
//! talks to the target's receiver over a link that loses, duplicates and
//! reorders frames and drops the connection; the receiver hands what it
//! accepts to a `DiskStore` on a temporary directory through the
//! `DurableApply` trait. Agent and target crash: the agent loses its tracking
//! (a new generation resends everything), the target loses what it had
//! received but not applied, its store is dropped and reopened from disk.
//! At the end the replica equals the source disk, byte for byte.
//!
//! Seeds are fixed; `SIM_SEEDS=n` runs more of them.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use blockferry_proto::*;
use blockferry_target::{DiskStore, StoreOptions};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 4096;
const BLOCKS: usize = 40;
const DISK_SIZE: u64 = (BLOCK * BLOCKS) as u64;
const DISK: DiskId = DiskId([0xd2; 16]);
const NAME: &str = "sim-disk";
const WINDOW_FRAMES: usize = 6;
const WINDOW_BYTES: usize = 40 << 10;
const STEP: Duration = Duration::from_millis(1);

#[derive(Clone, Copy)]
struct Faults {
    loss: f64,
    dup: f64,
    max_delay: u64,
    disconnect: f64,
    crash: f64,
}

const CALM: Faults = Faults {
    loss: 0.0,
    dup: 0.0,
    max_delay: 0,
    disconnect: 0.0,
    crash: 0.0,
};

/// One direction of the link: encoded frames in flight with a delivery step.
#[derive(Default)]
struct Pipe {
    in_flight: Vec<(u64, u64, Bytes)>,
    next_id: u64,
}

impl Pipe {
    fn send(&mut self, rng: &mut StdRng, f: &Faults, step: u64, frame: &Frame) {
        let bytes = frame.to_bytes().expect("state machines emit valid frames");
        let copies = if rng.gen_bool(f.loss) {
            0
        } else if rng.gen_bool(f.dup) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = step + rng.gen_range(0..=f.max_delay);
            self.in_flight.push((at, self.next_id, bytes.clone()));
            self.next_id += 1;
        }
    }

    fn recv(&mut self, step: u64) -> Option<Frame> {
        let (i, _) = self
            .in_flight
            .iter()
            .enumerate()
            .filter(|(_, (at, _, _))| *at <= step)
            .min_by_key(|(_, (at, id, _))| (*at, *id))?;
        let (_, _, bytes) = self.in_flight.swap_remove(i);
        Some(Frame::decode_exact(bytes).expect("what was encoded decodes"))
    }
}

struct Agent {
    /// The protected disk; it survives crashes.
    disk: Vec<u8>,
    generation: u64,
    /// Dirty blocks known to the tracker; lost in a crash.
    dirty: BTreeSet<usize>,
    sender: DiskSender,
    writes_left: usize,
}

fn new_sender(generation: u64) -> DiskSender {
    DiskSender::new(
        SenderConfig {
            max_unacked_frames: WINDOW_FRAMES,
            max_unacked_bytes: WINDOW_BYTES,
            retransmit_after: Some(Duration::from_millis(25)),
        },
        "host-a",
        DISK,
        DISK_SIZE,
        Generation(generation),
    )
}

impl Agent {
    /// Starts (or restarts after a crash): tracking was lost, so a new
    /// generation resends every block.
    fn restart(&mut self) {
        self.generation += 1;
        self.dirty = (0..BLOCKS).collect();
        self.sender = new_sender(self.generation);
    }

    fn write(&mut self, rng: &mut StdRng) {
        let b = rng.gen_range(0..BLOCKS);
        let block = &mut self.disk[b * BLOCK..(b + 1) * BLOCK];
        match rng.gen_range(0..3) {
            0 => block.fill(0),
            1 => block.fill(rng.r#gen()),
            _ => rng.fill(block),
        }
        self.dirty.insert(b);
    }

    fn step(&mut self, rng: &mut StdRng) {
        while let Some(ev) = self.sender.poll_event() {
            if let SenderEvent::ResyncNeeded(_) = ev {
                self.generation += 1;
                self.sender.start_generation(Generation(self.generation));
                self.dirty = (0..BLOCKS).collect();
            }
        }
        if self.dirty.is_empty() {
            return;
        }
        if rng.gen_bool(0.1) {
            // A full window refuses the barrier; the next step tries again.
            let _refused = self.sender.push_barrier(Consistency::CrashConsistent, 1);
        }
        let take: Vec<usize> = self
            .dirty
            .iter()
            .copied()
            .take(rng.gen_range(1..=3))
            .collect();
        let chunks: Vec<Chunk> = take
            .iter()
            .map(|&b| {
                build_chunk(
                    (b * BLOCK) as u64,
                    &self.disk[b * BLOCK..(b + 1) * BLOCK],
                    Some(1),
                )
                .expect("block length is valid")
            })
            .collect();
        match self.sender.push_batch(chunks) {
            Ok(_) => {
                for b in take {
                    self.dirty.remove(&b);
                }
            }
            // Backpressure: the blocks stay dirty and are read again later.
            Err(r) => assert_eq!(r.error, PushError::WindowFull),
        }
    }
}

/// The target: a receiver in front of the real store. Only the store's
/// directory survives a crash.
struct Target {
    /// Always open, except for the moment of a crash.
    store: Option<DiskStore>,
    recv: DiskReceiver,
    /// Accepted frames not yet applied; lost in a crash.
    pending: Vec<Frame>,
    /// Sequence numbers the store applied, to check "exactly once, in order".
    applied: Vec<Seq>,
}

fn opts() -> StoreOptions {
    StoreOptions {
        // Small, so checkpoints happen during the run as well.
        checkpoint_bytes: 48 << 10,
        ..StoreOptions::default()
    }
}

fn receiver_for(store: &DiskStore) -> DiskReceiver {
    let (generation, seq) = store.durable();
    DiskReceiver::new(ReceiverConfig::default(), DISK, generation, seq)
}

impl Target {
    fn create(root: &Path) -> Target {
        let store = DiskStore::create(root, NAME, DISK_SIZE, 1, opts()).expect("create store");
        let recv = receiver_for(&store);
        Target {
            store: Some(store),
            recv,
            pending: Vec::new(),
            applied: Vec::new(),
        }
    }

    /// A crash: what was received but not applied is gone; the store is
    /// dropped and reopened from its directory.
    fn crash(&mut self, root: &Path) {
        self.pending.clear();
        // The old store holds the directory lock: release it first.
        drop(self.store.take());
        let store = DiskStore::open(root, NAME, opts()).expect("reopen store");
        self.recv = receiver_for(&store);
        self.store = Some(store);
    }

    fn store(&mut self) -> &mut DiskStore {
        self.store
            .as_mut()
            .expect("the store is open between crashes")
    }

    fn durable(&self) -> (Generation, Seq) {
        self.store
            .as_ref()
            .expect("the store is open between crashes")
            .durable()
    }

    /// Applies what the receiver accepted: runs of batches with one sync,
    /// barriers in their place.
    fn apply(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut run = Vec::new();
        for f in std::mem::take(&mut self.pending) {
            let (_, _, seq) = sender::sequenced(&f).expect("sequenced");
            self.applied.push(seq);
            match f {
                Frame::Batch(b) => run.push(b),
                Frame::Barrier(b) => {
                    self.store()
                        .apply_batches(&std::mem::take(&mut run))
                        .expect("store applies what the receiver accepted");
                    self.store()
                        .apply_barrier(&b)
                        .expect("store applies the barrier");
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
        self.store()
            .apply_batches(&run)
            .expect("store applies what the receiver accepted");
        let durable = self.durable().1;
        self.recv.handle_durable(durable);
    }
}

struct World {
    rng: StdRng,
    faults: Faults,
    step: u64,
    base: Instant,
    agent: Agent,
    target: Target,
    root: tempfile::TempDir,
    connected: bool,
    down: Pipe,
    up: Pipe,
    apply_p: f64,
    crashes: [u32; 2],
}

impl World {
    fn new(seed: u64, faults: Faults, writes: usize) -> World {
        let root = tempfile::tempdir().expect("tempdir");
        let target = Target::create(root.path());
        let mut rng = StdRng::seed_from_u64(seed);
        let apply_p = rng.gen_range(0.05..0.5);
        let mut agent = Agent {
            disk: vec![0; BLOCK * BLOCKS],
            generation: 0,
            dirty: BTreeSet::new(),
            sender: new_sender(0),
            writes_left: writes,
        };
        agent.restart();
        World {
            rng,
            faults,
            step: 0,
            base: Instant::now(),
            agent,
            target,
            root,
            connected: false,
            down: Pipe::default(),
            up: Pipe::default(),
            apply_p,
            crashes: [0; 2],
        }
    }

    fn disconnect(&mut self) {
        self.connected = false;
        self.down = Pipe::default();
        self.up = Pipe::default();
        self.agent.sender.handle_disconnected();
        self.target.recv.handle_disconnected();
    }

    fn run_step(&mut self, inject: bool) {
        self.step += 1;
        let now = self.base + STEP * u32::try_from(self.step).expect("few steps");
        let step = self.step;
        let f = if inject { self.faults } else { CALM };
        if self.connected && self.rng.gen_bool(f.disconnect) {
            self.disconnect();
        }
        if self.rng.gen_bool(f.crash) {
            self.disconnect();
            if self.rng.gen_bool(0.5) {
                self.crashes[0] += 1;
                self.agent.restart();
            } else {
                self.crashes[1] += 1;
                self.target.crash(self.root.path());
            }
        }
        if !self.connected && self.rng.gen_bool(0.2) {
            self.connected = true;
            self.agent.sender.handle_connected();
        }

        if self.agent.writes_left > 0 && self.rng.gen_bool(0.5) {
            self.agent.writes_left -= 1;
            self.agent.write(&mut self.rng);
        }
        self.agent.step(&mut self.rng);
        while let Some(fr) = self.up.recv(step) {
            self.agent
                .sender
                .handle_frame(fr, now)
                .expect("target frames make sense");
        }
        self.agent.sender.handle_timeout(now);
        while let Some(fr) = self.agent.sender.poll_transmit(now) {
            self.down.send(&mut self.rng, &f, step, &fr);
        }

        while let Some(fr) = self.down.recv(step) {
            match self.target.recv.handle_frame(fr) {
                Ok(Some(fr)) => self.target.pending.push(fr),
                Ok(None) => {}
                Err(e) => assert!(!e.is_fatal(), "target refused the agent: {e}"),
            }
        }
        if self.rng.gen_bool(self.apply_p) {
            self.target.apply();
        }
        while let Some(fr) = self.target.recv.poll_transmit() {
            self.up.send(&mut self.rng, &f, step, &fr);
        }
    }

    fn quiescent(&self) -> bool {
        self.agent.writes_left == 0
            && self.agent.dirty.is_empty()
            && self.agent.sender.unacked_frames() == 0
            && self.target.durable().1 == self.agent.sender.last_seq()
    }

    fn replica(&self) -> Vec<u8> {
        let mut buf = vec![0u8; DISK_SIZE as usize];
        let store = self.target.store.as_ref().expect("store is open");
        store.read_at(&mut buf, 0).expect("read replica");
        buf
    }
}

fn run(seed: u64, faults: Faults, writes: usize) -> World {
    let mut w = World::new(seed, faults, writes);
    while w.agent.writes_left > 0 {
        w.run_step(true);
    }
    for _ in 0..500 {
        w.run_step(true);
    }
    let mut calm = 0;
    while !w.quiescent() {
        w.run_step(false);
        calm += 1;
        assert!(
            calm < 50_000,
            "seed {seed}: no convergence: dirty {} unacked {} last {:?} store {:?}",
            w.agent.dirty.len(),
            w.agent.sender.unacked_frames(),
            w.agent.sender.last_seq(),
            w.target.durable(),
        );
    }
    assert!(
        w.replica() == w.agent.disk,
        "seed {seed}: replica differs from the source"
    );
    // What the store holds survives a reopen unchanged.
    w.target.crash(w.root.path());
    assert!(
        w.replica() == w.agent.disk,
        "seed {seed}: replica differs from the source after a reopen"
    );
    w
}

fn seeds() -> u64 {
    std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12)
}

#[test]
fn store_replica_equals_source_under_loss_reordering_duplication_and_crashes() {
    let harsh = Faults {
        loss: 0.05,
        dup: 0.05,
        max_delay: 4,
        disconnect: 0.005,
        crash: 0.004,
    };
    let mut crashes = [0u32; 2];
    for seed in 0..seeds() {
        let w = run(seed, harsh, 150);
        for (c, n) in crashes.iter_mut().zip(w.crashes) {
            *c += n;
        }
    }
    // The property only means something if both parties did crash.
    assert!(
        crashes.iter().all(|&n| n > 0),
        "crashes per party: {crashes:?}"
    );
}

#[test]
fn store_applies_every_sequence_number_once_in_order_on_a_clean_link() {
    let w = run(7, CALM, 150);
    assert_eq!(w.crashes, [0; 2]);
    let want: Vec<Seq> = (1..=w.agent.sender.last_seq().0).map(Seq).collect();
    assert_eq!(w.target.applied, want);
}
