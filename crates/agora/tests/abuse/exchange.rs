//! Sending one case and reading how it ended.
//!
//! Two clients, each on a connection of its own per case (so that a case
//! that makes the server drop its connection is charged to that case
//! alone):
//! - tonic's `Grpc<Channel>` with [`BytesCodec`], a codec that sends the
//!   case's bytes as the message unchanged and hands back whatever the
//!   server answers: a real gRPC client, as a neighbour service would be;
//! - hyper's bare HTTP/2 client for the cases tonic would not send as they
//!   are (broken frames, an odd `content-type` or `grpc-encoding`) or would
//!   answer itself (tonic's channel enforces `grpc-timeout` on its side,
//!   so a deadline of 0 would never reach the server's answer). The status
//!   is read from the trailers (or a trailers-only answer) by hand, and an
//!   answer without one counts as malformed.

use std::time::Duration;

use bytes::{Buf as _, BufMut as _, Bytes};
use http::HeaderValue;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};

use super::cases::{Auth, Case, Route, Rpc};

#[cfg(test)]
mod tests {
    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(super::percent_decoded(b"a%20b%25c%2"), "a b%c%2");
        assert_eq!(super::percent_decoded(b"%E2%82%AC"), "\u{20ac}");
    }
}

/// The longest one case may take before it counts as hung: far beyond any
/// limit a service sets (default deadline 30 s is for calls with no
/// `grpc-timeout`, which the hostile ones mostly are).
pub const CASE_TIMEOUT: Duration = Duration::from_secs(40);
/// Messages read from a server stream before the case counts as answered.
const STREAM_MESSAGES: usize = 16;

/// How a case ended, as the client saw it.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The status code, or `None` when no well-formed status came back
    /// (no `grpc-status`, an HTTP error, no answer in time).
    pub code: Option<Code>,
    /// The status message (or what went wrong).
    pub message: String,
}

impl Outcome {
    fn from_status(status: &tonic::Status) -> Self {
        let mut message = status.message().to_owned();
        // Errors tonic's client made up (transport failures) carry their
        // cause as the source; a server's status does not.
        if let Some(source) = std::error::Error::source(status) {
            message = format!("{message} [client: {source}]");
        }
        Self {
            code: Some(status.code()),
            message,
        }
    }
}

/// Sends a case of `rpc` to `addr` (`host:port`) and waits for its end,
/// for at most [`CASE_TIMEOUT`] and not past `suite_deadline`.
pub async fn send(
    case: &Case,
    rpc: &Rpc,
    addr: &str,
    suite_deadline: tokio::time::Instant,
) -> Outcome {
    let deadline = suite_deadline.min(tokio::time::Instant::now() + CASE_TIMEOUT);
    let call = async {
        match case.route {
            Route::Service | Route::Gateway => via_tonic(case, rpc, addr).await,
            Route::Raw => via_hyper(case, rpc, addr).await,
        }
    };
    match tokio::time::timeout_at(deadline, call).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome {
            code: None,
            message: format!("no answer within {CASE_TIMEOUT:?} (or the suite's deadline)"),
        },
    }
}

async fn via_tonic(case: &Case, rpc: &Rpc, addr: &str) -> Outcome {
    match tonic_call(case, rpc, addr).await {
        Ok(()) => Outcome {
            code: Some(Code::Ok),
            message: String::new(),
        },
        Err(status) => Outcome::from_status(&status),
    }
}

async fn tonic_call(case: &Case, rpc: &Rpc, addr: &str) -> Result<(), tonic::Status> {
    let client_error = |what: &str, err: &dyn std::fmt::Display| {
        // UNKNOWN is never allowed, so a broken harness cannot pass.
        tonic::Status::unknown(format!("client: {what}: {err}"))
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|err| client_error("endpoint", &err))?
        .connect()
        .await
        .map_err(|err| client_error("connect", &err))?;
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(64 << 20);
    let mut request = tonic::Request::new(case.body.clone());
    set_auth(request.metadata_mut(), &case.auth).map_err(|err| client_error("metadata", &err))?;
    for (name, value) in &case.headers {
        let value = AsciiMetadataValue::try_from(value.as_slice())
            .map_err(|err| client_error("metadata", &err))?;
        request.metadata_mut().append(*name, value);
    }
    grpc.ready()
        .await
        .map_err(|err| client_error("ready", &err))?;
    let path = http::uri::PathAndQuery::try_from(rpc.path.as_str())
        .map_err(|err| client_error("path", &err))?;
    if rpc.server_streaming {
        let mut stream = grpc
            .server_streaming(request, path, BytesCodec)
            .await?
            .into_inner();
        let mut received = 0;
        while stream.message().await?.is_some() {
            received += 1;
            if received >= STREAM_MESSAGES {
                break;
            }
        }
    } else {
        grpc.unary(request, path, BytesCodec).await?;
    }
    Ok(())
}

/// The `authorization` of a case into tonic metadata.
fn set_auth(metadata: &mut MetadataMap, auth: &Auth) -> anyhow::Result<()> {
    for value in auth_values(auth) {
        metadata.append(
            "authorization",
            AsciiMetadataValue::try_from(value.as_slice())?,
        );
    }
    Ok(())
}

fn auth_values(auth: &Auth) -> Vec<Vec<u8>> {
    match auth {
        Auth::None => Vec::new(),
        Auth::Bearer(token) => vec![format!("Bearer {token}").into_bytes()],
        Auth::Raw(bytes) => vec![bytes.clone()],
        Auth::Twice(first, second) => vec![
            format!("Bearer {first}").into_bytes(),
            format!("Bearer {second}").into_bytes(),
        ],
    }
}

async fn via_hyper(case: &Case, rpc: &Rpc, addr: &str) -> Outcome {
    match hyper_call(case, rpc, addr).await {
        Ok(outcome) => outcome,
        Err(err) => Outcome {
            code: None,
            message: format!("client: {err:#}"),
        },
    }
}

async fn hyper_call(case: &Case, rpc: &Rpc, addr: &str) -> anyhow::Result<Outcome> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    // Ends when the sender is dropped and the exchange is over.
    tokio::spawn(connection);
    let mut request = http::Request::post(format!("http://{addr}{}", rpc.path))
        .header(http::header::CONTENT_TYPE, case.content_type)
        .header(http::header::TE, "trailers");
    if let Some(encoding) = case.encoding {
        request = request.header("grpc-encoding", encoding);
    }
    if let Some(timeout) = case.timeout {
        request = request.header("grpc-timeout", timeout);
    }
    for value in auth_values(&case.auth) {
        request = request.header(
            http::header::AUTHORIZATION,
            HeaderValue::from_bytes(&value)?,
        );
    }
    let request = request.body(Full::new(case.body.clone()))?;
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?;
    let trailers = body.trailers().cloned().unwrap_or_default();
    // A trailers-only answer puts the status in the headers.
    let status = trailers
        .get("grpc-status")
        .or_else(|| parts.headers.get("grpc-status"));
    let message = trailers
        .get("grpc-message")
        .or_else(|| parts.headers.get("grpc-message"))
        .map(|m| percent_decoded(m.as_bytes()))
        .unwrap_or_default();
    let code = status
        .and_then(|s| s.to_str().ok())
        .and_then(|s| s.parse::<i32>().ok())
        .filter(|n| (0..=16).contains(n))
        .map(Code::from_i32);
    Ok(match code {
        Some(code) if parts.status == http::StatusCode::OK => Outcome {
            code: Some(code),
            message,
        },
        _ => Outcome {
            code: None,
            message: format!(
                "malformed answer: HTTP {}, grpc-status {status:?}, {message}",
                parts.status
            ),
        },
    })
}

/// A `grpc-message` value, percent-decoded (as the gRPC spec encodes it).
fn percent_decoded(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = raw
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (raw[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends [`Bytes`] as the message as they are and returns the answer's
/// bytes undecoded: the case decides what is on the wire.
#[derive(Clone, Copy, Debug, Default)]
pub struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
