//! grpc-web: content types and the trailer frame.
//!
//! A grpc-web body is a gRPC body (see [`frame`](super::frame)) followed by
//! one frame with flag `0x80` whose payload is the trailers as HTTP/1-style
//! header lines, because browsers cannot read HTTP trailers.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::CodecError;
use super::frame::encode_frame;

/// Flag of the grpc-web trailer frame.
pub const TRAILER_FLAG: u8 = 0x80;

/// The two grpc-web body encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WebFormat {
    /// `application/grpc-web[+proto]`: frames as bytes.
    Binary,
    /// `application/grpc-web-text[+proto]`: frames in base64.
    Text,
}

/// The grpc-web format a request's `content-type` names: `application/grpc-web`,
/// `application/grpc-web+proto`, `application/grpc-web-text` or
/// `application/grpc-web-text+proto`, compared case-insensitively,
/// parameters after `;` ignored. Anything else (`+json` included: the
/// gateway speaks only protobuf grpc-web) is `None`.
pub fn web_format(content_type: &str) -> Option<WebFormat> {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if essence.eq_ignore_ascii_case("application/grpc-web")
        || essence.eq_ignore_ascii_case("application/grpc-web+proto")
    {
        Some(WebFormat::Binary)
    } else if essence.eq_ignore_ascii_case("application/grpc-web-text")
        || essence.eq_ignore_ascii_case("application/grpc-web-text+proto")
    {
        Some(WebFormat::Text)
    } else {
        None
    }
}

/// The response `content-type` for a format.
pub fn response_content_type(format: WebFormat) -> &'static str {
    match format {
        WebFormat::Binary => "application/grpc-web+proto",
        WebFormat::Text => "application/grpc-web-text+proto",
    }
}

/// Trailers written before the others, in this order (`grpc-status` first,
/// as some clients read the first line).
const LEADING: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];

/// The whole `0x80` trailer frame (header included) for `trailers`: one
/// `key:value\r\n` line per value (lowercase keys, as [`HeaderName`] keeps
/// them; several lines for a multi-valued key), `grpc-status`,
/// `grpc-message` and `grpc-status-details-bin` first, then the others in
/// map order. Values are written as they are: `grpc-message` must already be
/// percent-encoded (it is, coming from a backend; see
/// [`encode_grpc_message`](super::status::encode_grpc_message) otherwise).
/// The caller provides `grpc-status`. In text mode, base64 the returned
/// frame on its own.
pub fn trailer_frame(trailers: &HeaderMap) -> Bytes {
    let mut block = BytesMut::new();
    let mut line = |name: &HeaderName, value: &HeaderValue| {
        block.put_slice(name.as_str().as_bytes());
        block.put_u8(b':');
        block.put_slice(value.as_bytes());
        block.put_slice(b"\r\n");
    };
    for key in LEADING {
        for value in trailers.get_all(key) {
            line(&HeaderName::from_static(key), value);
        }
    }
    for name in trailers.keys() {
        if LEADING.contains(&name.as_str()) {
            continue;
        }
        for value in trailers.get_all(name) {
            line(name, value);
        }
    }
    encode_frame(TRAILER_FLAG, &block)
}

/// Parses a trailer frame's payload back into a map (for tests and
/// clients).
///
/// Lenient where real servers differ: lines end in `\r\n` or a bare `\n`,
/// empty lines are skipped, keys are lowercased, and spaces or tabs around
/// the value are trimmed (`grpc-status: 0`, tonic #2053). A line without
/// `:`, an empty key, or a key or value that is not a valid header is
/// [`CodecError::BadTrailer`].
pub fn parse_trailer_block(payload: &[u8]) -> Result<HeaderMap, CodecError> {
    let mut map = HeaderMap::new();
    for raw in payload.split(|&b| b == b'\n') {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.is_empty() {
            continue;
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(CodecError::BadTrailer)?;
        let key = line[..colon].trim_ascii();
        let value = trim_blanks(&line[colon + 1..]);
        if key.is_empty() {
            return Err(CodecError::BadTrailer);
        }
        // `from_bytes` lowercases nothing and refuses upper case; HTTP/1
        // senders may capitalise, so lowercase first.
        let name = HeaderName::from_bytes(&key.to_ascii_lowercase())
            .map_err(|_| CodecError::BadTrailer)?;
        let value = HeaderValue::from_bytes(value).map_err(|_| CodecError::BadTrailer)?;
        map.append(name, value);
    }
    Ok(map)
}

/// Trims spaces and tabs (the HTTP "optional whitespace") at both ends.
fn trim_blanks(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::frame::{FRAME_HEADER_LEN, FrameDecoder};

    #[test]
    fn content_types_are_recognised_case_insensitively_with_parameters() {
        let cases = [
            ("application/grpc-web", Some(WebFormat::Binary)),
            ("application/grpc-web+proto", Some(WebFormat::Binary)),
            (
                "Application/GRPC-Web+Proto; charset=utf-8",
                Some(WebFormat::Binary),
            ),
            ("application/grpc-web-text", Some(WebFormat::Text)),
            ("application/grpc-web-text+proto", Some(WebFormat::Text)),
            ("APPLICATION/GRPC-WEB-TEXT ; x=1", Some(WebFormat::Text)),
            ("application/grpc-web+json", None),
            ("application/grpc-web-text+json", None),
            ("application/grpc", None),
            ("application/grpc+proto", None),
            ("application/json", None),
            ("application/grpc-webx", None),
            ("", None),
        ];
        for (content_type, expected) in cases {
            assert_eq!(web_format(content_type), expected, "{content_type:?}");
        }
        assert_eq!(
            response_content_type(WebFormat::Binary),
            "application/grpc-web+proto"
        );
        assert_eq!(
            response_content_type(WebFormat::Text),
            "application/grpc-web-text+proto"
        );
    }

    fn trailers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (key, value) in pairs {
            map.append(*key, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn trailer_frame_puts_status_first_and_repeats_multi_valued_keys() {
        let map = trailers(&[
            ("x-custom", "a"),
            ("grpc-message", "not%20found"),
            ("x-custom", "b"),
            ("grpc-status", "5"),
            ("x-other-bin", "AAE="),
        ]);
        let frame = trailer_frame(&map);
        assert_eq!(frame[0], TRAILER_FLAG);
        let block = &frame[FRAME_HEADER_LEN..];
        assert_eq!(
            u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize,
            block.len()
        );
        let text = std::str::from_utf8(block).expect("ascii");
        assert!(
            text.starts_with("grpc-status:5\r\ngrpc-message:not%20found\r\n"),
            "{text}"
        );
        assert!(text.contains("x-custom:a\r\nx-custom:b\r\n"), "{text}");
        assert!(text.contains("x-other-bin:AAE=\r\n"), "{text}");
        assert_eq!(text.lines().count(), 5);
        // And back.
        assert_eq!(parse_trailer_block(block).expect("valid"), map);
    }

    #[test]
    fn an_empty_trailer_map_makes_an_empty_frame() {
        assert_eq!(
            &trailer_frame(&HeaderMap::new())[..],
            b"\x80\x00\x00\x00\x00"
        );
        assert!(parse_trailer_block(b"").expect("empty").is_empty());
    }

    #[test]
    fn parse_tolerates_spaces_bare_newlines_and_capitals() {
        let map = parse_trailer_block(b"Grpc-Status: 0\r\n\r\ngrpc-message:\tok \nx-a:1\nx-a:2")
            .expect("lenient");
        assert_eq!(
            map.get("grpc-status").map(HeaderValue::as_bytes),
            Some(&b"0"[..])
        );
        assert_eq!(
            map.get("grpc-message").map(HeaderValue::as_bytes),
            Some(&b"ok"[..])
        );
        let values: Vec<_> = map
            .get_all("x-a")
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        assert_eq!(values, [&b"1"[..], b"2"]);
        // An empty value is a valid header (tonic #1883 looped on it).
        let map = parse_trailer_block(b"grpc-status:0\r\ngrpc-message:\r\n").expect("valid");
        assert_eq!(
            map.get("grpc-message").map(HeaderValue::as_bytes),
            Some(&b""[..])
        );
    }

    #[test]
    fn parse_refuses_malformed_lines() {
        for bad in [
            &b"grpc-status 0\r\n"[..],
            b":0\r\n",
            b"bad key:0\r\n",
            b"grpc-status:0\r\x00\r\n",
            b"k\x7f:v\r\n",
        ] {
            assert_eq!(
                parse_trailer_block(bad),
                Err(CodecError::BadTrailer),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_trailer_frame_after_the_last_message_in_one_chunk_is_not_lost() {
        // grpc/grpc-rust #2474: message and trailers in the same read.
        let mut body = crate::codec::frame::encode_frame(0, b"last").to_vec();
        body.extend_from_slice(&trailer_frame(&trailers(&[("grpc-status", "0")])));
        let mut decoder = FrameDecoder::new(64);
        decoder.push(&body);
        let message = decoder.next_frame().expect("valid").expect("message");
        assert_eq!(&message.payload[..], b"last");
        let trailer = decoder.next_frame().expect("valid").expect("trailers");
        assert_eq!(trailer.flags, TRAILER_FLAG);
        let map = parse_trailer_block(&trailer.payload).expect("valid");
        assert_eq!(
            map.get("grpc-status").map(HeaderValue::as_bytes),
            Some(&b"0"[..])
        );
    }
}
