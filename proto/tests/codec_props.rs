//! Property tests of the frame codec: every valid frame round-trips, and no
//! input, however mangled, makes the decoder panic.

use blockferry_proto::frame::{MAX_ERROR_MESSAGE_LEN, MAX_PAYLOAD_LEN};
use blockferry_proto::*;
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

mod common;

use common::{chunk, frame};

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_valid_frame_round_trips(f in frame()) {
        let bytes = f.to_bytes().expect("generated frames are within limits");
        prop_assert_eq!(bytes.len(), f.encoded_len());
        let (back, used) = Frame::decode(&bytes).expect("decodes").expect("complete");
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(&back, &f);
        prop_assert_eq!(Frame::decode_exact(bytes.clone()), Ok(f.clone()));
        let mut buf = BytesMut::from(&bytes[..]);
        prop_assert_eq!(Frame::decode_buf(&mut buf), Ok(Some(f)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn every_prefix_of_a_frame_asks_for_more(f in frame(), cut in any::<prop::sample::Index>()) {
        let bytes = f.to_bytes().expect("generated frames are within limits");
        let cut = cut.index(bytes.len());
        prop_assert_eq!(Frame::decode(&bytes[..cut]), Ok(None));
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Frame::decode(&data);
        let _ = Frame::decode_exact(Bytes::from(data.clone()));
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = Frame::decode_buf(&mut buf) {}
    }

    #[test]
    fn decoding_mutated_frames_never_panics_and_reencodes(
        f in frame(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = f.to_bytes().expect("generated frames are within limits").to_vec();
        for (i, v) in flips {
            let i = i.index(bytes.len());
            bytes[i] = v;
        }
        // Whatever decodes must be a frame we would send ourselves.
        if let Ok(Some((back, used))) = Frame::decode(&bytes) {
            let again = back.to_bytes().expect("decoded frames encode");
            prop_assert_eq!(&again[..], &bytes[..used]);
        }
    }

    #[test]
    fn verify_chunk_never_panics(c in chunk()) {
        let _ = verify_chunk(&c);
    }

    #[test]
    fn built_chunks_verify(data in proptest::collection::vec(0u8..3, 1..5000), level in proptest::option::of(1i32..4)) {
        let c = build_chunk(512, &data, level).expect("length in range");
        let f = Frame::Batch(ExtentBatch { disk: DiskId::default(), generation: Generation(1), seq: Seq(1), chunks: vec![c.clone()] });
        let bytes = f.to_bytes().expect("within limits");
        let Some((Frame::Batch(b), _)) = Frame::decode(&bytes).expect("decodes") else {
            panic!("not a batch");
        };
        prop_assert_eq!(verify_chunk(&b.chunks[0]).expect("verifies").to_bytes(), &data[..]);
    }
}

#[test]
fn limits_are_enforced_on_encode() {
    let long = Frame::Error(ErrorFrame {
        code: ErrorCode::Internal,
        disk: None,
        message: "x".repeat(MAX_ERROR_MESSAGE_LEN + 1),
    });
    assert!(long.to_bytes().is_err());
    let chunk = Chunk {
        offset: 0,
        len: 1 << 20,
        hash: [0; 32],
        encoding: Encoding::Raw,
        payload: Bytes::from(vec![0u8; 1 << 20]),
    };
    let big = Frame::Batch(ExtentBatch {
        disk: DiskId::default(),
        generation: Generation(1),
        seq: Seq(1),
        chunks: vec![chunk; 17],
    });
    let fits = Frame::Batch(ExtentBatch {
        disk: DiskId::default(),
        generation: Generation(1),
        seq: Seq(1),
        chunks: (0..frame::MAX_CHUNKS_PER_BATCH as u64)
            .map(|i| Chunk {
                offset: i * 4096,
                len: 4096,
                hash: [0; 32],
                encoding: Encoding::Raw,
                payload: Bytes::from(vec![1u8; 4096]),
            })
            .collect(),
    });
    assert_eq!(frame::MAX_CHUNKS_PER_BATCH * 4096, frame::MAX_BATCH_DATA);
    assert!(
        fits.to_bytes().is_ok(),
        "a full batch within the documented limits fits"
    );
    assert!(big.encoded_len() > MAX_PAYLOAD_LEN);
    assert!(matches!(
        big.to_bytes(),
        Err(EncodeError::Invalid(DecodeError::FrameTooLarge { .. }))
    ));
}
