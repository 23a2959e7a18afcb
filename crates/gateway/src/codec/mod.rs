//! The wire formats the gateway speaks, as pure functions over bytes, so
//! they can be fuzzed and tested without a network.
//!
//! - [`frame`]: gRPC length-prefixed frames (flag byte, 4-byte big-endian
//!   length, payload): an incremental decoder and a zero-copy length checker
//!   for bodies passed through unchanged.
//! - [`text`]: the base64 layer of `application/grpc-web-text`.
//! - [`grpc_web`]: grpc-web content types and the `0x80` trailer frame.
//! - [`connect`]: the Connect protocol: content types, error bodies, the
//!   streaming end frame, timeouts and GET queries.
//! - [`json`]: the proto3 JSON mapping, driven by a descriptor pool.
//! - [`status`]: `grpc-message` percent-encoding, shared by every protocol.
//!
//! Every function here either returns a value or a [`CodecError`]; none
//! panics on any input (the fuzz targets under `crates/gateway/fuzz` and the
//! property tests in `tests/codec_props.rs` hold them to that). Error
//! messages are meant for the developer of the client that sent the bytes,
//! and never quote more than a short, escaped excerpt of the input.

pub mod connect;
pub mod frame;
pub mod grpc_web;
pub mod json;
pub mod status;
pub mod text;

/// Longest excerpt of client input an error message may quote, in characters.
const MAX_ECHO_CHARS: usize = 48;

/// Longest error text taken from a third-party parser (serde_json,
/// prost-reflect): they quote field names and values from the input, so their
/// messages are cut to this many characters.
const MAX_DETAIL_CHARS: usize = 240;

/// Why bytes could not be decoded or a value could not be parsed.
///
/// [`CodecError::code`] gives the gRPC status the gateway answers with. The
/// codes are chosen for the request direction (the client sent these bytes);
/// when the gateway decodes a *backend's* response with the same functions,
/// the fault is the backend's and the server should answer `INTERNAL`
/// instead, whatever the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A frame's length prefix announced more than the configured maximum.
    /// Refused as soon as the 5-byte header is seen: nothing of the payload
    /// is buffered.
    #[error(
        "message of {declared} bytes exceeds the gateway's limit of {max} bytes; send smaller messages"
    )]
    TooLarge {
        /// The length the frame header (or the decoded message) announced.
        declared: u64,
        /// The configured limit.
        max: usize,
    },
    /// The body ended inside a frame: the last length prefix promised more
    /// bytes than were sent, or the body ended inside a 5-byte header.
    #[error(
        "the body ended in the middle of a gRPC frame: a 5-byte length prefix announced more bytes than the body holds"
    )]
    Truncated,
    /// The `application/grpc-web-text` body is not base64.
    #[error(
        "the grpc-web-text body is not valid base64 (standard alphabet with `=` padding, no whitespace, length a multiple of 4)"
    )]
    InvalidBase64,
    /// A Connect JSON body is not valid JSON, or not a valid proto3 JSON
    /// rendering of the method's input message.
    #[error("invalid JSON request: {0}")]
    InvalidJson(String),
    /// Protobuf bytes do not decode as the expected message, or the message
    /// has no JSON rendering.
    #[error("invalid protobuf message: {0}")]
    InvalidProto(String),
    /// `connect-timeout-ms` is not 1 to 10 ASCII digits.
    #[error("connect-timeout-ms must be 1 to 10 ASCII digits (milliseconds)")]
    InvalidTimeout,
    /// A Connect GET query is missing a parameter or has a bad one.
    #[error("invalid Connect GET query: {0}")]
    BadQuery(String),
    /// A Connect GET asked for a compression the gateway does not speak.
    #[error("unsupported compression {0:?} in the Connect GET query: only identity is supported")]
    UnsupportedCompression(String),
    /// A grpc-web trailer block has a line that is not `key:value`, or a
    /// key or value that is not a valid HTTP header.
    #[error(
        "malformed grpc-web trailer block: every line must be `key:value` with a valid header name and value"
    )]
    BadTrailer,
    /// `grpc-status-details-bin` is not base64 of a `google.rpc.Status`.
    #[error("invalid grpc-status-details-bin: {0}")]
    InvalidStatusDetails(String),
}

impl CodecError {
    /// The gRPC status code the gateway answers with.
    ///
    /// - [`TooLarge`](Self::TooLarge): `RESOURCE_EXHAUSTED`, as gRPC itself
    ///   answers a message above the receive limit.
    /// - [`Truncated`](Self::Truncated), [`InvalidBase64`](Self::InvalidBase64),
    ///   [`InvalidJson`](Self::InvalidJson), [`InvalidTimeout`](Self::InvalidTimeout),
    ///   [`BadQuery`](Self::BadQuery), [`BadTrailer`](Self::BadTrailer):
    ///   `INVALID_ARGUMENT`: the client sent bytes that can never succeed, and
    ///   `INTERNAL` would wrongly point at the server. (gRPC servers answer a
    ///   malformed frame with `INTERNAL` because to them it is a transport
    ///   fault; at the edge it is the caller's request, so the developer is
    ///   told to fix it.)
    /// - [`UnsupportedCompression`](Self::UnsupportedCompression):
    ///   `UNIMPLEMENTED`, as connect-go answers an unknown compression.
    /// - [`InvalidProto`](Self::InvalidProto) and
    ///   [`InvalidStatusDetails`](Self::InvalidStatusDetails): `INTERNAL`:
    ///   the gateway only decodes protobuf and status details that come from
    ///   a backend (client protobuf passes through untouched), so a failure
    ///   there is a server-side fault.
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::TooLarge { .. } => tonic::Code::ResourceExhausted,
            Self::Truncated
            | Self::InvalidBase64
            | Self::InvalidJson(_)
            | Self::InvalidTimeout
            | Self::BadQuery(_)
            | Self::BadTrailer => tonic::Code::InvalidArgument,
            Self::UnsupportedCompression(_) => tonic::Code::Unimplemented,
            Self::InvalidProto(_) | Self::InvalidStatusDetails(_) => tonic::Code::Internal,
        }
    }
}

/// A short, escaped excerpt of untrusted input for an error message: at most
/// [`MAX_ECHO_CHARS`] characters, control and non-ASCII characters escaped,
/// an ellipsis when cut.
pub(crate) fn echo(input: &[u8]) -> String {
    let text = String::from_utf8_lossy(input);
    let mut out = String::new();
    for (count, ch) in text.chars().enumerate() {
        if count == MAX_ECHO_CHARS {
            out.push('…');
            break;
        }
        out.extend(ch.escape_debug());
    }
    out
}

/// Cuts a third-party error message to [`MAX_DETAIL_CHARS`] characters (they
/// may quote arbitrarily long keys or values from the input).
pub(crate) fn bounded(message: impl std::fmt::Display) -> String {
    let full = message.to_string();
    match full.char_indices().nth(MAX_DETAIL_CHARS) {
        Some((cut, _)) => format!("{}…", &full[..cut]),
        None => full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_escapes_and_bounds_input() {
        assert_eq!(echo(b"a\nb"), "a\\nb");
        let long = vec![b'x'; 10_000];
        let echoed = echo(&long);
        assert_eq!(echoed.chars().count(), MAX_ECHO_CHARS + 1);
        assert!(echoed.ends_with('…'));
        assert_eq!(echo(&[0xff]), "\u{fffd}");
    }

    #[test]
    fn bounded_cuts_long_messages_on_char_boundaries() {
        let long = "é".repeat(1000);
        let cut = bounded(&long);
        assert_eq!(cut.chars().count(), MAX_DETAIL_CHARS + 1);
        assert_eq!(bounded("short"), "short");
    }

    #[test]
    fn codes_follow_the_documented_mapping() {
        use tonic::Code;
        let cases = [
            (
                CodecError::TooLarge {
                    declared: 10,
                    max: 5,
                },
                Code::ResourceExhausted,
            ),
            (CodecError::Truncated, Code::InvalidArgument),
            (CodecError::InvalidBase64, Code::InvalidArgument),
            (
                CodecError::InvalidJson(String::new()),
                Code::InvalidArgument,
            ),
            (CodecError::InvalidProto(String::new()), Code::Internal),
            (CodecError::InvalidTimeout, Code::InvalidArgument),
            (CodecError::BadQuery(String::new()), Code::InvalidArgument),
            (
                CodecError::UnsupportedCompression(String::new()),
                Code::Unimplemented,
            ),
            (CodecError::BadTrailer, Code::InvalidArgument),
            (
                CodecError::InvalidStatusDetails(String::new()),
                Code::Internal,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(error.code(), code, "{error}");
        }
    }

    #[test]
    fn too_large_message_names_both_numbers() {
        let message = CodecError::TooLarge {
            declared: 5_000_000,
            max: 4_194_304,
        }
        .to_string();
        assert!(
            message.contains("5000000") && message.contains("4194304"),
            "{message}"
        );
    }
}
