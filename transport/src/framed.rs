//! proto frames over quinn streams. The frame header carries the length, and
//! the decoder refuses an oversized frame as soon as its header arrives, so a
//! peer can never make us buffer more than one maximal frame.

use blockferry_proto::frame::{HEADER_LEN, peek_header};
use blockferry_proto::{DecodeError, ErrorCode, ErrorFrame, Frame};
use bytes::{Bytes, BytesMut};

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FramedError {
    #[error("malformed frame from the peer: {0}")]
    Decode(#[from] DecodeError),
    #[error("stream ended in the middle of a frame ({0} bytes buffered)")]
    Truncated(usize),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("cannot encode frame: {0}")]
    Encode(String),
    #[error("stream already finished")]
    Closed,
}

impl FramedError {
    /// The error code to close the connection with.
    pub fn code(&self) -> ErrorCode {
        match self {
            FramedError::Decode(e) => e.code(),
            FramedError::Truncated(_) => ErrorCode::Protocol,
            _ => ErrorCode::Internal,
        }
    }

    /// Whether the peer is at fault (bad bytes) rather than the network.
    pub fn is_protocol_violation(&self) -> bool {
        matches!(self, FramedError::Decode(_) | FramedError::Truncated(_))
    }
}

/// Reads frames from a receive stream.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
}

/// Bytes read from the stream per call; large reads amortise the per-call cost.
const READ_CHUNK: usize = 256 << 10;

impl FrameReader {
    pub fn new(recv: quinn::RecvStream) -> Self {
        FrameReader {
            recv,
            buf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// The next frame and its encoded bytes (kept for spooling as received),
    /// or `None` at a clean end of stream.
    pub async fn next_raw(&mut self) -> Result<Option<(Frame, Bytes)>, FramedError> {
        loop {
            if let Some((_, len)) = peek_header(&self.buf)? {
                let total = HEADER_LEN + len;
                if self.buf.len() >= total {
                    let raw = self.buf.split_to(total).freeze();
                    let frame = Frame::decode_exact(raw.clone())?;
                    return Ok(Some((frame, raw)));
                }
                self.buf.reserve(total - self.buf.len());
            } else {
                self.buf.reserve(READ_CHUNK);
            }
            let want = self.buf.capacity() - self.buf.len();
            match self.recv.read_chunk(want.max(1), true).await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(FramedError::Truncated(self.buf.len())),
            }
        }
    }

    /// The next frame, or `None` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, FramedError> {
        Ok(self.next_raw().await?.map(|(f, _)| f))
    }
}

/// Writes frames to a send stream.
#[derive(Debug)]
pub struct FrameWriter {
    send: quinn::SendStream,
}

impl FrameWriter {
    pub fn new(send: quinn::SendStream) -> Self {
        FrameWriter { send }
    }

    /// Encodes and writes one frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<usize, FramedError> {
        let bytes = frame
            .to_bytes()
            .map_err(|e| FramedError::Encode(e.to_string()))?;
        self.send_raw(bytes).await
    }

    /// Writes an already encoded frame.
    pub async fn send_raw(&mut self, bytes: Bytes) -> Result<usize, FramedError> {
        let n = bytes.len();
        self.send.write_chunk(bytes).await?;
        Ok(n)
    }

    /// Finishes the stream (no more frames).
    pub fn finish(&mut self) -> Result<(), FramedError> {
        self.send.finish().map_err(|_| FramedError::Closed)
    }
}

/// Tells the peer why, then closes the whole connection with `code`: the one
/// way a stream's protocol violation ends, so nothing more of it is accepted.
pub async fn close_with_error(
    conn: &quinn::Connection,
    writer: Option<&mut FrameWriter>,
    code: ErrorCode,
    message: &str,
) {
    if let Some(w) = writer {
        let frame = Frame::Error(ErrorFrame {
            code,
            disk: None,
            message: message.chars().take(1024).collect(),
        });
        if let Err(e) = w.send(&frame).await {
            tracing::debug!(error = %e, "could not send the error frame before closing");
        }
    }
    conn.close(
        quinn::VarInt::from_u32(u32::from(code.as_u16())),
        message
            .as_bytes()
            .get(..message.len().min(256))
            .unwrap_or(b""),
    );
}
