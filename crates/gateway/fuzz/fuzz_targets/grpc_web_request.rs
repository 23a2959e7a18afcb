//! The grpc-web request path: the grpc-web-text base64 decoder feeding the
//! frame decoder, the zero-copy frame limiter, and the trailer block.
//!
//! Input: `[mode, max / 4, chunk seed, body ...]`. Besides "never panics",
//! each run checks the codecs against each other: the body split into
//! chunks decodes exactly as the whole body, the limiter's verdict is the
//! decoder's, the decoder never holds more than one incomplete frame, and
//! what decodes re-encodes to the same bytes.

#![no_main]

use agora_gateway::codec::CodecError;
use agora_gateway::codec::frame::{
    FRAME_HEADER_LEN, Frame, FrameDecoder, FrameLimiter, encode_frame,
};
use agora_gateway::codec::grpc_web::{parse_trailer_block, trailer_frame, web_format};
use agora_gateway::codec::text::{Base64Decoder, encode_base64};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [mode, max, seed, body @ ..] = data else {
        return;
    };
    let max = usize::from(*max) * 4;
    match mode % 3 {
        0 => binary(body, max, *seed),
        1 => text(body, max, *seed),
        _ => trailers(body),
    }
});

/// Splits `body` into chunks of 1 to 16 bytes drawn from `seed` (seed 0:
/// one chunk).
fn chunks(body: &[u8], seed: u8) -> Vec<&[u8]> {
    if seed == 0 {
        return vec![body];
    }
    let mut state = u32::from(seed) | 0x9e37_7900;
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        // xorshift32
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let len = (state % 16 + 1) as usize;
        let (chunk, tail) = rest.split_at(len.min(rest.len()));
        out.push(chunk);
        rest = tail;
    }
    out
}

#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Frame>,
    end: Result<(), CodecError>,
}

fn decode_frames(chunks: &[Bytes], max: usize) -> Outcome {
    let mut decoder = FrameDecoder::new(max);
    let mut frames = Vec::new();
    for chunk in chunks {
        decoder.push_bytes(chunk.clone());
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    assert!(frame.payload.len() <= max);
                    frames.push(frame);
                }
                Ok(None) => break,
                Err(error) => {
                    assert_eq!(decoder.buffered(), 0);
                    return Outcome {
                        frames,
                        end: Err(error),
                    };
                }
            }
        }
        assert!(decoder.buffered() < FRAME_HEADER_LEN + max);
    }
    Outcome {
        frames,
        end: decoder.finish(),
    }
}

fn binary(body: &[u8], max: usize, seed: u8) {
    let whole = decode_frames(&[Bytes::copy_from_slice(body)], max);
    let pieces: Vec<Bytes> = chunks(body, seed)
        .into_iter()
        .map(Bytes::copy_from_slice)
        .collect();
    let split = decode_frames(&pieces, max);
    assert_eq!(whole, split);

    let mut limiter = FrameLimiter::new(max);
    let verdict = pieces
        .iter()
        .try_for_each(|chunk| limiter.check(chunk))
        .and_then(|()| limiter.finish());
    assert_eq!(verdict, whole.end);

    let reencoded: Vec<u8> = whole
        .frames
        .iter()
        .flat_map(|frame| encode_frame(frame.flags, &frame.payload).to_vec())
        .collect();
    assert!(body.starts_with(&reencoded));
    if whole.end.is_ok() {
        assert_eq!(reencoded.len(), body.len());
    }
}

fn decode_text(chunks: &[&[u8]]) -> Result<Vec<u8>, CodecError> {
    let mut decoder = Base64Decoder::new();
    let mut out = Vec::new();
    for chunk in chunks {
        out.extend_from_slice(&decoder.push(chunk)?);
    }
    decoder.finish()?;
    Ok(out)
}

fn text(body: &[u8], max: usize, seed: u8) {
    let whole = decode_text(&[body]);
    assert_eq!(whole, decode_text(&chunks(body, seed)));
    if let Ok(decoded) = whole {
        assert_eq!(
            decoded.len(),
            body.len() / 4 * 3 - body.iter().filter(|&&b| b == b'=').count()
        );
        if !body.contains(&b'=') {
            // Without padding the body is one canonical run.
            assert_eq!(&encode_base64(&decoded)[..], body);
        }
        binary(&decoded, max, seed);
    }
}

fn trailers(body: &[u8]) {
    let _ = web_format(&String::from_utf8_lossy(body));
    if let Ok(map) = parse_trailer_block(body) {
        let frame = trailer_frame(&map);
        assert_eq!(frame[0], 0x80);
        let again = parse_trailer_block(&frame[FRAME_HEADER_LEN..]);
        assert_eq!(again.as_ref(), Ok(&map));
    }
}
