//! The state machines sit on network paths: no sequence of peer frames,
//! however wrong, may panic them or break their bounds.

use std::time::{Duration, Instant};

use blockferry_proto::*;
use proptest::prelude::*;

mod common;

const D: DiskId = DiskId([9; 16]);

/// Frames of any kind, mostly for our disk, with small sequence numbers and
/// generations so that they collide with the machine's own state.
fn peer_frame() -> impl Strategy<Value = Frame> {
    (common::frame(), 0u64..12, 0u64..4, any::<bool>()).prop_map(|(mut f, seq, g, ours)| {
        let disk = if ours { D } else { DiskId([1; 16]) };
        match &mut f {
            Frame::Hello(x) => (x.disk, x.generation) = (disk, Generation(g)),
            Frame::HelloReply(x) => {
                (x.disk, x.generation, x.durable_seq) = (disk, Generation(g), Seq(seq));
            }
            Frame::Batch(x) => (x.disk, x.generation, x.seq) = (disk, Generation(g), Seq(seq)),
            Frame::Barrier(x) => (x.disk, x.generation, x.seq) = (disk, Generation(g), Seq(seq)),
            Frame::Ack(x) => {
                (x.disk, x.generation, x.durable_seq) = (disk, Generation(g), Seq(seq))
            }
            Frame::Nack(x) => (x.disk, x.generation, x.seq) = (disk, Generation(g), Seq(seq)),
            Frame::HashRequest(x) => x.disk = disk,
            Frame::HashReply(x) => x.disk = disk,
            Frame::Error(x) => x.disk = Some(disk),
        }
        f
    })
}

#[derive(Debug, Clone)]
enum Op {
    Peer(Frame),
    Push,
    Durable(u64),
    Connect,
    Disconnect,
    Tick(u64),
    PersistFailed,
    StartGeneration(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => peer_frame().prop_map(Op::Peer),
        2 => Just(Op::Push),
        1 => (0u64..12).prop_map(Op::Durable),
        1 => Just(Op::Connect),
        1 => Just(Op::Disconnect),
        1 => (0u64..100).prop_map(Op::Tick),
        1 => Just(Op::PersistFailed),
        1 => (0u64..5).prop_map(Op::StartGeneration),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn sender_survives_any_peer_and_keeps_its_window(ops in proptest::collection::vec(op(), 0..80)) {
        let base = Instant::now();
        let mut now = base;
        let cfg = SenderConfig {
            max_unacked_frames: 4,
            max_unacked_bytes: 1 << 20,
            retransmit_after: Some(Duration::from_millis(10)),
        };
        let mut s = DiskSender::new(cfg, "a", D, 1 << 20, Generation(1));
        for op in ops {
            match op {
                Op::Peer(f) => { let _ = s.handle_frame(f, now); }
                Op::Push => { let _ = s.push_barrier(Consistency::NotConsistent, 0); }
                Op::Connect => s.handle_connected(),
                Op::Disconnect => s.handle_disconnected(),
                Op::Tick(ms) => { now += Duration::from_millis(ms); s.handle_timeout(now); }
                Op::StartGeneration(g) => s.start_generation(Generation(g)),
                Op::Durable(_) | Op::PersistFailed => {}
            }
            while let Some(f) = s.poll_transmit(now) {
                prop_assert!(f.validate().is_ok());
                prop_assert_eq!(f.disk(), Some(D));
            }
            while s.poll_event().is_some() {}
            prop_assert!(s.unacked_frames() <= 4);
        }
    }

    #[test]
    fn receiver_survives_any_peer_and_hands_out_in_order(ops in proptest::collection::vec(op(), 0..80)) {
        let mut r = DiskReceiver::new(ReceiverConfig::default(), D, Generation(1), Seq(2));
        let mut last = Seq(2);
        for op in ops {
            match op {
                Op::Peer(f) => {
                    if let Ok(Some(f)) = r.handle_frame(f) {
                        let (_, _, seq) = sender::sequenced(&f).expect("only data is handed out");
                        prop_assert_eq!(seq, last.next());
                        last = seq;
                    }
                }
                Op::Durable(s) => r.handle_durable(Seq(s)),
                Op::Disconnect => r.handle_disconnected(),
                Op::PersistFailed => {
                    r.handle_persist_failed();
                    last = r.durable_seq();
                }
                Op::Push | Op::Connect | Op::Tick(_) | Op::StartGeneration(_) => {}
            }
            prop_assert!(r.durable_seq() <= r.received_seq());
            prop_assert!(r.durable_seq() >= Seq(2), "durable never goes back");
            while let Some(f) = r.poll_transmit() {
                prop_assert!(f.validate().is_ok());
                if let Frame::Ack(a) = f {
                    prop_assert!(a.durable_seq <= r.durable_seq());
                }
            }
        }
    }
}
