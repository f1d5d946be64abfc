//! Fuzz the frame decoder: it never panics on any input, whatever it accepts
//! encodes back to the same bytes, and verifying the chunks of an accepted
//! batch never panics either (zstd payloads are bounded by the plain length).
#![no_main]

use blockferry_proto::{Frame, verify_chunk};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Streamed decoding: consume frames until the buffer runs dry or errs.
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = Frame::decode_buf(&mut buf) {}

    let Ok(Some((frame, used))) = Frame::decode(data) else {
        return;
    };
    let again = frame.to_bytes().expect("a decoded frame encodes");
    assert_eq!(&again[..], &data[..used]);
    assert_eq!(
        Frame::decode_exact(Bytes::copy_from_slice(&data[..used])),
        Ok(frame.clone())
    );
    if let Frame::Batch(b) = &frame {
        for c in &b.chunks {
            let _ = verify_chunk(c);
        }
    }
});
