//! `grpc-message` percent-encoding (gRPC's PROTOCOL-HTTP2: "Percent-Encoded").
//!
//! gRPC carries the status message percent-encoded: bytes of the UTF-8 text
//! outside printable ASCII (0x20..=0x7E), and `%` itself, become `%XX`.
//! Connect carries the plain text in its JSON error instead, so the gateway
//! decodes a backend's `grpc-message` for Connect clients and encodes its own
//! messages for gRPC and grpc-web clients.

/// Percent-encodes a status message for the `grpc-message` header/trailer.
pub fn encode_grpc_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &byte in message.as_bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
    }
    out
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Decodes a `grpc-message` value. As the spec asks of receivers, it never
/// fails: a `%` not followed by two hex digits is kept as it is, and bytes
/// that are not UTF-8 become U+FFFD.
pub fn decode_grpc_message(value: &[u8]) -> String {
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        if value[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                value.get(i + 1).and_then(|&b| hex_value(b)),
                value.get(i + 2).and_then(|&b| hex_value(b)),
            )
        {
            out.push((hi << 4) | lo);
            i += 3;
            continue;
        }
        out.push(value[i]);
        i += 1;
    }
    match String::from_utf8(out) {
        Ok(text) => text,
        Err(error) => String::from_utf8_lossy(error.as_bytes()).into_owned(),
    }
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_percent_and_non_ascii_only() {
        assert_eq!(encode_grpc_message("plain text: ok!"), "plain text: ok!");
        assert_eq!(encode_grpc_message("100% sure"), "100%25 sure");
        assert_eq!(encode_grpc_message("line\nbreak"), "line%0Abreak");
        assert_eq!(encode_grpc_message("café"), "caf%C3%A9");
    }

    #[test]
    fn decodes_what_it_encodes_and_tolerates_bad_escapes() {
        for text in ["", "100% sure", "caf\u{e9} \u{1f600}", "a\r\nb", "%%%"] {
            assert_eq!(
                decode_grpc_message(encode_grpc_message(text).as_bytes()),
                text
            );
        }
        assert_eq!(decode_grpc_message(b"50%"), "50%");
        assert_eq!(decode_grpc_message(b"%zz%4"), "%zz%4");
        assert_eq!(decode_grpc_message(b"caf%c3%a9"), "caf\u{e9}");
        assert_eq!(decode_grpc_message(b"bad %FF byte"), "bad \u{fffd} byte");
    }
}
