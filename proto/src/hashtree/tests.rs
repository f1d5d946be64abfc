use super::*;

const CS: u64 = 4096;

fn shape(fanout: u32) -> TreeShape {
    TreeShape::new(CS, fanout).unwrap()
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
fn random_disk(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

struct Outcome {
    chunks: Vec<Range<u64>>,
    bytes: Vec<ByteRange>,
    stats: ExchangeStats,
}

/// Runs a whole resync in memory, with requests answered in reverse order
/// of sending to show that replies may come back in any order.
fn resync(local: &[u8], remote: &[u8], fanout: u32, limits: ComparerLimits) -> Outcome {
    let s = shape(fanout);
    let mut cmp = Comparer::new(
        HashTree::from_bytes(s, local).unwrap(),
        remote.len() as u64,
        DiskId::from_bytes([7; 16]),
        Generation(3),
        limits,
    );
    let mut resp = Responder::new(HashTree::from_bytes(s, remote).unwrap());
    let mut guard = 0;
    while !cmp.is_done() {
        let mut batch = Vec::new();
        while let Some(req) = cmp.poll_request() {
            batch.push(req);
        }
        assert!(!batch.is_empty(), "comparer stalled");
        for req in batch.iter().rev() {
            let reply = resp.handle_request(req).unwrap();
            cmp.handle_reply(&reply).unwrap();
        }
        guard += 1;
        assert!(guard < 10_000);
    }
    assert_eq!(resp.stats().messages(), cmp.stats().messages());
    assert_eq!(resp.stats().bytes(), cmp.stats().bytes());
    Outcome {
        chunks: cmp.differing_chunks(),
        bytes: cmp.differing_bytes(),
        stats: cmp.stats(),
    }
}

fn chunks_differing(a: &[u8], b: &[u8]) -> Vec<u64> {
    let n = a.len().max(b.len()).div_ceil(CS as usize);
    (0..n as u64)
        .filter(|&i| {
            let r = (i * CS) as usize..((i + 1) * CS) as usize;
            let ca = &a[r.start.min(a.len())..r.end.min(a.len())];
            let cb = &b[r.start.min(b.len())..r.end.min(b.len())];
            ca != cb
        })
        .collect()
}

fn flatten(ranges: &[Range<u64>]) -> Vec<u64> {
    ranges.iter().flat_map(|r| r.clone()).collect()
}

#[test]
fn equal_disks_take_one_round_trip() {
    let d = random_disk(1000 * CS as usize + 123, 1);
    let o = resync(&d, &d, 64, ComparerLimits::default());
    assert!(o.chunks.is_empty());
    assert_eq!(o.stats.requests, 1);
    assert_eq!(o.stats.replies, 1);
}

#[test]
fn few_changed_chunks_are_found_exactly_with_logarithmic_messages() {
    let n = 5000u64;
    let a = random_disk((n * CS) as usize, 2);
    let mut b = a.clone();
    let changed = [0u64, 17, 18, 2500, 4095, 4999];
    for &c in &changed {
        // One byte is enough to change a chunk's hash.
        b[(c * CS + 100) as usize] ^= 0x5a;
    }
    for fanout in [2u32, 16, 64] {
        let o = resync(&a, &b, fanout, ComparerLimits::default());
        assert_eq!(flatten(&o.chunks), changed, "fanout {fanout}");
        let height = shape(fanout).height(n) as u64;
        // One round-trip per level: each level fits in one request.
        assert_eq!(o.stats.requests, height + 1, "fanout {fanout}");
        // Descending only into differing nodes: at most k·F per level.
        assert!(
            o.stats.ranges_asked <= 1 + changed.len() as u64 * u64::from(fanout) * height,
            "fanout {fanout}: {} ranges",
            o.stats.ranges_asked
        );
        let bytes_sent: u64 = o.bytes.iter().map(|r| r.len).sum();
        assert_eq!(bytes_sent, changed.len() as u64 * CS);
    }
}

#[test]
fn small_request_limit_still_finds_everything_in_o_k_log_n_messages() {
    let n = 4096u64;
    let a = random_disk((n * CS) as usize, 3);
    let mut b = a.clone();
    let changed: Vec<u64> = (0..40).map(|i| i * 97 + 5).collect();
    for &c in &changed {
        b[(c * CS) as usize] ^= 1;
    }
    let limits = ComparerLimits {
        max_ranges: 8,
        max_outstanding: 3,
    };
    let o = resync(&a, &b, 8, limits);
    assert_eq!(flatten(&o.chunks), changed);
    let k = changed.len() as u64;
    let levels = u64::from(shape(8).height(n)) + 1;
    // Each differing node costs at most F ranges, i.e. one request of 8.
    assert!(o.stats.messages() <= 2 * (1 + k * levels), "{:?}", o.stats);
}

#[test]
fn grown_disk_sends_the_old_tail_chunk_and_the_new_space() {
    // Remote (replica) is the old size, local (source) has grown and its
    // old last chunk, which was short, is now full.
    let local = random_disk((300 * CS) as usize, 4);
    let old_len = 200 * CS as usize + 1000;
    let remote = local[..old_len].to_vec();
    let o = resync(&local, &remote, 16, ComparerLimits::default());
    assert_eq!(flatten(&o.chunks), chunks_differing(&local, &remote));
    assert_eq!(o.chunks, vec![200..300]);
    assert_eq!(
        o.bytes,
        vec![ByteRange {
            offset: 200 * CS,
            len: 100 * CS
        }]
    );
}

#[test]
fn shrunk_disk_reports_remote_excess_but_sends_nothing_past_local_end() {
    let remote = random_disk((130 * CS) as usize, 5);
    let local = remote[..(100 * CS) as usize].to_vec();
    let o = resync(&local, &remote, 4, ComparerLimits::default());
    assert_eq!(o.chunks, vec![100..130]);
    assert!(o.bytes.is_empty());
}

#[test]
fn random_differences_match_a_direct_comparison() {
    for seed in 0..20u64 {
        let n = 50 + (seed * 37) % 700;
        let a = random_disk((n * CS) as usize - (seed as usize * 13) % 4096, seed + 10);
        let mut b = a.clone();
        let mut x = seed * 7919 + 1;
        for _ in 0..(seed % 9) {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let pos = (x >> 20) as usize % b.len();
            b[pos] = b[pos].wrapping_add(1);
        }
        let o = resync(&a, &b, 2 + (seed as u32 % 10), ComparerLimits::default());
        assert_eq!(flatten(&o.chunks), chunks_differing(&a, &b), "seed {seed}");
    }
}

#[test]
fn empty_disks_need_no_message_and_empty_remote_takes_all() {
    let o = resync(&[], &[], 64, ComparerLimits::default());
    assert!(o.chunks.is_empty());
    assert_eq!(o.stats.messages(), 0);
    let local = random_disk(10 * CS as usize, 6);
    let o = resync(&local, &[], 64, ComparerLimits::default());
    assert_eq!(o.chunks, vec![0..10]);
    assert_eq!(o.stats.requests, 1);
}

#[test]
fn responder_refuses_ranges_that_are_not_nodes() {
    let s = shape(64);
    let mut r = Responder::new(HashTree::from_bytes(s, &random_disk(8192, 1)).unwrap());
    let req = HashRangeRequest {
        disk: DiskId::default(),
        generation: Generation(0),
        request_id: 1,
        ranges: vec![ByteRange {
            offset: 100,
            len: CS,
        }],
    };
    assert!(matches!(
        r.handle_request(&req),
        Err(HashTreeError::NotANode { offset: 100, .. })
    ));
    let req = HashRangeRequest {
        ranges: vec![ByteRange {
            offset: u64::MAX - 1,
            len: u64::MAX,
        }],
        ..req
    };
    assert!(r.handle_request(&req).is_err());
}

#[test]
fn unknown_or_malformed_replies_are_errors_not_losses() {
    let s = shape(4);
    let d = random_disk(64 * CS as usize, 9);
    let mut cmp = Comparer::new(
        HashTree::from_bytes(s, &d).unwrap(),
        d.len() as u64,
        DiskId::default(),
        Generation(1),
        ComparerLimits::default(),
    );
    let req = cmp.poll_request().unwrap();
    let bad = HashRangeReply {
        disk: req.disk,
        generation: req.generation,
        request_id: req.request_id + 1,
        digests: vec![],
    };
    assert_eq!(
        cmp.handle_reply(&bad),
        Err(HashTreeError::UnknownRequest(req.request_id + 1))
    );
    let short = HashRangeReply {
        request_id: req.request_id,
        ..bad
    };
    assert!(cmp.handle_reply(&short).is_err());
    // The request's nodes are queued again, not dropped.
    assert!(!cmp.is_done());
    assert_eq!(cmp.poll_request().unwrap().ranges, req.ranges);
}

#[test]
fn a_million_chunks_with_ten_changes_take_five_round_trips() {
    // Leaves only (no disk bytes): 1,000,000 chunks of 64 KiB = 61 GiB.
    let s = TreeShape::new(65536, 64).unwrap();
    let n = 1_000_000u64;
    let leaves: Vec<Hash> = (0..n)
        .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
        .collect();
    let mut other = leaves.clone();
    let changed: Vec<u64> = (0..10).map(|i| i * 99_991 + 7).collect();
    for &c in &changed {
        other[c as usize][0] ^= 1;
    }
    let size = n * 65536;
    let mut cmp = Comparer::new(
        HashTree::new(s, size, leaves).unwrap(),
        size,
        DiskId::default(),
        Generation(1),
        ComparerLimits::default(),
    );
    let mut resp = Responder::new(HashTree::new(s, size, other).unwrap());
    while let Some(req) = cmp.poll_request() {
        let reply = resp.handle_request(&req).unwrap();
        cmp.handle_reply(&reply).unwrap();
    }
    assert!(cmp.is_done());
    assert_eq!(flatten(&cmp.differing_chunks()), changed);
    // Height 4 (64^4 > 10^6): one round-trip per level.
    assert_eq!(cmp.stats().requests, 5);
    // About 2.6 k digests instead of a million leaf hashes.
    assert!(cmp.stats().ranges_asked <= 1 + 4 * 10 * 64);
    assert!(cmp.stats().bytes() < 200_000, "{:?}", cmp.stats());
}

proptest::proptest! {
    #[test]
    fn node_ranges_round_trip(level in 0u8..8, index in 0u64..1 << 30, fanout in 2u32..300) {
        let s = TreeShape::new(4096, fanout).unwrap();
        let node = NodeId { level, index };
        if let Some(r) = s.byte_range(node) {
            proptest::prop_assert_eq!(s.node_of(r), Some(node));
        }
    }

    #[test]
    fn responder_never_panics_on_any_range(offset: u64, len: u64, fanout in 2u32..100) {
        let s = TreeShape::new(4096, fanout).unwrap();
        let mut r = Responder::new(HashTree::from_bytes(s, &random_disk(50_000, 3)).unwrap());
        let req = HashRangeRequest {
            disk: DiskId::default(),
            generation: Generation(0),
            request_id: 0,
            ranges: vec![ByteRange { offset, len }],
        };
        if let Ok(reply) = r.handle_request(&req) {
            proptest::prop_assert_eq!(reply.digests.len(), 1);
            proptest::prop_assert!(reply.digests[0].range.len <= len);
        }
    }
}
