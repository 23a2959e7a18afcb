//! gRPC length-prefixed frames: one flag byte, a 4-byte big-endian payload
//! length, then the payload.
//!
//! The same envelope carries gRPC and grpc-web messages (flag bit 0:
//! compressed), the grpc-web trailer block (flag `0x80`) and Connect's
//! streaming messages (flag `0x02`: end of stream).
//!
//! Two readers, both refusing an oversized frame as soon as its header is
//! seen, before a byte of its payload is held:
//! - [`FrameDecoder`] hands out whole frames, for bodies the gateway
//!   transforms (grpc-web-text, Connect streaming).
//! - [`FrameLimiter`] only checks lengths and copies nothing, for bodies
//!   passed through unchanged.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::CodecError;

/// Length of a frame header: the flag byte and the 4-byte length.
pub const FRAME_HEADER_LEN: usize = 5;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The flag byte: `0x01` compressed, `0x80` grpc-web trailers, `0x02`
    /// Connect end of stream.
    pub flags: u8,
    /// The payload, without the header.
    pub payload: Bytes,
}

/// Encodes one frame: header then payload.
///
/// A payload of 4 GiB or more cannot be described by the 4-byte length; its
/// length is then written as `u32::MAX` (callers bound messages far below
/// that).
pub fn encode_frame(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + payload.len());
    out.put_u8(flags);
    // Saturating rather than truncating: a wrong-but-huge length makes the
    // peer refuse the frame instead of misreading the stream.
    out.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(payload);
    out.freeze()
}

/// Reads a header's payload length.
fn declared_len(header: &[u8; FRAME_HEADER_LEN]) -> u32 {
    u32::from_be_bytes([header[1], header[2], header[3], header[4]])
}

/// Checks a declared length against the limit.
fn check_len(declared: u32, max_payload: usize) -> Result<usize, CodecError> {
    match usize::try_from(declared) {
        Ok(len) if len <= max_payload => Ok(len),
        _ => Err(CodecError::TooLarge {
            declared: u64::from(declared),
            max: max_payload,
        }),
    }
}

/// Incremental frame decoder: push body chunks as they arrive, pull whole
/// frames out.
///
/// Chunks are kept as they came (no copy); a frame that lies inside one
/// chunk is handed out as a slice of it, one that straddles chunks is copied
/// once. A frame whose declared length exceeds `max_payload` is refused as
/// soon as its header is complete; the error is sticky (every later call
/// returns it) and the decoder drops everything it holds, so a hostile
/// length prefix never makes it buffer more.
///
/// After every frame has been pulled out, at most `FRAME_HEADER_LEN +
/// max_payload - 1` bytes stay buffered (one incomplete frame).
#[derive(Debug)]
pub struct FrameDecoder {
    max_payload: usize,
    chunks: VecDeque<Bytes>,
    buffered: usize,
    failed: Option<CodecError>,
}

impl FrameDecoder {
    /// A decoder refusing frames whose payload exceeds `max_payload` bytes.
    pub fn new(max_payload: usize) -> Self {
        Self {
            max_payload,
            chunks: VecDeque::new(),
            buffered: 0,
            failed: None,
        }
    }

    /// Appends a chunk of the body (copied; see [`push_bytes`](Self::push_bytes)
    /// to hand over an owned chunk without a copy).
    pub fn push(&mut self, chunk: &[u8]) {
        if !chunk.is_empty() {
            self.push_bytes(Bytes::copy_from_slice(chunk));
        }
    }

    /// Appends a chunk of the body without copying it.
    pub fn push_bytes(&mut self, chunk: Bytes) {
        // After a failure nothing more is kept: the body is being refused.
        if chunk.is_empty() || self.failed.is_some() {
            return;
        }
        self.buffered += chunk.len();
        self.chunks.push_back(chunk);
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed, or the
    /// (sticky) error.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, CodecError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let Some(header) = self.peek_header() else {
            return Ok(None);
        };
        let len = match check_len(declared_len(&header), self.max_payload) {
            Ok(len) => len,
            Err(error) => {
                self.chunks.clear();
                self.buffered = 0;
                self.failed = Some(error.clone());
                return Err(error);
            }
        };
        let total = FRAME_HEADER_LEN + len;
        if self.buffered < total {
            return Ok(None);
        }
        let mut frame = self.take(total);
        frame.advance(FRAME_HEADER_LEN);
        Ok(Some(Frame {
            flags: header[0],
            payload: frame,
        }))
    }

    /// Call at the end of the body, after pulling every frame out: an
    /// incomplete frame left over is [`CodecError::Truncated`].
    pub fn finish(&self) -> Result<(), CodecError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        if self.buffered == 0 {
            Ok(())
        } else {
            Err(CodecError::Truncated)
        }
    }

    /// Bytes held that are not yet part of a returned frame.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// The first `FRAME_HEADER_LEN` buffered bytes, if that many are held.
    fn peek_header(&self) -> Option<[u8; FRAME_HEADER_LEN]> {
        if self.buffered < FRAME_HEADER_LEN {
            return None;
        }
        let mut header = [0u8; FRAME_HEADER_LEN];
        let mut filled = 0;
        for chunk in &self.chunks {
            let n = chunk.len().min(FRAME_HEADER_LEN - filled);
            header[filled..filled + n].copy_from_slice(&chunk[..n]);
            filled += n;
            if filled == FRAME_HEADER_LEN {
                return Some(header);
            }
        }
        None
    }

    /// Removes the first `n` buffered bytes (`n <= buffered`): a slice of the
    /// front chunk when it holds them all, else one copy.
    fn take(&mut self, n: usize) -> Bytes {
        self.buffered -= n;
        if let Some(front) = self.chunks.front_mut()
            && front.len() >= n
        {
            let out = front.split_to(n);
            if front.is_empty() {
                self.chunks.pop_front();
            }
            return out;
        }
        let mut out = BytesMut::with_capacity(n);
        while out.len() < n {
            let Some(front) = self.chunks.front_mut() else {
                // Unreachable while `buffered` is kept exact; stop rather
                // than loop.
                break;
            };
            let want = n - out.len();
            if front.len() <= want {
                out.put_slice(front);
                self.chunks.pop_front();
            } else {
                out.put_slice(&front.split_to(want));
            }
        }
        out.freeze()
    }
}

/// Zero-copy frame length checker for bodies passed through unchanged.
///
/// Feed it every chunk before forwarding the chunk; it tracks the bytes left
/// in the current frame and parses headers that straddle chunks, holding at
/// most 4 header bytes. The error is sticky.
#[derive(Debug)]
pub struct FrameLimiter {
    max_payload: usize,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    remaining: usize,
    frames: u64,
    failed: Option<CodecError>,
}

impl FrameLimiter {
    /// A checker refusing frames whose payload exceeds `max_payload` bytes.
    pub fn new(max_payload: usize) -> Self {
        Self {
            max_payload,
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            remaining: 0,
            frames: 0,
            failed: None,
        }
    }

    /// Checks the next chunk of the body.
    pub fn check(&mut self, chunk: &[u8]) -> Result<(), CodecError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let mut rest = chunk;
        while !rest.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(rest.len());
                self.remaining -= n;
                rest = &rest[n..];
                continue;
            }
            let n = (FRAME_HEADER_LEN - self.header_len).min(rest.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&rest[..n]);
            self.header_len += n;
            rest = &rest[n..];
            if self.header_len == FRAME_HEADER_LEN {
                self.header_len = 0;
                match check_len(declared_len(&self.header), self.max_payload) {
                    Ok(len) => {
                        self.remaining = len;
                        self.frames += 1;
                    }
                    Err(error) => {
                        self.failed = Some(error.clone());
                        return Err(error);
                    }
                }
            }
        }
        Ok(())
    }

    /// Call at the end of the body: a frame or header left incomplete is
    /// [`CodecError::Truncated`].
    pub fn finish(&self) -> Result<(), CodecError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        if self.header_len == 0 && self.remaining == 0 {
            Ok(())
        } else {
            Err(CodecError::Truncated)
        }
    }

    /// Frame headers seen so far (complete headers, whose payload may still
    /// be arriving).
    pub fn frames(&self) -> u64 {
        self.frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(decoder: &mut FrameDecoder) -> Result<Vec<Frame>, CodecError> {
        let mut frames = Vec::new();
        while let Some(frame) = decoder.next_frame()? {
            frames.push(frame);
        }
        Ok(frames)
    }

    fn body(frames: &[(u8, &[u8])]) -> Vec<u8> {
        frames
            .iter()
            .flat_map(|(flags, payload)| encode_frame(*flags, payload).to_vec())
            .collect()
    }

    #[test]
    fn encode_frame_writes_flag_big_endian_length_and_payload() {
        assert_eq!(&encode_frame(0x80, b"ab")[..], b"\x80\x00\x00\x00\x02ab");
        assert_eq!(&encode_frame(0, b"")[..], b"\x00\x00\x00\x00\x00");
        let big = vec![7u8; 0x01_0203];
        let frame = encode_frame(1, &big);
        assert_eq!(&frame[..5], &[1, 0, 0x01, 0x02, 0x03]);
        assert_eq!(frame.len(), 5 + big.len());
    }

    #[test]
    fn decodes_several_frames_from_one_chunk_without_copying() {
        let input = Bytes::from(body(&[
            (0, b"hello"),
            (0x80, b"grpc-status:0\r\n"),
            (0, b""),
        ]));
        let mut decoder = FrameDecoder::new(100);
        decoder.push_bytes(input.clone());
        let frames = drain(&mut decoder).expect("valid frames");
        assert_eq!(frames.len(), 3);
        assert_eq!(
            frames[0],
            Frame {
                flags: 0,
                payload: Bytes::from_static(b"hello")
            }
        );
        assert_eq!(frames[1].flags, 0x80);
        assert_eq!(&frames[1].payload[..], b"grpc-status:0\r\n");
        assert!(frames[2].payload.is_empty());
        // Zero copy: the payload points into the pushed chunk.
        let start = input.as_ptr() as usize;
        let payload = frames[0].payload.as_ptr() as usize;
        assert_eq!(payload, start + FRAME_HEADER_LEN);
        assert_eq!(decoder.buffered(), 0);
        decoder.finish().expect("nothing left over");
    }

    #[test]
    fn a_frame_split_at_every_byte_boundary_decodes_the_same() {
        let input = body(&[(0, b"first message"), (1, b"x"), (0x80, b"k:v\r\n")]);
        let mut whole = FrameDecoder::new(64);
        whole.push(&input);
        let expected = drain(&mut whole).expect("valid");
        for cut in 0..=input.len() {
            let mut decoder = FrameDecoder::new(64);
            let mut frames = Vec::new();
            for part in [&input[..cut], &input[cut..]] {
                decoder.push(part);
                frames.extend(drain(&mut decoder).expect("valid"));
            }
            decoder.finish().expect("complete");
            assert_eq!(frames, expected, "split at {cut}");
        }
        // And one byte at a time.
        let mut decoder = FrameDecoder::new(64);
        let mut frames = Vec::new();
        for byte in &input {
            decoder.push(std::slice::from_ref(byte));
            frames.extend(drain(&mut decoder).expect("valid"));
        }
        assert_eq!(frames, expected);
    }

    #[test]
    fn oversized_prefix_is_refused_on_the_header_alone() {
        let mut decoder = FrameDecoder::new(1024);
        // A header announcing 4 GiB - 1 with no payload at all.
        decoder.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        let error = decoder.next_frame().expect_err("too large");
        assert_eq!(
            error,
            CodecError::TooLarge {
                declared: u64::from(u32::MAX),
                max: 1024
            }
        );
        assert_eq!(error.code(), tonic::Code::ResourceExhausted);
        assert_eq!(decoder.buffered(), 0);
        // Sticky, and nothing more is held.
        decoder.push(&[0u8; 4096]);
        assert_eq!(decoder.buffered(), 0);
        assert_eq!(decoder.next_frame(), Err(error.clone()));
        assert_eq!(decoder.finish(), Err(error));
    }

    #[test]
    fn a_frame_of_exactly_max_is_accepted_and_max_plus_one_refused() {
        let mut decoder = FrameDecoder::new(3);
        decoder.push(&body(&[(0, b"abc")]));
        assert_eq!(drain(&mut decoder).expect("at the limit").len(), 1);
        decoder.push(&body(&[(0, b"abcd")]));
        assert!(matches!(
            decoder.next_frame(),
            Err(CodecError::TooLarge {
                declared: 4,
                max: 3
            })
        ));
    }

    #[test]
    fn lengths_that_lie_are_truncated_at_the_end() {
        // Announces 10 bytes, sends 4.
        let mut decoder = FrameDecoder::new(100);
        decoder.push(b"\x00\x00\x00\x00\x0aabcd");
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.buffered(), 9);
        assert_eq!(decoder.finish(), Err(CodecError::Truncated));
        // Ends inside a header.
        let mut decoder = FrameDecoder::new(100);
        decoder.push(b"\x00\x00\x00");
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.finish(), Err(CodecError::Truncated));
        // Announces fewer bytes than sent: the rest is read as the next
        // header, which here announces an absurd length.
        let mut decoder = FrameDecoder::new(100);
        decoder.push(b"\x00\x00\x00\x00\x01abcdef");
        assert_eq!(
            decoder.next_frame().expect("first").map(|f| f.payload),
            Some(Bytes::from_static(b"a"))
        );
        assert!(matches!(
            decoder.next_frame(),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn an_empty_body_is_complete() {
        let mut decoder = FrameDecoder::new(0);
        decoder.push(b"");
        assert_eq!(decoder.next_frame(), Ok(None));
        decoder.finish().expect("empty body");
    }

    #[test]
    fn limiter_agrees_with_decoder_at_every_split() {
        let input = body(&[(0, b"abc"), (0, b""), (0x80, b"grpc-status:0\r\n")]);
        for cut in 0..=input.len() {
            let mut limiter = FrameLimiter::new(16);
            limiter.check(&input[..cut]).expect("valid");
            limiter.check(&input[cut..]).expect("valid");
            limiter.finish().expect("complete");
            assert_eq!(limiter.frames(), 3);
        }
        // A prefix is complete exactly at frame boundaries.
        let boundaries = [0, 8, 13, input.len()];
        for cut in 0..=input.len() {
            let mut limiter = FrameLimiter::new(16);
            limiter.check(&input[..cut]).expect("valid prefix");
            let expected = if boundaries.contains(&cut) {
                Ok(())
            } else {
                Err(CodecError::Truncated)
            };
            assert_eq!(limiter.finish(), expected, "cut at {cut}");
        }
    }

    #[test]
    fn limiter_refuses_oversized_header_straddling_chunks() {
        let mut limiter = FrameLimiter::new(8);
        limiter.check(&[0, 0, 0]).expect("partial header");
        let error = limiter.check(&[0, 9]).expect_err("9 > 8");
        assert_eq!(
            error,
            CodecError::TooLarge {
                declared: 9,
                max: 8
            }
        );
        assert_eq!(limiter.check(b"more"), Err(error.clone()));
        assert_eq!(limiter.finish(), Err(error));
    }
}
