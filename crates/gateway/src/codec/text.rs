//! The base64 layer of `application/grpc-web-text`.
//!
//! Requests and responses are base64 (standard alphabet, `=` padding) of the
//! binary grpc-web body. A sender may encode each frame on its own, so a
//! padded group can end in the middle of the stream: the body is decoded
//! group by group (4 characters to at most 3 bytes), never as one string.

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};

use super::CodecError;

/// Marks bytes outside the base64 alphabet in [`DECODE`].
const INVALID: u8 = 0xff;

/// Maps an ASCII byte to its 6-bit value, or [`INVALID`] (`=` included: it is
/// handled by position).
const DECODE: [u8; 256] = {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < alphabet.len() {
        table[alphabet[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// Incremental grpc-web-text decoder.
///
/// Decodes in 4-character groups; a group may be padded (`xx==`, `xxx=`)
/// anywhere in the stream, which is how per-frame encoding looks. Refused,
/// with [`CodecError::InvalidBase64`]: any byte outside the alphabet
/// (whitespace and line breaks included), `=` in the first two positions of
/// a group or followed by a non-`=`, and non-zero unused bits in a padded
/// group (no conforming encoder writes them; refusing them makes the decoding
/// one-to-one). The error is sticky.
#[derive(Debug, Default)]
pub struct Base64Decoder {
    pending: [u8; 4],
    pending_len: usize,
    failed: bool,
}

impl Base64Decoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes the next chunk of the body; returns the bytes of every group
    /// completed by it (possibly none). Up to 3 characters of an incomplete
    /// group are kept for the next chunk.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Bytes, CodecError> {
        if self.failed {
            return Err(CodecError::InvalidBase64);
        }
        let result = self.decode(chunk);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn decode(&mut self, chunk: &[u8]) -> Result<Bytes, CodecError> {
        let mut out = BytesMut::with_capacity((self.pending_len + chunk.len()) / 4 * 3);
        let mut rest = chunk;
        if self.pending_len > 0 {
            let n = (4 - self.pending_len).min(rest.len());
            self.pending[self.pending_len..self.pending_len + n].copy_from_slice(&rest[..n]);
            self.pending_len += n;
            rest = &rest[n..];
            if self.pending_len < 4 {
                return Ok(out.freeze());
            }
            decode_group(self.pending, &mut out)?;
            self.pending_len = 0;
        }
        let mut groups = rest.chunks_exact(4);
        for group in &mut groups {
            decode_group([group[0], group[1], group[2], group[3]], &mut out)?;
        }
        let tail = groups.remainder();
        // Check the tail's characters now, so an invalid byte is reported in
        // the chunk that carried it.
        if tail
            .iter()
            .any(|&b| b != b'=' && DECODE[usize::from(b)] == INVALID)
        {
            return Err(CodecError::InvalidBase64);
        }
        self.pending[..tail.len()].copy_from_slice(tail);
        self.pending_len = tail.len();
        Ok(out.freeze())
    }

    /// Call at the end of the body: characters left over (a length that is
    /// not a multiple of 4) are [`CodecError::InvalidBase64`].
    pub fn finish(&self) -> Result<(), CodecError> {
        if self.failed || self.pending_len != 0 {
            Err(CodecError::InvalidBase64)
        } else {
            Ok(())
        }
    }
}

/// Decodes one 4-character group into 1 to 3 bytes.
fn decode_group(group: [u8; 4], out: &mut BytesMut) -> Result<(), CodecError> {
    let value = |b: u8| match DECODE[usize::from(b)] {
        INVALID => Err(CodecError::InvalidBase64),
        v => Ok(u32::from(v)),
    };
    let a = value(group[0])?;
    let b = value(group[1])?;
    match (group[2], group[3]) {
        (b'=', b'=') => {
            // 12 bits carry 8: the low 4 bits of `b` must be zero.
            if b & 0x0f != 0 {
                return Err(CodecError::InvalidBase64);
            }
            let bits = (a << 18) | (b << 12);
            out.put_u8((bits >> 16) as u8);
        }
        (b'=', _) => return Err(CodecError::InvalidBase64),
        (c, b'=') => {
            let c = value(c)?;
            // 18 bits carry 16: the low 2 bits of `c` must be zero.
            if c & 0x03 != 0 {
                return Err(CodecError::InvalidBase64);
            }
            let bits = (a << 18) | (b << 12) | (c << 6);
            out.put_slice(&[(bits >> 16) as u8, (bits >> 8) as u8]);
        }
        (c, d) => {
            let bits = (a << 18) | (b << 12) | (value(c)? << 6) | value(d)?;
            out.put_slice(&[(bits >> 16) as u8, (bits >> 8) as u8, bits as u8]);
        }
    }
    Ok(())
}

/// Base64 (standard alphabet, padded) of `bytes`: one grpc-web-text frame.
pub fn encode_base64(bytes: &[u8]) -> Bytes {
    Bytes::from(base64::engine::general_purpose::STANDARD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::frame::{FrameDecoder, encode_frame};

    fn decode_all(input: &[u8]) -> Result<Vec<u8>, CodecError> {
        let mut decoder = Base64Decoder::new();
        let out = decoder.push(input)?;
        decoder.finish()?;
        Ok(out.to_vec())
    }

    #[test]
    fn agrees_with_the_base64_crate_on_whole_inputs() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let encoded = encode_base64(&data);
            assert_eq!(
                &encoded[..],
                base64::engine::general_purpose::STANDARD
                    .encode(&data)
                    .as_bytes()
            );
            assert_eq!(decode_all(&encoded).expect("valid"), data, "len {len}");
        }
    }

    #[test]
    fn a_real_grpc_web_text_exchange() {
        // What grpc-web's text mode sends for a message `0a 05 "hello"`
        // (field 1 = "hello"), and the reply: one base64 run per frame, the
        // trailer frame padded, so `=` sits between frames.
        let request = b"AAAAAAcKBWhlbGxv";
        let binary = decode_all(request).expect("valid request");
        assert_eq!(binary, encode_frame(0, b"\x0a\x05hello").to_vec());

        let response = b"AAAAAAcKBWhlbGxvgAAAAA9ncnBjLXN0YXR1czowDQo=";
        let mut frames = FrameDecoder::new(1024);
        let mut decoder = Base64Decoder::new();
        // Fed in uneven pieces, as a network would.
        for piece in response.chunks(7) {
            frames.push_bytes(decoder.push(piece).expect("valid base64"));
        }
        decoder.finish().expect("whole groups");
        let data = frames.next_frame().expect("valid").expect("data frame");
        assert_eq!((data.flags, &data.payload[..]), (0, &b"\x0a\x05hello"[..]));
        let trailers = frames.next_frame().expect("valid").expect("trailer frame");
        assert_eq!(
            (trailers.flags, &trailers.payload[..]),
            (0x80, &b"grpc-status:0\r\n"[..])
        );
        frames.finish().expect("complete");
    }

    #[test]
    fn padding_between_frames_is_accepted() {
        let mut body = Vec::new();
        body.extend_from_slice(&encode_base64(&encode_frame(0, b"a"))); // 6 bytes -> "AAAAAAFh"
        body.extend_from_slice(&encode_base64(&encode_frame(0, b"ab"))); // 7 bytes -> padded "=="
        body.extend_from_slice(&encode_base64(&encode_frame(0, b"abc"))); // 8 bytes -> padded "="
        body.extend_from_slice(&encode_base64(&encode_frame(0x80, b"")));
        assert!(body.contains(&b'='));
        let mut expected = Vec::new();
        for (flags, payload) in [(0, &b"a"[..]), (0, b"ab"), (0, b"abc"), (0x80, b"")] {
            expected.extend_from_slice(&encode_frame(flags, payload));
        }
        for cut in 0..=body.len() {
            let mut decoder = Base64Decoder::new();
            let mut out = decoder.push(&body[..cut]).expect("valid").to_vec();
            out.extend_from_slice(&decoder.push(&body[cut..]).expect("valid"));
            decoder.finish().expect("complete");
            assert_eq!(out, expected, "split at {cut}");
        }
    }

    #[test]
    fn invalid_base64_is_refused() {
        for bad in [
            &b"AAA*"[..],    // byte outside the alphabet
            b"AAAA AAAA",    // whitespace
            b"AAAA\r\nAAAA", // line break
            b"=AAA",         // padding first
            b"A===",         // padding second
            b"AA=A",         // padding then data
            b"QR==",         // non-zero unused bits (canonical: QQ==)
            b"QUJ=",         // non-zero unused bits (canonical: QUI=)
            b"AAAA-_AA",     // URL-safe alphabet is not grpc-web-text
        ] {
            assert_eq!(decode_all(bad), Err(CodecError::InvalidBase64), "{bad:?}");
        }
    }

    #[test]
    fn a_length_not_a_multiple_of_four_fails_at_finish() {
        let mut decoder = Base64Decoder::new();
        assert_eq!(&decoder.push(b"QUJDR").expect("valid so far")[..], b"ABC");
        assert_eq!(decoder.finish(), Err(CodecError::InvalidBase64));
        // ... but not once the group is completed.
        assert_eq!(&decoder.push(b"A==").expect("valid")[..], b"D");
        decoder.finish().expect("complete");
    }

    #[test]
    fn an_invalid_byte_is_reported_in_the_chunk_that_carries_it_and_sticks() {
        let mut decoder = Base64Decoder::new();
        assert_eq!(decoder.push(b"QU!"), Err(CodecError::InvalidBase64));
        assert_eq!(decoder.push(b"QUJD"), Err(CodecError::InvalidBase64));
        assert_eq!(decoder.finish(), Err(CodecError::InvalidBase64));
    }
}
