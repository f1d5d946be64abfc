//! In-memory simulation of agent ↔ relay ↔ target, built only from the
//! sans-IO state machines. The links lose, duplicate and reorder frames and
//! drop connections; each party crashes and restarts, losing everything it
//! had not made durable. At the end the replica equals the source disk, and
//! the target applied every sequence number exactly once, in order.
//!
//! One file of about 900 lines on purpose: the model of each party and the
//! scenarios that drive it are read together, and a scenario is a few lines.
//!
//! Every frame crosses the links encoded and decoded, so the codec is part of
//! what is simulated. Seeds are fixed; `SIM_SEEDS=n` runs more of them.
//!
//! The relay is `RelayDisk` over a spool modelled on the relay's own (records
//! deleted a segment at a time, restarts through `RelayRestore::from_spool`):
//! the cursor and restore logic the relay binary runs (see `proto::relay`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use blockferry_proto::*;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 4096;
const BLOCKS: usize = 40;
const DISK_SIZE: u64 = (BLOCK * BLOCKS) as u64;
const DISK: DiskId = DiskId([0xd1; 16]);
const WINDOW_FRAMES: usize = 6;
const WINDOW_BYTES: usize = 40 << 10;
const SPOOL_FRAMES: usize = 12;
const STEP: Duration = Duration::from_millis(1);

#[derive(Clone, Copy)]
struct Faults {
    loss: f64,
    dup: f64,
    max_delay: u64,
    disconnect: f64,
    crash: f64,
}

/// One direction of a connection: frames in flight with a delivery step.
#[derive(Default)]
struct Pipe {
    in_flight: Vec<(u64, u64, Bytes)>,
    next_id: u64,
}

impl Pipe {
    fn send(&mut self, rng: &mut StdRng, f: &Faults, step: u64, frame: &Frame) {
        let bytes = frame
            .to_bytes()
            .expect("state machines only emit valid frames");
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

    /// The next frame due at `step`, decoded.
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

    fn clear(&mut self) {
        self.in_flight.clear();
    }
}

/// A connection between a sender side (`down`: towards the receiver) and a
/// receiver side (`up`: back to the sender).
#[derive(Default)]
struct Conn {
    connected: bool,
    down: Pipe,
    up: Pipe,
}

impl Conn {
    fn drop_all(&mut self) {
        self.connected = false;
        self.down.clear();
        self.up.clear();
    }
}

// ---------------------------------------------------------------- agent

struct Agent {
    /// The protected disk; it survives crashes (it is the disk).
    disk: Vec<u8>,
    /// Durable agent state: the generation.
    generation: u64,
    /// Dirty blocks known to the tracker; lost in a crash.
    dirty: BTreeSet<usize>,
    sender: Option<DiskSender>,
    writes_left: usize,
    /// Pushes refused because the window was full (backpressure seen).
    refused: u64,
    /// Frames pushed (batches and barriers).
    pushed: u64,
}

impl Agent {
    fn start(&mut self) {
        // An unclean stop loses tracking: resync everything (the real agent
        // compares hashes; the simulation just resends).
        self.generation += 1;
        self.dirty = (0..BLOCKS).collect();
        self.sender = Some(DiskSender::new(
            SenderConfig {
                max_unacked_frames: WINDOW_FRAMES,
                max_unacked_bytes: WINDOW_BYTES,
                retransmit_after: Some(Duration::from_millis(25)),
            },
            "host-a",
            DISK,
            DISK_SIZE,
            Generation(self.generation),
        ));
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
        let Some(sender) = self.sender.as_mut() else {
            return;
        };
        while let Some(ev) = sender.poll_event() {
            if let SenderEvent::ResyncNeeded(_) = ev {
                self.generation += 1;
                sender.start_generation(Generation(self.generation));
                self.dirty = (0..BLOCKS).collect();
            }
        }
        if self.dirty.is_empty() {
            return;
        }
        if rng.gen_bool(0.1) && sender.push_barrier(Consistency::CrashConsistent, 1).is_ok() {
            self.pushed += 1;
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
        match sender.push_batch(chunks) {
            Ok(_) => {
                self.pushed += 1;
                for b in take {
                    self.dirty.remove(&b);
                }
            }
            // Backpressure: the blocks stay dirty and are read again later.
            Err(r) => {
                assert_eq!(r.error, PushError::WindowFull);
                self.refused += 1;
            }
        }
        assert!(sender.unacked_frames() <= WINDOW_FRAMES);
    }
}

// ---------------------------------------------------------------- relay

/// What the relay's spool holds across a crash, modelled on the real spool:
/// records are deleted, and the target's acked position persisted, only when
/// a whole segment of them was released. Until then released records come
/// back after a crash and are forwarded again.
#[derive(Default)]
struct RelayDurable {
    spool: BTreeMap<u64, (Generation, Bytes)>,
    acked: Option<(Generation, Seq)>,
}

/// Frames per spool segment of the model.
const SEGMENT_FRAMES: u64 = 4;

impl RelayDurable {
    fn acked_seq(&self) -> Seq {
        self.acked.map_or(Seq::ZERO, |(_, s)| s)
    }

    /// The newest position held, spooled or acked (what the real spool's
    /// `durable_position` answers).
    fn position(&self) -> (Generation, Seq) {
        let last = self
            .spool
            .iter()
            .next_back()
            .map(|(&s, &(g, _))| (g, Seq(s)));
        last.max(self.acked).unwrap_or((Generation(0), Seq::ZERO))
    }

    fn release(&mut self, through: Seq) {
        if through.0 / SEGMENT_FRAMES <= self.acked_seq().0 / SEGMENT_FRAMES {
            return;
        }
        let generation = self
            .spool
            .get(&through.0)
            .map_or(self.position().0, |&(g, _)| g);
        self.acked = Some((generation, through));
        self.spool.retain(|&s, _| s > through.0);
    }
}

struct Relay {
    durable: RelayDurable,
    live: Option<(RelayDisk, Vec<Frame>)>,
}

impl Relay {
    fn start(&mut self) {
        // As the real spool does on open: records the target acked are not
        // indexed again.
        let acked = self.durable.acked_seq().0;
        self.durable.spool.retain(|&s, _| s > acked);
        let first = self
            .durable
            .spool
            .iter()
            .next()
            .map(|(&s, &(g, _))| (g, Seq(s)));
        let last = self
            .durable
            .spool
            .iter()
            .next_back()
            .map(|(&s, &(g, _))| (g, Seq(s)));
        let r = RelayRestore::from_spool(
            DISK,
            DISK_SIZE,
            self.durable.acked,
            first.zip(last),
            Generation(0),
        );
        let disk = RelayDisk::restore(
            "relay",
            ReceiverConfig::default(),
            SenderConfig {
                max_unacked_frames: 4,
                max_unacked_bytes: WINDOW_BYTES,
                retransmit_after: Some(Duration::from_millis(25)),
            },
            r,
        );
        self.live = Some((disk, Vec::new()));
    }

    /// Frames spooled and not released: what bounds the spool (the real
    /// relay's byte gate counts the same).
    fn live_frames(&self) -> usize {
        let released = self
            .live
            .as_ref()
            .map_or(self.durable.acked_seq(), |(d, _)| d.released_through());
        self.durable.spool.range(released.0 + 1..).count()
    }

    fn spool_full(&self) -> bool {
        let pending = self.live.as_ref().map_or(0, |(_, p)| p.len());
        self.live_frames() + pending >= SPOOL_FRAMES
    }

    fn fsync(&mut self) {
        let Some((disk, pending)) = self.live.as_mut() else {
            return;
        };
        let Some(last) = pending.last() else {
            return;
        };
        let (_, _, last_seq) = sender::sequenced(last).expect("spooled frames are sequenced");
        for f in pending.drain(..) {
            let (_, generation, seq) = sender::sequenced(&f).expect("sequenced");
            assert_eq!(
                seq_order(self.durable.position(), (generation, seq)),
                SeqOrder::Next,
                "spool gets each sequence once, in order"
            );
            self.durable
                .spool
                .insert(seq.0, (generation, f.to_bytes().expect("valid")));
        }
        disk.handle_spooled(last_seq);
    }

    fn forward(&mut self, now: Instant) {
        let Some((disk, _)) = self.live.as_mut() else {
            return;
        };
        while let Some(seq) = disk.poll_forward() {
            let bytes = self
                .durable
                .spool
                .get(&seq.0)
                .expect("forwarded frames are in the spool")
                .1
                .clone();
            let frame = Frame::decode_exact(bytes).expect("spool holds valid frames");
            disk.handle_forward(frame)
                .expect("poll_forward asked for it");
        }
        while let Some(ev) = disk.poll_event() {
            match ev {
                RelayEvent::Release { through } => self.durable.release(through),
                other => panic!("unexpected relay event {other:?}"),
            }
        }
        disk.handle_timeout(now);
    }

    fn crash(&mut self) {
        self.live = None;
        self.start();
    }
}

// ---------------------------------------------------------------- target

struct TargetDurable {
    image: Vec<u8>,
    seq: Seq,
    generation: Generation,
    applied: u64,
    points: Vec<(Seq, Consistency)>,
}

struct Target {
    durable: TargetDurable,
    live: Option<(DiskReceiver, Vec<Frame>)>,
}

impl Target {
    fn start(&mut self) {
        let r = DiskReceiver::new(
            ReceiverConfig::default(),
            DISK,
            self.durable.generation,
            self.durable.seq,
        );
        self.live = Some((r, Vec::new()));
    }

    fn fsync(&mut self) {
        let Some((recv, pending)) = self.live.as_mut() else {
            return;
        };
        if pending.is_empty() {
            return;
        }
        for f in pending.drain(..) {
            let (_, generation, seq) = sender::sequenced(&f).expect("sequenced");
            assert_eq!(
                seq,
                self.durable.seq.next(),
                "applied exactly once, in order"
            );
            match f {
                Frame::Batch(b) => {
                    for c in &b.chunks {
                        let data = verify_chunk(c).expect("target verifies").to_bytes();
                        let off = c.offset as usize;
                        self.durable.image[off..off + data.len()].copy_from_slice(&data);
                    }
                }
                Frame::Barrier(b) => self.durable.points.push((b.seq, b.consistency)),
                _ => unreachable!(),
            }
            self.durable.seq = seq;
            self.durable.generation = generation;
            self.durable.applied += 1;
        }
        recv.handle_durable(self.durable.seq);
    }
}

// ---------------------------------------------------------------- world

struct World {
    rng: StdRng,
    faults: Faults,
    step: u64,
    base: Instant,
    agent: Agent,
    relay: Relay,
    target: Target,
    a2r: Conn,
    r2t: Conn,
    crashes: [u32; 3],
    /// Per-step chance that relay and target fsync; slow fsyncs keep frames
    /// received-but-not-durable around when crashes and reconnects happen.
    fsync_p: f64,
    /// The target is unreachable while set.
    target_unreachable: bool,
    /// Largest spool seen, in frames.
    max_spool: usize,
}

impl World {
    fn new(seed: u64, faults: Faults, writes: usize) -> Self {
        let mut w = World {
            rng: StdRng::seed_from_u64(seed),
            faults,
            step: 0,
            base: Instant::now(),
            agent: Agent {
                disk: vec![0; BLOCK * BLOCKS],
                generation: 0,
                dirty: BTreeSet::new(),
                sender: None,
                writes_left: writes,
                refused: 0,
                pushed: 0,
            },
            relay: Relay {
                durable: RelayDurable::default(),
                live: None,
            },
            target: Target {
                durable: TargetDurable {
                    image: vec![0; BLOCK * BLOCKS],
                    seq: Seq::ZERO,
                    generation: Generation(0),
                    applied: 0,
                    points: Vec::new(),
                },
                live: None,
            },
            a2r: Conn::default(),
            r2t: Conn::default(),
            crashes: [0; 3],
            fsync_p: 0.3,
            target_unreachable: false,
            max_spool: 0,
        };
        w.fsync_p = w.rng.gen_range(0.02..0.5);
        w.agent.start();
        w.relay.start();
        w.target.start();
        w
    }

    fn now(&self) -> Instant {
        self.base + STEP * u32::try_from(self.step).expect("few steps")
    }

    fn disconnect_a2r(&mut self) {
        self.a2r.drop_all();
        if let Some(s) = self.agent.sender.as_mut() {
            s.handle_disconnected();
        }
        if let Some((r, _)) = self.relay.live.as_mut() {
            r.handle_upstream_disconnected();
        }
    }

    fn disconnect_r2t(&mut self) {
        self.r2t.drop_all();
        if let Some((r, _)) = self.relay.live.as_mut() {
            r.handle_downstream_disconnected();
        }
        if let Some((t, _)) = self.target.live.as_mut() {
            t.handle_disconnected();
        }
    }

    /// The relay process dies and restarts from its spool. Returns the
    /// restored relay's spooled position, which must be the one it had acked
    /// to the agent before the crash.
    fn crash_relay(&mut self) -> Seq {
        let before = self.relay.live.as_ref().map(|(d, _)| d.spooled_through());
        self.crashes[1] += 1;
        self.disconnect_a2r();
        self.disconnect_r2t();
        self.relay.crash();
        let after = self
            .relay
            .live
            .as_ref()
            .expect("relay runs")
            .0
            .spooled_through();
        assert_eq!(
            Some(after),
            before,
            "a restarted relay holds everything it acked to the agent"
        );
        after
    }

    fn faults(&mut self) {
        let f = self.faults;
        if self.a2r.connected && self.rng.gen_bool(f.disconnect) {
            self.disconnect_a2r();
        }
        if self.r2t.connected && self.rng.gen_bool(f.disconnect) {
            self.disconnect_r2t();
        }
        match self.rng.gen_range(0..3) {
            0 if self.rng.gen_bool(f.crash) => {
                self.crashes[0] += 1;
                self.disconnect_a2r();
                self.agent.sender = None;
                self.agent.start();
            }
            1 if self.rng.gen_bool(f.crash) => {
                self.crash_relay();
            }
            2 if self.rng.gen_bool(f.crash) => {
                self.crashes[2] += 1;
                self.disconnect_r2t();
                self.target.live = None;
                self.target.start();
            }
            _ => {}
        }
    }

    fn connect(&mut self) {
        if !self.a2r.connected && self.rng.gen_bool(0.2) {
            self.a2r.connected = true;
            self.agent
                .sender
                .as_mut()
                .expect("agent runs")
                .handle_connected();
        }
        if !self.r2t.connected && !self.target_unreachable && self.rng.gen_bool(0.2) {
            self.r2t.connected = true;
            self.relay
                .live
                .as_mut()
                .expect("relay runs")
                .0
                .handle_downstream_connected();
        }
    }

    fn run_step(&mut self, inject_faults: bool) {
        self.step += 1;
        let now = self.now();
        let step = self.step;
        let f = if inject_faults {
            self.faults
        } else {
            Faults {
                loss: 0.0,
                dup: 0.0,
                max_delay: 0,
                disconnect: 0.0,
                crash: 0.0,
            }
        };
        if inject_faults {
            self.faults();
        }
        self.connect();

        // Agent: write, read dirty blocks into batches, talk to the relay.
        if self.agent.writes_left > 0 && self.rng.gen_bool(0.5) {
            self.agent.writes_left -= 1;
            self.agent.write(&mut self.rng);
        }
        self.agent.step(&mut self.rng);
        let sender = self.agent.sender.as_mut().expect("agent runs");
        while let Some(fr) = self.a2r.up.recv(step) {
            sender
                .handle_frame(fr, now)
                .expect("relay frames make sense");
        }
        assert!(
            sender.replica_seq() <= self.target.durable.seq,
            "the agent hears of no replica position the target has not made durable"
        );
        sender.handle_timeout(now);
        while let Some(fr) = sender.poll_transmit(now) {
            self.a2r.down.send(&mut self.rng, &f, step, &fr);
        }

        // Relay: accept while the spool has room (backpressure), spool,
        // forward, release.
        while !self.relay.spool_full() {
            let Some(fr) = self.a2r.down.recv(step) else {
                break;
            };
            let (disk, pending) = self.relay.live.as_mut().expect("relay runs");
            match disk.handle_upstream(fr) {
                Ok(Some(fr)) => pending.push(fr),
                Ok(None) => {}
                Err(e) => assert!(!e.is_fatal(), "relay refused the agent: {e}"),
            }
        }
        if self.rng.gen_bool(self.fsync_p) {
            self.relay.fsync();
        }
        self.max_spool = self.max_spool.max(self.relay.live_frames());
        let (disk, _) = self.relay.live.as_mut().expect("relay runs");
        while let Some(fr) = self.r2t.up.recv(step) {
            disk.handle_downstream(fr, now)
                .expect("target frames make sense");
        }
        self.relay.forward(now);
        let (disk, _) = self.relay.live.as_mut().expect("relay runs");
        while let Some(fr) = disk.poll_upstream_transmit() {
            self.a2r.up.send(&mut self.rng, &f, step, &fr);
        }
        while let Some(fr) = disk.poll_downstream_transmit(now) {
            self.r2t.down.send(&mut self.rng, &f, step, &fr);
        }

        // Target: apply durably, ack.
        let (recv, pending) = self.target.live.as_mut().expect("target runs");
        while let Some(fr) = self.r2t.down.recv(step) {
            match recv.handle_frame(fr) {
                Ok(Some(fr)) => pending.push(fr),
                Ok(None) => {}
                Err(e) => assert!(!e.is_fatal(), "target refused the relay: {e}"),
            }
        }
        if self.rng.gen_bool(self.fsync_p) {
            self.target.fsync();
        }
        let (recv, _) = self.target.live.as_mut().expect("target runs");
        while let Some(fr) = recv.poll_transmit() {
            self.r2t.up.send(&mut self.rng, &f, step, &fr);
        }
    }

    fn quiescent(&self) -> bool {
        let Some(sender) = self.agent.sender.as_ref() else {
            return false;
        };
        self.agent.writes_left == 0
            && self.agent.dirty.is_empty()
            && sender.unacked_frames() == 0
            && self.relay.live_frames() == 0
            && self.target.durable.seq == sender.last_seq()
    }
}

fn run(seed: u64, faults: Faults) -> World {
    let mut w = World::new(seed, faults, 300);
    // Faults while the workload runs, then a calm tail to converge.
    while w.agent.writes_left > 0 {
        w.run_step(true);
    }
    for _ in 0..2_000 {
        w.run_step(true);
    }
    converge(w, seed)
}

fn converge(mut w: World, seed: u64) -> World {
    let mut calm = 0;
    while !w.quiescent() {
        w.run_step(false);
        calm += 1;
        assert!(
            calm < 50_000,
            "seed {seed}: no convergence: dirty {} unacked {} last {:?} sender durable {:?} connected {} spool {:?} relay spooled {:?} released {:?} fwd-unacked {} target {:?} crashes {:?}",
            w.agent.dirty.len(),
            w.agent.sender.as_ref().map_or(0, |s| s.unacked_frames()),
            w.agent.sender.as_ref().map(|s| s.last_seq()),
            w.agent.sender.as_ref().map(|s| s.durable_seq()),
            w.agent.sender.as_ref().is_some_and(|s| s.is_connected()),
            w.relay.durable.spool.keys().collect::<Vec<_>>(),
            w.relay.live.as_ref().map(|(d, _)| d.spooled_through()),
            w.relay.live.as_ref().map(|(d, _)| d.released_through()),
            w.relay
                .live
                .as_ref()
                .map_or(0, |(d, _)| d.downstream().unacked_frames()),
            w.target.durable.seq,
            w.crashes,
        );
    }
    assert!(
        w.target.durable.image == w.agent.disk,
        "seed {seed}: replica differs from the source"
    );
    w
}

fn seeds() -> u64 {
    std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150)
}

const HARSH: Faults = Faults {
    loss: 0.05,
    dup: 0.05,
    max_delay: 4,
    disconnect: 0.005,
    crash: 0.002,
};

#[test]
fn replica_equals_source_under_loss_reordering_duplication_and_crashes() {
    let mut crashes = [0u32; 3];
    for seed in 0..seeds() {
        let w = run(seed, HARSH);
        for (c, n) in crashes.iter_mut().zip(w.crashes) {
            *c += n;
        }
        assert!(
            w.target
                .durable
                .points
                .iter()
                .all(|&(_, c)| c == Consistency::CrashConsistent),
            "seed {seed}: barriers keep their label"
        );
    }
    // The property only means something if every party did crash.
    assert!(
        crashes.iter().all(|&n| n > 0),
        "crashes per party: {crashes:?}"
    );
}

#[test]
fn clean_network_applies_every_pushed_frame_exactly_once() {
    let clean = Faults {
        loss: 0.0,
        dup: 0.0,
        max_delay: 0,
        disconnect: 0.0,
        crash: 0.0,
    };
    let mut w = run(7, clean);
    assert_eq!(w.crashes, [0; 3]);
    assert_eq!(w.target.durable.applied, w.agent.pushed);
    // The relay passes the target's progress on: the agent learns that the
    // replica holds everything.
    for _ in 0..100 {
        w.run_step(false);
    }
    let sender = w.agent.sender.as_ref().expect("agent runs");
    assert_eq!(sender.replica_seq(), sender.last_seq());
}

#[test]
fn reordering_and_duplication_alone_converge() {
    let f = Faults {
        loss: 0.0,
        dup: 0.3,
        max_delay: 8,
        disconnect: 0.0,
        crash: 0.0,
    };
    for seed in 100..110 {
        run(seed, f);
    }
}

#[test]
fn full_spool_blocks_the_agent_without_loss_and_it_resumes() {
    let mut w = World::new(3, CALM, 300);
    w.target_unreachable = true;
    while w.agent.writes_left > 0 {
        w.run_step(true);
    }
    for _ in 0..500 {
        w.run_step(true);
    }
    // Nothing drains the spool: it fills to its limit, the relay stops
    // acking, the agent's window fills and its pushes are refused.
    assert_eq!(
        w.max_spool, SPOOL_FRAMES,
        "spool filled to its limit and no further"
    );
    let refused = w.agent.refused;
    assert!(refused > 0, "the agent saw backpressure");
    assert_eq!(
        w.agent.sender.as_ref().map(DiskSender::unacked_frames),
        Some(WINDOW_FRAMES)
    );
    assert!(!w.agent.dirty.is_empty(), "unsent changes stay tracked");
    w.target_unreachable = false;
    let w = converge(w, 3);
    assert!(w.target.durable.applied > SPOOL_FRAMES as u64);
}

const CALM: Faults = Faults {
    loss: 0.0,
    dup: 0.0,
    max_delay: 1,
    disconnect: 0.0,
    crash: 0.0,
};

#[test]
fn relay_restart_forwards_released_but_undeleted_frames_again_and_the_target_applies_each_once() {
    let mut w = World::new(11, CALM, 300);
    let mut restarts = 0;
    while w.agent.writes_left > 0 {
        w.run_step(true);
        let (disk, _) = w.relay.live.as_ref().expect("relay runs");
        let released = disk.released_through();
        // The spool still holds frames the target acked (their segment is
        // not free yet): after a restart they are forwarded again.
        let stale = w
            .relay
            .durable
            .spool
            .keys()
            .next()
            .is_some_and(|&s| s <= released.0);
        if stale && restarts < 8 {
            w.crash_relay();
            restarts += 1;
            let (disk, _) = w.relay.live.as_ref().expect("relay runs");
            assert!(
                disk.released_through() < released,
                "the restored relay starts behind what it had released"
            );
        }
    }
    assert_eq!(restarts, 8, "the relay restarted over undeleted frames");
    let w = converge(w, 11);
    assert_eq!(w.target.durable.applied, w.agent.pushed);
}

#[test]
fn relay_restart_with_a_full_spool_keeps_it_full_and_the_agent_blocked_then_drains() {
    let mut w = World::new(5, CALM, 300);
    w.target_unreachable = true;
    while w.agent.writes_left > 0 {
        w.run_step(true);
    }
    for _ in 0..500 {
        w.run_step(true);
    }
    assert_eq!(w.max_spool, SPOOL_FRAMES, "spool filled to its limit");
    let held = w.relay.live_frames();
    w.crash_relay();
    assert_eq!(w.relay.live_frames(), held, "the restored spool is as full");
    let refused = w.agent.refused;
    for _ in 0..500 {
        w.run_step(true);
    }
    assert_eq!(
        w.max_spool, SPOOL_FRAMES,
        "a restarted relay bounds its spool as before"
    );
    assert!(
        w.agent.refused > refused,
        "the agent is held back after the restart"
    );
    w.target_unreachable = false;
    let w = converge(w, 5);
    assert_eq!(w.target.durable.applied, w.agent.pushed);
}
