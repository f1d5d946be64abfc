use super::*;
use crate::frame::{ErrorCode, ErrorFrame};

const D: DiskId = DiskId([5; 16]);

fn cfg(frames: usize) -> SenderConfig {
    SenderConfig {
        max_unacked_frames: frames,
        max_unacked_bytes: 1 << 20,
        retransmit_after: Some(Duration::from_millis(10)),
    }
}

fn reply(durable: u64) -> Frame {
    Frame::HelloReply(HelloReply {
        disk: D,
        generation: Generation(1),
        durable_seq: Seq(durable),
        replica_seq: Seq(durable),
    })
}

fn ack(durable: u64) -> Frame {
    Frame::Ack(Ack {
        disk: D,
        generation: Generation(1),
        durable_seq: Seq(durable),
        replica_seq: Seq(durable),
    })
}

fn drain(s: &mut DiskSender, now: Instant) -> Vec<u64> {
    std::iter::from_fn(|| s.poll_transmit(now))
        .map(|f| sequenced(&f).map_or(0, |(_, _, q)| q.0))
        .collect()
}

fn connect(s: &mut DiskSender, durable: u64, now: Instant) {
    s.handle_connected();
    assert!(matches!(s.poll_transmit(now), Some(Frame::Hello(_))));
    s.handle_frame(reply(durable), now).unwrap();
}

#[test]
fn fresh_sender_renumbers_after_the_peer_durable_sequence() {
    let now = Instant::now();
    let mut s = DiskSender::new(cfg(8), "a", D, 1 << 20, Generation(1));
    s.push_barrier(Consistency::NotConsistent, 0).unwrap();
    s.push_barrier(Consistency::NotConsistent, 0).unwrap();
    connect(&mut s, 41, now);
    assert_eq!(drain(&mut s, now), [42, 43]);
    assert_eq!(s.push_barrier(Consistency::NotConsistent, 0), Ok(Seq(44)));
}

#[test]
fn resized_sender_announces_the_new_size_and_keeps_what_it_holds() {
    let now = Instant::now();
    let mut s = DiskSender::new(cfg(8), "a", D, 1 << 20, Generation(1));
    connect(&mut s, 0, now);
    s.push_barrier(Consistency::NotConsistent, 0).unwrap();
    s.push_barrier(Consistency::NotConsistent, 0).unwrap();
    assert_eq!(drain(&mut s, now), [1, 2]);
    s.set_disk_size(2 << 20);
    s.handle_disconnected();
    s.handle_connected();
    let Some(Frame::Hello(h)) = s.poll_transmit(now) else {
        panic!("a reconnect starts with a hello");
    };
    assert_eq!(h.disk_size, 2 << 20);
    assert_eq!(h.oldest_held, Seq(1));
    s.handle_frame(reply(1), now).unwrap();
    assert_eq!(
        drain(&mut s, now),
        [2],
        "only what the peer lacks is resent"
    );
}

#[test]
fn full_window_hands_the_chunks_back_and_acks_free_it() {
    let now = Instant::now();
    let mut s = DiskSender::new(cfg(2), "a", D, 1 << 20, Generation(1));
    connect(&mut s, 0, now);
    s.push_batch(Vec::new()).unwrap();
    s.push_batch(Vec::new()).unwrap();
    let chunk = crate::chunk::build_chunk(0, &[1; 512], None).unwrap();
    let err = s.push_batch(vec![chunk.clone()]).unwrap_err();
    assert_eq!(err.error, PushError::WindowFull);
    assert_eq!(err.item, vec![chunk.clone()]);
    assert_eq!(drain(&mut s, now), [1, 2]);
    s.handle_frame(ack(1), now).unwrap();
    assert_eq!(s.unacked_frames(), 1);
    assert_eq!(s.push_batch(vec![chunk]), Ok(Seq(3)));
}

#[test]
fn reconnect_resends_only_what_the_peer_lacks() {
    let now = Instant::now();
    let mut s = DiskSender::new(cfg(8), "a", D, 1 << 20, Generation(1));
    connect(&mut s, 0, now);
    for _ in 0..4 {
        s.push_barrier(Consistency::NotConsistent, 0).unwrap();
    }
    assert_eq!(drain(&mut s, now), [1, 2, 3, 4]);
    s.handle_disconnected();
    s.handle_connected();
    let Some(Frame::Hello(h)) = s.poll_transmit(now) else {
        panic!("hello first");
    };
    assert_eq!((h.oldest_held, h.next_seq), (Seq(1), Seq(5)));
    s.handle_frame(reply(2), now).unwrap();
    assert_eq!(drain(&mut s, now), [3, 4]);
    assert_eq!(s.unacked_frames(), 2);
}

#[test]
fn silence_triggers_a_resend_and_a_gap_nack_goes_back() {
    let now = Instant::now();
    let mut s = DiskSender::new(cfg(8), "a", D, 1 << 20, Generation(1));
    connect(&mut s, 0, now);
    for _ in 0..3 {
        s.push_barrier(Consistency::NotConsistent, 0).unwrap();
    }
    assert_eq!(drain(&mut s, now), [1, 2, 3]);
    let later = s.poll_timeout().unwrap();
    s.handle_timeout(later);
    assert_eq!(drain(&mut s, later), [1, 2, 3]);
    s.handle_frame(
        Frame::Nack(Nack {
            disk: D,
            generation: Generation(1),
            seq: Seq(3),
            reason: RejectReason::Gap { expected: Seq(2) },
        }),
        later,
    )
    .unwrap();
    assert_eq!(drain(&mut s, later), [2, 3]);
}

#[test]
fn peer_that_lost_acked_data_forces_a_resync() {
    let now = Instant::now();
    let mut s = DiskSender::new(cfg(8), "a", D, 1 << 20, Generation(1));
    connect(&mut s, 0, now);
    for _ in 0..3 {
        s.push_barrier(Consistency::NotConsistent, 0).unwrap();
    }
    drain(&mut s, now);
    s.handle_frame(ack(2), now).unwrap();
    s.handle_disconnected();
    connect(&mut s, 1, now);
    let events: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
    assert!(
        events.contains(&SenderEvent::ResyncNeeded(ResyncReason::CannotResume {
            peer_durable: Seq(1),
            oldest_held: Seq(3),
        }))
    );
    assert_eq!(
        s.push_barrier(Consistency::NotConsistent, 0),
        Err(PushError::NeedsResync)
    );
    s.start_generation(Generation(2));
    assert_eq!(s.push_barrier(Consistency::NotConsistent, 0), Ok(Seq(2)));
}

#[test]
fn newer_peer_generation_forces_a_resync() {
    let now = Instant::now();
    let mut s = DiskSender::new(cfg(8), "a", D, 1 << 20, Generation(1));
    s.handle_connected();
    s.poll_transmit(now);
    let mut r = reply(5);
    if let Frame::HelloReply(h) = &mut r {
        h.generation = Generation(3);
    }
    s.handle_frame(r, now).unwrap();
    assert!(matches!(
        s.poll_event(),
        Some(SenderEvent::ResyncNeeded(
            ResyncReason::StaleGeneration { .. }
        ))
    ));
    s.start_generation(Generation(4));
    assert_eq!(s.push_barrier(Consistency::NotConsistent, 0), Ok(Seq(6)));
}

#[test]
fn peer_errors_surface_as_events() {
    let now = Instant::now();
    let mut s = DiskSender::new(cfg(8), "a", D, 1 << 20, Generation(1));
    s.handle_frame(
        Frame::Error(ErrorFrame {
            code: ErrorCode::NotAuthorized,
            disk: Some(D),
            message: "not your disk".into(),
        }),
        now,
    )
    .unwrap();
    assert!(matches!(
        s.poll_event(),
        Some(SenderEvent::PeerError {
            code: ErrorCode::NotAuthorized,
            ..
        })
    ));
}

#[test]
fn forwarder_skips_what_a_peer_already_has() {
    let now = Instant::now();
    let mut s = DiskSender::forwarding(cfg(8), "relay", D, 1 << 20, Generation(1));
    for q in 11..=13 {
        let f = Frame::Barrier(Barrier {
            disk: D,
            generation: Generation(1),
            seq: Seq(q),
            consistency: Consistency::NotConsistent,
            timestamp_ns: 0,
        });
        s.push_numbered(f).unwrap();
    }
    connect(&mut s, 20, now);
    assert_eq!(drain(&mut s, now), Vec::<u64>::new());
    assert_eq!(s.unacked_frames(), 0);
    assert_eq!(s.durable_seq(), Seq(20));
}
