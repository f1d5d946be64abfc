//! Fuzz the control socket's request and reply decoders: they never panic,
//! and an accepted request encodes to a line that decodes to the same request.
#![no_main]

use blockferry_target::control::{decode_reply, decode_request, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_reply(data);
    let Ok(req) = decode_request(data) else {
        return;
    };
    let line = encode(&req);
    let again = decode_request(line.strip_suffix(b"\n").unwrap_or(&line))
        .expect("an encoded request decodes");
    assert_eq!(again, req);
});
