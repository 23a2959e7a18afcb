//! The Connect protocol (connectrpc.com/docs/protocol): content types, codes,
//! the error body, the streaming end frame, timeouts and GET queries.
//!
//! Connect unary calls carry the bare message (no envelope) and report
//! errors with an HTTP status and a JSON body; streaming calls use the gRPC
//! envelope (see [`frame`](super::frame)) and end with a JSON frame flagged
//! [`END_STREAM_FLAG`].

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig, general_purpose};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde::Serialize;
use tonic::Code;

use super::frame::encode_frame;
use super::{CodecError, bounded, echo};

/// Flag of Connect's final streaming frame, the `EndStreamResponse` (not
/// grpc-web's `0x80`).
pub const END_STREAM_FLAG: u8 = 0x02;

/// How a Connect message is serialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectCodec {
    /// The proto3 JSON mapping.
    Json,
    /// Binary protobuf.
    Proto,
}

impl ConnectCodec {
    /// The content type of a streaming answer in this codec.
    pub fn stream_content_type(self) -> &'static str {
        match self {
            Self::Json => "application/connect+json",
            Self::Proto => "application/connect+proto",
        }
    }

    /// The content type of a unary answer in this codec.
    pub fn unary_content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Proto => "application/proto",
        }
    }
}

/// What a Connect request's content type says about the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectKind {
    /// `application/json` or `application/proto`: a unary call, bare message.
    Unary(ConnectCodec),
    /// `application/connect+json` or `application/connect+proto`: a
    /// streaming call, enveloped messages.
    Stream(ConnectCodec),
}

/// The Connect call a `content-type` names: `application/json`,
/// `application/proto` (unary), `application/connect+json`,
/// `application/connect+proto` (streaming); the type compared
/// case-insensitively. The JSON types may carry `charset=utf-8` (the only
/// charset proto3 JSON allows); any other parameter makes the type
/// unsupported (`None`: the server answers HTTP 415).
pub fn connect_kind(content_type: &str) -> Option<ConnectKind> {
    let mut parts = content_type.split(';');
    let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    let kind = match essence.as_str() {
        "application/json" => ConnectKind::Unary(ConnectCodec::Json),
        "application/proto" => ConnectKind::Unary(ConnectCodec::Proto),
        "application/connect+json" => ConnectKind::Stream(ConnectCodec::Json),
        "application/connect+proto" => ConnectKind::Stream(ConnectCodec::Proto),
        _ => return None,
    };
    let json = matches!(
        kind,
        ConnectKind::Unary(ConnectCodec::Json) | ConnectKind::Stream(ConnectCodec::Json)
    );
    for parameter in parts {
        let parameter = parameter.trim();
        if parameter.is_empty() {
            continue;
        }
        let (name, value) = parameter.split_once('=')?;
        let value = value.trim().trim_matches('"');
        if !(json
            && name.trim().eq_ignore_ascii_case("charset")
            && value.eq_ignore_ascii_case("utf-8"))
        {
            return None;
        }
    }
    Some(kind)
}

/// Every code with its Connect name, in code order.
const CODE_NAMES: [(Code, &str); 17] = [
    (Code::Ok, "ok"),
    (Code::Cancelled, "canceled"),
    (Code::Unknown, "unknown"),
    (Code::InvalidArgument, "invalid_argument"),
    (Code::DeadlineExceeded, "deadline_exceeded"),
    (Code::NotFound, "not_found"),
    (Code::AlreadyExists, "already_exists"),
    (Code::PermissionDenied, "permission_denied"),
    (Code::ResourceExhausted, "resource_exhausted"),
    (Code::FailedPrecondition, "failed_precondition"),
    (Code::Aborted, "aborted"),
    (Code::OutOfRange, "out_of_range"),
    (Code::Unimplemented, "unimplemented"),
    (Code::Internal, "internal"),
    (Code::Unavailable, "unavailable"),
    (Code::DataLoss, "data_loss"),
    (Code::Unauthenticated, "unauthenticated"),
];

/// The Connect name of a code (`not_found`, `canceled` with one "l", ...).
/// `Ok` is `"ok"`, though Connect never sends it in an error.
pub fn code_name(code: Code) -> &'static str {
    CODE_NAMES
        .iter()
        .find(|(c, _)| *c == code)
        .map_or("unknown", |(_, name)| name)
}

/// The code a Connect name stands for; `None` for an unknown name.
pub fn code_from_name(name: &str) -> Option<Code> {
    CODE_NAMES
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(code, _)| *code)
}

/// The HTTP status of a Connect unary error with this code (Connect's
/// table); `Ok` is 200.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        // 499 "Client Closed Request" has no constant; `from_u16` accepts
        // every value in 100..=999, so the fallback is never taken.
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::REQUEST_TIMEOUT),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
    }
}

/// Parses `connect-timeout-ms`: 1 to 10 ASCII digits (no sign, no spaces),
/// else [`CodecError::InvalidTimeout`]. `0` is a deadline already passed,
/// as in connect-go.
pub fn parse_timeout_ms(value: &[u8]) -> Result<Duration, CodecError> {
    if value.is_empty() || value.len() > 10 || !value.iter().all(u8::is_ascii_digit) {
        return Err(CodecError::InvalidTimeout);
    }
    let millis = value
        .iter()
        .fold(0u64, |acc, digit| acc * 10 + u64::from(digit - b'0'));
    Ok(Duration::from_millis(millis))
}

/// One entry of an error's `details`: a protobuf message and its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorDetail {
    /// The message's full protobuf name, e.g. `google.rpc.ErrorInfo`
    /// (without `type.googleapis.com/`).
    pub type_name: String,
    /// The message, protobuf-encoded.
    pub value: Bytes,
}

/// `google.rpc.Status`, declared here to avoid a dependency for three fields.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// Standard-alphabet base64 accepting input with or without padding, as gRPC
/// requires of receivers of `-bin` metadata.
const STANDARD_INDIFFERENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// URL-safe base64, padded or not, for Connect GET's `base64=1` messages.
const URL_SAFE_INDIFFERENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The details of a `grpc-status-details-bin` value: base64 (standard
/// alphabet, padded or not) of a `google.rpc.Status`, whose `details` are
/// `google.protobuf.Any`s. A type URL keeps its part after the last `/`.
pub fn details_from_status_bin(value: &[u8]) -> Result<Vec<ErrorDetail>, CodecError> {
    let bytes = STANDARD_INDIFFERENT.decode(value).map_err(|error| {
        CodecError::InvalidStatusDetails(format!("not base64: {}", bounded(error)))
    })?;
    details_from_status_bytes(&bytes)
}

/// The details of an encoded `google.rpc.Status` (what
/// `tonic::Status::details` holds).
pub fn details_from_status_bytes(bytes: &[u8]) -> Result<Vec<ErrorDetail>, CodecError> {
    let status = <RpcStatus as prost::Message>::decode(bytes).map_err(|error| {
        CodecError::InvalidStatusDetails(format!("not a google.rpc.Status: {}", bounded(error)))
    })?;
    Ok(status
        .details
        .into_iter()
        .map(|any| ErrorDetail {
            type_name: match any.type_url.rsplit_once('/') {
                Some((_, name)) => name.to_owned(),
                None => any.type_url,
            },
            value: Bytes::from(any.value),
        })
        .collect())
}

/// The reverse of [`details_from_status_bin`]: an unpadded base64
/// `grpc-status-details-bin` value for a status the gateway makes itself
/// (and for tests). `message` is the plain text.
pub fn status_bin(code: Code, message: &str, details: &[ErrorDetail]) -> String {
    let status = RpcStatus {
        code: code as i32,
        message: message.to_owned(),
        details: details
            .iter()
            .map(|detail| prost_types::Any {
                type_url: format!("type.googleapis.com/{}", detail.type_name),
                value: detail.value.to_vec(),
            })
            .collect(),
    };
    general_purpose::STANDARD_NO_PAD.encode(prost::Message::encode_to_vec(&status))
}

/// A Connect error as JSON.
#[derive(Serialize)]
struct WireError<'a> {
    code: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    message: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    details: Vec<WireDetail<'a>>,
}

#[derive(Serialize)]
struct WireDetail<'a> {
    #[serde(rename = "type")]
    type_name: &'a str,
    value: String,
}

impl<'a> WireError<'a> {
    fn new(code: Code, message: &'a str, details: &'a [ErrorDetail]) -> Self {
        Self {
            code: code_name(code),
            message,
            details: details
                .iter()
                .map(|detail| WireDetail {
                    type_name: &detail.type_name,
                    value: general_purpose::STANDARD_NO_PAD.encode(&detail.value),
                })
                .collect(),
        }
    }
}

/// The JSON body of a Connect unary error:
/// `{"code":"not_found","message":"...","details":[{"type":"...","value":"<unpadded base64>"}]}`,
/// `message` and `details` left out when empty. `message` is plain text
/// (decode a backend's `grpc-message` with
/// [`decode_grpc_message`](super::status::decode_grpc_message) first). Send
/// it with `content-type: application/json` and [`http_status`]`(code)`.
pub fn error_body(code: Code, message: &str, details: &[ErrorDetail]) -> Bytes {
    to_json(&WireError::new(code, message, details), code)
}

/// Connect's `EndStreamResponse`.
#[derive(Serialize)]
struct EndStream<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<WireError<'a>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<&'a str, Vec<String>>,
}

/// The final frame of a Connect stream: flag [`END_STREAM_FLAG`] and the JSON
/// `{"error":{...},"metadata":{"key":["value",...]}}`, each member left out
/// when empty (`{}` on success without metadata). `metadata` is the
/// backend's trailers; `grpc-status`, `grpc-message` and
/// `grpc-status-details-bin` are left out of it, since `error` says the same
/// in Connect's terms. Values that are not UTF-8 are converted lossily.
pub fn end_stream_frame(
    error: Option<(Code, &str, &[ErrorDetail])>,
    metadata: &HeaderMap,
) -> Bytes {
    let mut map: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (name, value) in metadata {
        if matches!(
            name.as_str(),
            "grpc-status" | "grpc-message" | "grpc-status-details-bin"
        ) {
            continue;
        }
        map.entry(name.as_str())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let code = error.map_or(Code::Ok, |(code, _, _)| code);
    let end = EndStream {
        error: error.map(|(code, message, details)| WireError::new(code, message, details)),
        metadata: map,
    };
    encode_frame(END_STREAM_FLAG, &to_json(&end, code))
}

/// Serializes one of this module's JSON shapes. They hold only strings,
/// vectors and string-keyed maps, which serde_json cannot fail on; the
/// fallback keeps at least the code should that ever change.
fn to_json(value: &impl Serialize, code: Code) -> Bytes {
    match serde_json::to_vec(value) {
        Ok(json) => Bytes::from(json),
        Err(_) => Bytes::from(format!(r#"{{"code":"{}"}}"#, code_name(code))),
    }
}

/// Parses the query of a Connect GET (a side-effect-free unary call):
/// `connect=v1&encoding=json|proto&message=<url-encoded>[&base64=1][&compression=identity]`.
///
/// Returns the codec and the message bytes, at most `max_bytes` of them
/// (else [`CodecError::TooLarge`]). `connect=v1` is required (connect-es
/// and connect-go clients always send it). `base64=1` means the message is
/// URL-safe base64, padded or not, as connect-go reads it. A compression
/// other than `identity` is [`CodecError::UnsupportedCompression`]. Other
/// parameters (cache busters) are ignored; for a repeated one, the first
/// counts. Keys and values are form-URL-decoded (`+` is a space).
pub fn parse_get_query(query: &str, max_bytes: usize) -> Result<(ConnectCodec, Bytes), CodecError> {
    let query = query.strip_prefix('?').unwrap_or(query);
    let (mut connect, mut encoding, mut message, mut base64, mut compression) =
        (None, None, None, None, None);
    for pair in query.split('&') {
        if pair.is_empty() {
            continue;
        }
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match form_decode(raw_key.as_bytes(), 32).as_slice() {
            b"connect" => &mut connect,
            b"encoding" => &mut encoding,
            b"message" => &mut message,
            b"base64" => &mut base64,
            b"compression" => &mut compression,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(raw_value);
        }
    }

    match connect.map(|raw| form_decode(raw.as_bytes(), 8)) {
        Some(value) if value == b"v1" => {}
        Some(value) => {
            return Err(CodecError::BadQuery(format!(
                "unsupported connect={:?}: this gateway speaks connect=v1",
                echo(&value)
            )));
        }
        None => {
            return Err(CodecError::BadQuery(
                "missing connect=v1 parameter".to_owned(),
            ));
        }
    }
    let codec = match encoding.map(|raw| form_decode(raw.as_bytes(), 16)) {
        Some(value) if value == b"json" => ConnectCodec::Json,
        Some(value) if value == b"proto" => ConnectCodec::Proto,
        Some(value) => {
            return Err(CodecError::BadQuery(format!(
                "unsupported encoding={:?}: use json or proto",
                echo(&value)
            )));
        }
        None => {
            return Err(CodecError::BadQuery(
                "missing encoding parameter (json or proto)".to_owned(),
            ));
        }
    };
    if let Some(raw) = compression {
        let value = form_decode(raw.as_bytes(), 32);
        if !(value.is_empty() || value == b"identity") {
            return Err(CodecError::UnsupportedCompression(echo(&value)));
        }
    }
    let is_base64 = match base64.map(|raw| form_decode(raw.as_bytes(), 8)) {
        None => false,
        Some(value) if value == b"1" => true,
        // connect-go reads anything but "1" as "not base64"; a typo such as
        // base64=true would then fail later with a confusing JSON or
        // protobuf error, so say what is wrong here instead.
        Some(value) if value == b"0" || value.is_empty() => false,
        Some(value) => {
            return Err(CodecError::BadQuery(format!(
                "unsupported base64={:?}: use base64=1 or leave it out",
                echo(&value)
            )));
        }
    };
    let Some(raw_message) = message else {
        return Err(CodecError::BadQuery(
            "missing message parameter (the url-encoded request message)".to_owned(),
        ));
    };
    let too_large = |declared: usize| CodecError::TooLarge {
        declared: u64::try_from(declared).unwrap_or(u64::MAX),
        max: max_bytes,
    };
    let bytes = if is_base64 {
        // Base64 takes 4 characters per 3 bytes: bound the text first.
        let text_max = max_bytes.saturating_add(2) / 3 * 4 + 3;
        let text = form_decode(raw_message.as_bytes(), text_max.saturating_add(1));
        if text.len() > text_max {
            return Err(too_large(text.len() / 4 * 3));
        }
        let bytes = URL_SAFE_INDIFFERENT
            .decode(&text)
            .or_else(|_| STANDARD_INDIFFERENT.decode(&text))
            .map_err(|_| {
                CodecError::BadQuery(
                    "message is not base64 (base64=1 asks for URL-safe base64, padding optional)"
                        .to_owned(),
                )
            })?;
        if bytes.len() > max_bytes {
            return Err(too_large(bytes.len()));
        }
        bytes
    } else {
        let bytes = form_decode(raw_message.as_bytes(), max_bytes.saturating_add(1));
        if bytes.len() > max_bytes {
            // The exact size is unknown (decoding stopped): report the
            // encoded length, an upper bound.
            return Err(too_large(raw_message.len()));
        }
        bytes
    };
    Ok((codec, Bytes::from(bytes)))
}

/// Form-URL-decodes `raw` (`+` is a space, `%XX` a byte, a malformed `%`
/// kept as it is), stopping after `limit` output bytes.
fn form_decode(raw: &[u8], limit: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len().min(limit));
    let mut i = 0;
    while i < raw.len() && out.len() < limit {
        let byte = raw[i];
        if byte == b'%'
            && let (Some(hi), Some(lo)) = (
                raw.get(i + 1).and_then(|&b| (b as char).to_digit(16)),
                raw.get(i + 2).and_then(|&b| (b as char).to_digit(16)),
            )
        {
            // Two hex digits are at most 0xff.
            out.push(((hi << 4) | lo) as u8);
            i += 3;
            continue;
        }
        out.push(if byte == b'+' { b' ' } else { byte });
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::frame::{FRAME_HEADER_LEN, FrameDecoder};
    use http::HeaderValue;
    use serde_json::{Value, json};

    #[test]
    fn content_types() {
        let cases = [
            (
                "application/json",
                Some(ConnectKind::Unary(ConnectCodec::Json)),
            ),
            (
                "application/json; charset=utf-8",
                Some(ConnectKind::Unary(ConnectCodec::Json)),
            ),
            (
                "Application/JSON;Charset=\"UTF-8\"",
                Some(ConnectKind::Unary(ConnectCodec::Json)),
            ),
            (
                "application/proto",
                Some(ConnectKind::Unary(ConnectCodec::Proto)),
            ),
            (
                "application/connect+json",
                Some(ConnectKind::Stream(ConnectCodec::Json)),
            ),
            (
                "application/connect+json; charset=utf-8",
                Some(ConnectKind::Stream(ConnectCodec::Json)),
            ),
            (
                "application/connect+proto",
                Some(ConnectKind::Stream(ConnectCodec::Proto)),
            ),
            ("application/json; charset=latin1", None),
            ("application/proto; charset=utf-8", None),
            ("application/json; boundary", None),
            ("application/grpc", None),
            ("application/grpc-web+proto", None),
            ("application/xml", None),
            ("text/json", None),
            ("", None),
        ];
        for (content_type, expected) in cases {
            assert_eq!(connect_kind(content_type), expected, "{content_type:?}");
        }
    }

    #[test]
    fn the_code_and_http_status_table() {
        let table = [
            (Code::Cancelled, "canceled", 499),
            (Code::Unknown, "unknown", 500),
            (Code::InvalidArgument, "invalid_argument", 400),
            (Code::DeadlineExceeded, "deadline_exceeded", 504),
            (Code::NotFound, "not_found", 404),
            (Code::AlreadyExists, "already_exists", 409),
            (Code::PermissionDenied, "permission_denied", 403),
            (Code::ResourceExhausted, "resource_exhausted", 429),
            (Code::FailedPrecondition, "failed_precondition", 400),
            (Code::Aborted, "aborted", 409),
            (Code::OutOfRange, "out_of_range", 400),
            (Code::Unimplemented, "unimplemented", 501),
            (Code::Internal, "internal", 500),
            (Code::Unavailable, "unavailable", 503),
            (Code::DataLoss, "data_loss", 500),
            (Code::Unauthenticated, "unauthenticated", 401),
        ];
        for (code, name, status) in table {
            assert_eq!(code_name(code), name);
            assert_eq!(code_from_name(name), Some(code));
            assert_eq!(http_status(code).as_u16(), status, "{name}");
        }
        assert_eq!(http_status(Code::Ok), StatusCode::OK);
        assert_eq!(code_from_name("cancelled"), None);
        assert_eq!(code_from_name("NOT_FOUND"), None);
        assert_eq!(code_from_name(""), None);
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout_ms(b"1500"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_timeout_ms(b"0"), Ok(Duration::ZERO));
        assert_eq!(
            parse_timeout_ms(b"9999999999"),
            Ok(Duration::from_millis(9_999_999_999))
        );
        for bad in [
            &b""[..],
            b"12345678901",
            b"-1",
            b"+1",
            b" 1",
            b"1 ",
            b"1.5",
            b"1e3",
            b"\xd9\xa1",
        ] {
            assert_eq!(
                parse_timeout_ms(bad),
                Err(CodecError::InvalidTimeout),
                "{bad:?}"
            );
        }
    }

    fn error_info() -> ErrorDetail {
        // google.rpc.ErrorInfo { reason: "INSUFFICIENT_STOCK", domain: "agora.dev" }
        let mut value = vec![0x0a, 18];
        value.extend_from_slice(b"INSUFFICIENT_STOCK");
        value.extend_from_slice(&[0x12, 9]);
        value.extend_from_slice(b"agora.dev");
        ErrorDetail {
            type_name: "google.rpc.ErrorInfo".to_owned(),
            value: Bytes::from(value),
        }
    }

    #[test]
    fn status_details_round_trip_padded_or_not() {
        let details = vec![
            error_info(),
            ErrorDetail {
                type_name: "x.Y".into(),
                value: Bytes::new(),
            },
        ];
        let mut padded_seen = 0;
        // Three message lengths: the encoding needs 0, 1 or 2 padding characters.
        for message in ["out of stock", "out of stock.", "out of stock.."] {
            let unpadded = status_bin(Code::FailedPrecondition, message, &details);
            assert!(!unpadded.ends_with('='));
            assert_eq!(
                details_from_status_bin(unpadded.as_bytes()),
                Ok(details.clone())
            );
            let padded = general_purpose::STANDARD.encode(
                general_purpose::STANDARD_NO_PAD
                    .decode(&unpadded)
                    .expect("valid"),
            );
            padded_seen += usize::from(padded.ends_with('='));
            assert_eq!(
                details_from_status_bin(padded.as_bytes()),
                Ok(details.clone())
            );
        }
        assert_eq!(padded_seen, 2);
        // A status without details.
        assert_eq!(details_from_status_bin(b""), Ok(vec![]));
    }

    #[test]
    fn status_details_keep_the_name_after_the_last_slash() {
        let status = RpcStatus {
            code: 3,
            message: String::new(),
            details: vec![
                prost_types::Any {
                    type_url: "example.com/a/b.C".into(),
                    value: vec![1],
                },
                prost_types::Any {
                    type_url: "NoSlash".into(),
                    value: vec![],
                },
            ],
        };
        let bin = general_purpose::STANDARD.encode(prost::Message::encode_to_vec(&status));
        let names: Vec<_> = details_from_status_bin(bin.as_bytes())
            .expect("valid")
            .into_iter()
            .map(|d| d.type_name)
            .collect();
        assert_eq!(names, ["b.C", "NoSlash"]);
    }

    #[test]
    fn invalid_status_details_are_internal_errors() {
        for bad in [&b"not base64!"[..], b"/w", b"CAE-"] {
            let error = details_from_status_bin(bad).expect_err("invalid");
            assert_eq!(error.code(), Code::Internal, "{bad:?}");
        }
    }

    #[test]
    fn error_body_shapes() {
        let body = error_body(Code::NotFound, "no such product", &[]);
        assert_eq!(
            serde_json::from_slice::<Value>(&body).expect("json"),
            json!({"code": "not_found", "message": "no such product"})
        );
        let body = error_body(Code::Internal, "", &[]);
        assert_eq!(&body[..], br#"{"code":"internal"}"#);
        let body = error_body(Code::FailedPrecondition, "out of stock", &[error_info()]);
        let value: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(value["details"][0]["type"], "google.rpc.ErrorInfo");
        let encoded = value["details"][0]["value"].as_str().expect("string");
        assert!(!encoded.ends_with('='), "unpadded: {encoded}");
        assert_eq!(
            general_purpose::STANDARD_NO_PAD
                .decode(encoded)
                .expect("base64"),
            error_info().value.to_vec()
        );
    }

    #[test]
    fn end_stream_frames() {
        let ok = end_stream_frame(None, &HeaderMap::new());
        assert_eq!(&ok[..], b"\x02\x00\x00\x00\x02{}");

        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("5"));
        trailers.insert("grpc-message", HeaderValue::from_static("gone"));
        trailers.append("x-trace", HeaderValue::from_static("a"));
        trailers.append("x-trace", HeaderValue::from_static("b"));
        let frame = end_stream_frame(Some((Code::NotFound, "gone", &[])), &trailers);
        let mut decoder = FrameDecoder::new(1024);
        decoder.push(&frame);
        let decoded = decoder.next_frame().expect("valid").expect("one frame");
        assert_eq!(decoded.flags, END_STREAM_FLAG);
        assert_eq!(decoded.payload.len() + FRAME_HEADER_LEN, frame.len());
        assert_eq!(
            serde_json::from_slice::<Value>(&decoded.payload).expect("json"),
            json!({
                "error": {"code": "not_found", "message": "gone"},
                "metadata": {"x-trace": ["a", "b"]}
            })
        );
    }

    #[test]
    fn get_queries() {
        let (codec, message) = parse_get_query(
            "connect=v1&encoding=json&message=%7B%22id%22%3A%22a+b%22%7D",
            64,
        )
        .expect("valid");
        assert_eq!(
            (codec, &message[..]),
            (ConnectCodec::Json, &br#"{"id":"a b"}"#[..])
        );

        // connect-es: binary message, URL-safe base64, unpadded.
        let proto = [0x0a, 0x03, 0xfb, 0xff, 0xfe];
        let encoded = general_purpose::URL_SAFE_NO_PAD.encode(proto);
        assert!(encoded.contains('-') || encoded.contains('_'));
        let query = format!(
            "?encoding=proto&base64=1&message={encoded}&connect=v1&compression=identity&cb=123"
        );
        assert_eq!(
            parse_get_query(&query, 64),
            Ok((ConnectCodec::Proto, Bytes::from(proto.to_vec())))
        );
        // Padded and standard alphabet also accepted.
        let padded = general_purpose::STANDARD
            .encode(proto)
            .replace('+', "%2B")
            .replace('/', "%2F");
        let query = format!("connect=v1&encoding=proto&base64=1&message={padded}");
        assert_eq!(
            parse_get_query(&query, 64).map(|(_, m)| m.to_vec()),
            Ok(proto.to_vec())
        );
        // An empty message is the empty proto message.
        assert_eq!(
            parse_get_query("connect=v1&encoding=proto&message=", 64),
            Ok((ConnectCodec::Proto, Bytes::new()))
        );
    }

    #[test]
    fn bad_get_queries() {
        let bad = [
            "encoding=json&message=%7B%7D",
            "connect=v2&encoding=json&message=%7B%7D",
            "connect=v1&message=%7B%7D",
            "connect=v1&encoding=xml&message=%7B%7D",
            "connect=v1&encoding=json",
            "connect=v1&encoding=proto&base64=true&message=AA",
            "connect=v1&encoding=proto&base64=1&message=%%%",
        ];
        for query in bad {
            let error = parse_get_query(query, 64).expect_err(query);
            assert!(
                matches!(error, CodecError::BadQuery(_)),
                "{query}: {error:?}"
            );
            assert_eq!(error.code(), Code::InvalidArgument);
        }
        let error = parse_get_query("connect=v1&encoding=json&compression=gzip&message=x", 64)
            .expect_err("gzip");
        assert_eq!(error, CodecError::UnsupportedCompression("gzip".into()));
        assert_eq!(error.code(), Code::Unimplemented);
    }

    #[test]
    fn get_query_messages_are_bounded_and_errors_do_not_echo_them() {
        let long = "x".repeat(10_000);
        let query = format!("connect=v1&encoding=json&message={long}");
        assert!(matches!(
            parse_get_query(&query, 100),
            Err(CodecError::TooLarge { max: 100, .. })
        ));
        let encoded = general_purpose::URL_SAFE_NO_PAD.encode(vec![0u8; 101]);
        let query = format!("connect=v1&encoding=proto&base64=1&message={encoded}");
        assert!(matches!(
            parse_get_query(&query, 100),
            Err(CodecError::TooLarge { .. })
        ));
        let encoded = general_purpose::URL_SAFE_NO_PAD.encode(vec![0u8; 100]);
        let query = format!("connect=v1&encoding=proto&base64=1&message={encoded}");
        assert_eq!(parse_get_query(&query, 100).map(|(_, m)| m.len()), Ok(100));
        let query = format!("connect=v1&encoding={long}&message=x");
        let message = parse_get_query(&query, 100)
            .expect_err("bad encoding")
            .to_string();
        assert!(message.len() < 200, "{message}");
    }
}
