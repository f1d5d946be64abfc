//! Checksum resync on files: the agent hashes its device with the reader,
//! compares against a replica's tree, ships only what differs, and the
//! replica ends up equal to the source.

mod reader_support;

use std::collections::VecDeque;
use std::io::Write;

use blockferry_agent::reader::{ReaderConfig, ReaderEvent};
use blockferry_agent::resync::{self, HashExchange, ResyncError};
use blockferry_proto::frame::{HashRangeReply, HashRangeRequest};
use blockferry_proto::hashtree::{Comparer, ComparerLimits, Responder, TreeShape};
use blockferry_proto::ids::{DiskId, Generation};
use reader_support::mixed_data;

fn temp_file(data: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(data).expect("write temp file");
    f
}

/// The replica's side in memory; replies come back newest first to show
/// that the order of replies does not matter.
struct InMemoryPeer {
    responder: Responder,
    replies: VecDeque<HashRangeReply>,
}

impl HashExchange for InMemoryPeer {
    async fn send(&mut self, request: HashRangeRequest) -> Result<(), ResyncError> {
        let reply = self
            .responder
            .handle_request(&request)
            .map_err(|e| ResyncError::Exchange(e.to_string()))?;
        self.replies.push_front(reply);
        Ok(())
    }

    async fn recv(&mut self) -> Result<HashRangeReply, ResyncError> {
        self.replies
            .pop_front()
            .ok_or_else(|| ResyncError::Exchange("no reply pending".into()))
    }
}

/// Compares `source` against `replica`, ships the differing ranges read by
/// the reader into the replica, and returns the plan.
async fn resync_files(source: &[u8], replica: &mut Vec<u8>) -> resync::ResyncPlan {
    let shape = TreeShape::new(65536, 64).unwrap();
    let src = temp_file(source);
    let dst = temp_file(replica);
    let config = ReaderConfig::default();
    let local = resync::local_tree_async(src.path().to_owned(), shape, config.clone())
        .await
        .unwrap();
    let responder = tokio::task::spawn_blocking({
        let path = dst.path().to_owned();
        move || resync::local_responder(&path, shape, &config).unwrap()
    })
    .await
    .unwrap();
    let comparer = Comparer::new(
        local,
        replica.len() as u64,
        DiskId::from_bytes([1; 16]),
        Generation(1),
        ComparerLimits::default(),
    );
    let mut peer = InMemoryPeer {
        responder,
        replies: VecDeque::new(),
    };
    let plan = resync::compare(comparer, &mut peer).await.unwrap();

    // Ship: read exactly the planned ranges and apply them to the replica.
    replica.resize(source.len(), 0);
    let ranges: Vec<(u64, u64)> = plan.ranges.iter().map(|r| (r.offset, r.len)).collect();
    let results = tokio::task::spawn_blocking({
        let path = src.path().to_owned();
        move || {
            let (handle, mut events) =
                blockferry_agent::reader::spawn(&path, &ReaderConfig::default()).unwrap();
            for (o, l) in ranges {
                handle.submit(o, l).unwrap();
            }
            handle.close();
            let mut chunks = Vec::new();
            while let Some(ev) = events.blocking_next() {
                match ev {
                    ReaderEvent::Chunk { chunk, .. } => chunks.push(chunk),
                    ReaderEvent::RangeDone { ok, .. } => assert!(ok),
                    other => panic!("unexpected {other:?}"),
                }
            }
            chunks
        }
    })
    .await
    .unwrap();
    let mut shipped = 0u64;
    for c in results {
        let plain = reader_support::plain(&c);
        replica[c.offset as usize..c.offset as usize + plain.len()].copy_from_slice(&plain);
        shipped += u64::from(c.len);
    }
    assert_eq!(shipped, plan.bytes, "the reader read exactly the plan");
    plan
}

#[tokio::test]
async fn only_changed_chunks_are_shipped_and_the_replica_converges() {
    let source = mixed_data(16 * 1024 * 1024 + 4321, 21);
    let mut replica = source.clone();
    let changed = [0usize, 3, 100, 101, 255];
    for &c in &changed {
        replica[c * 65536 + 9] ^= 0xff;
    }
    let plan = resync_files(&source, &mut replica).await;
    assert!(replica == source, "replica differs after resync");
    assert_eq!(plan.bytes, changed.len() as u64 * 65536);
    // 257 chunks, fan-out 64: three levels, one round-trip each.
    assert_eq!(plan.stats.requests, 3);
}

#[tokio::test]
async fn equal_copies_cost_one_round_trip_and_ship_nothing() {
    let source = mixed_data(5 * 1024 * 1024, 22);
    let mut replica = source.clone();
    let plan = resync_files(&source, &mut replica).await;
    assert!(plan.ranges.is_empty());
    assert_eq!(plan.stats.messages(), 2);
}

#[tokio::test]
async fn grown_source_ships_the_old_tail_and_the_new_space() {
    let source = mixed_data(3 * 1024 * 1024, 23);
    let mut replica = source[..2 * 1024 * 1024 + 1000].to_vec();
    let plan = resync_files(&source, &mut replica).await;
    assert!(replica == source);
    // The old short last chunk (index 32) and everything after it.
    assert_eq!(plan.ranges.len(), 1);
    assert_eq!(plan.ranges[0].offset, 32 * 65536);
    assert_eq!(plan.bytes, source.len() as u64 - 32 * 65536);
}
