//! Proptest strategies shared by the property tests.

#![allow(dead_code)]

use blockferry_proto::*;
use bytes::Bytes;
use proptest::prelude::*;

pub fn disk() -> impl Strategy<Value = DiskId> {
    any::<[u8; 16]>().prop_map(DiskId)
}

pub fn chunk() -> impl Strategy<Value = Chunk> {
    (
        any::<u32>(),
        prop_oneof![
            Just(Encoding::Raw),
            Just(Encoding::Zstd),
            Just(Encoding::Zero)
        ],
        proptest::collection::vec(any::<u8>(), 1..300),
        any::<[u8; 32]>(),
    )
        .prop_map(|(off, encoding, data, hash)| {
            // Offsets near the top of the range exercise overflow checks.
            let offset = u64::from(off) << 9;
            let (len, payload) = match encoding {
                Encoding::Raw => (data.len() as u32, Bytes::from(data)),
                Encoding::Zstd => (4096, Bytes::from(data)),
                Encoding::Zero => (data.len() as u32 * 512, Bytes::new()),
            };
            Chunk {
                offset,
                len,
                hash,
                encoding,
                payload,
            }
        })
}

pub fn range() -> impl Strategy<Value = ByteRange> {
    (any::<u64>(), any::<u64>()).prop_map(|(offset, len)| ByteRange { offset, len })
}

pub fn frame() -> impl Strategy<Value = Frame> {
    let g = any::<u64>().prop_map(Generation);
    let s = any::<u64>().prop_map(Seq);
    prop_oneof![
        (
            "[a-z0-9.-]{0,64}",
            disk(),
            any::<u64>(),
            g.clone(),
            s.clone(),
            s.clone()
        )
            .prop_map(
                |(agent, disk, disk_size, generation, oldest_held, next_seq)| {
                    Frame::Hello(Hello {
                        agent,
                        disk,
                        disk_size,
                        generation,
                        oldest_held,
                        next_seq,
                    })
                }
            ),
        (disk(), g.clone(), s.clone(), s.clone()).prop_map(
            |(disk, generation, durable_seq, replica_seq)| {
                Frame::HelloReply(HelloReply {
                    disk,
                    generation,
                    durable_seq,
                    replica_seq,
                })
            },
        ),
        (
            disk(),
            g.clone(),
            s.clone(),
            proptest::collection::vec(chunk(), 0..8)
        )
            .prop_map(|(disk, generation, seq, chunks)| Frame::Batch(ExtentBatch {
                disk,
                generation,
                seq,
                chunks
            })),
        (
            disk(),
            g.clone(),
            s.clone(),
            prop_oneof![
                Just(Consistency::NotConsistent),
                Just(Consistency::CrashConsistent),
                Just(Consistency::AppConsistent)
            ],
            any::<u64>()
        )
            .prop_map(|(disk, generation, seq, consistency, timestamp_ns)| {
                Frame::Barrier(Barrier {
                    disk,
                    generation,
                    seq,
                    consistency,
                    timestamp_ns,
                })
            }),
        (disk(), g.clone(), s.clone(), s.clone()).prop_map(
            |(disk, generation, durable_seq, replica_seq)| {
                Frame::Ack(Ack {
                    disk,
                    generation,
                    durable_seq,
                    replica_seq,
                })
            },
        ),
        (disk(), g.clone(), s.clone(), 0u16..5, any::<u64>()).prop_map(
            |(disk, generation, seq, code, arg)| {
                let reason = match code {
                    0 => RejectReason::HashMismatch { offset: arg },
                    1 => RejectReason::BadPayload { offset: arg },
                    2 => RejectReason::OutOfRange { offset: arg },
                    3 => RejectReason::StaleGeneration {
                        current: Generation(arg),
                    },
                    _ => RejectReason::Gap { expected: Seq(arg) },
                };
                Frame::Nack(Nack {
                    disk,
                    generation,
                    seq,
                    reason,
                })
            }
        ),
        (
            disk(),
            g.clone(),
            any::<u64>(),
            proptest::collection::vec(range(), 0..40)
        )
            .prop_map(|(disk, generation, request_id, ranges)| {
                Frame::HashRequest(HashRangeRequest {
                    disk,
                    generation,
                    request_id,
                    ranges,
                })
            }),
        (
            disk(),
            g,
            any::<u64>(),
            proptest::collection::vec((range(), any::<[u8; 32]>()), 0..40)
        )
            .prop_map(|(disk, generation, request_id, d)| {
                Frame::HashReply(HashRangeReply {
                    disk,
                    generation,
                    request_id,
                    digests: d
                        .into_iter()
                        .map(|(range, digest)| RangeDigest { range, digest })
                        .collect(),
                })
            }),
        (1u16..=12, proptest::option::of(disk()), "\\PC{0,80}").prop_map(
            |(code, disk, message)| {
                Frame::Error(ErrorFrame {
                    code: ErrorCode::from_u16(code).expect("codes 1..=12 exist"),
                    disk,
                    message,
                })
            }
        ),
    ]
}
