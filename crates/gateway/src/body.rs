//! Bodies in and out of the gateway: request bodies checked (and for
//! grpc-web text and Connect JSON, translated) frame by frame on their way
//! to the backend; backend answers translated frame by frame on their way
//! to the client. Nothing waits for a whole stream: every frame is passed
//! on as soon as it is complete, and nothing is buffered beyond one
//! message of at most the configured size.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Response};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, StreamBody};
use prost_reflect::MessageDescriptor;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tonic::Code;

use crate::codec::CodecError;
use crate::codec::connect::{self, ConnectCodec};
use crate::codec::frame::{FrameDecoder, FrameLimiter, encode_frame};
use crate::codec::grpc_web::{self, WebFormat};
use crate::codec::json::JsonCodec;
use crate::codec::text::{Base64Decoder, encode_base64};
use crate::edge::{CallLog, response_metadata, status_details};

/// Errors of the bodies the gateway sends.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every response body of the gateway.
pub type EdgeBody = UnsyncBoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> EdgeBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body of one chunk.
pub fn full(bytes: Bytes) -> EdgeBody {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Where a request body that failed (a message too large, bad base64, bad
/// JSON) leaves its status: the backend only sees the stream cut, and the
/// client must be told why instead.
#[derive(Clone, Default)]
pub struct RequestSlot(Arc<Mutex<Option<tonic::Status>>>);

impl RequestSlot {
    fn set(&self, status: tonic::Status) {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        slot.get_or_insert(status);
    }

    /// The request body's failure, if any.
    pub fn take(&self) -> Option<tonic::Status> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// The status of a client's request that does not decode.
pub fn codec_status(err: &CodecError) -> tonic::Status {
    tonic::Status::new(err.code(), err.to_string())
}

/// The status of a backend answer that does not decode: the backend's
/// fault (INTERNAL), unless it is only too large to convert.
pub fn backend_codec_status(err: &CodecError) -> tonic::Status {
    let code = match err.code() {
        Code::ResourceExhausted => Code::ResourceExhausted,
        _ => Code::Internal,
    };
    tonic::Status::new(code, format!("the backend's answer: {err}"))
}

type Incoming = hyper::body::Incoming;

/// One way of turning a client's request body into gRPC frames, chunk by
/// chunk; [`translated`] runs it.
trait Translate: Send + 'static {
    /// The bytes to send on for one chunk (none, one or several pieces).
    fn chunk(&mut self, data: Bytes, out: &mut Vec<Bytes>) -> Result<(), tonic::Status>;
    /// At the end of the body: an error if it stopped mid-frame.
    fn finish(&mut self) -> Result<(), tonic::Status>;
}

/// The request body for the backend: each chunk translated as it arrives.
/// A chunk that fails leaves its status in `slot` (the client is told
/// that, not what the backend made of the cut stream) and ends the body.
fn translated(
    incoming: Incoming,
    mut translate: impl Translate,
    slot: RequestSlot,
) -> tonic::body::Body {
    let stream = async_stream::stream! {
        let mut incoming = incoming;
        let mut out = Vec::new();
        while let Some(frame) = incoming.frame().await {
            let data = match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
                Err(err) => {
                    yield Err(tonic::Status::cancelled(format!("the client's request stream failed: {err}")));
                    return;
                }
            };
            if let Err(status) = translate.chunk(data, &mut out) {
                slot.set(status.clone());
                yield Err(status);
                return;
            }
            for piece in out.drain(..) {
                yield Ok(Frame::data(piece));
            }
        }
        if let Err(status) = translate.finish() {
            slot.set(status.clone());
            yield Err(status);
        }
    };
    tonic::body::Body::new(StreamBody::new(stream))
}

/// gRPC and binary grpc-web: the bytes as sent, every frame's length
/// checked against the limit without copying it.
struct Limited(FrameLimiter);

impl Translate for Limited {
    fn chunk(&mut self, data: Bytes, out: &mut Vec<Bytes>) -> Result<(), tonic::Status> {
        self.0.check(&data).map_err(|err| codec_status(&err))?;
        out.push(data);
        Ok(())
    }

    fn finish(&mut self) -> Result<(), tonic::Status> {
        self.0.finish().map_err(|err| codec_status(&err))
    }
}

/// grpc-web-text: base64 decoded as it arrives, then checked as [`Limited`].
struct Text(Base64Decoder, Limited);

impl Translate for Text {
    fn chunk(&mut self, data: Bytes, out: &mut Vec<Bytes>) -> Result<(), tonic::Status> {
        let decoded = self.0.push(&data).map_err(|err| codec_status(&err))?;
        if decoded.is_empty() {
            return Ok(());
        }
        self.1.chunk(decoded, out)
    }

    fn finish(&mut self) -> Result<(), tonic::Status> {
        self.0.finish().map_err(|err| codec_status(&err))?;
        self.1.finish()
    }
}

/// Connect streaming JSON: each envelope's message converted to protobuf
/// and framed for gRPC.
struct ConnectJson {
    decoder: FrameDecoder,
    input: MessageDescriptor,
    json: JsonCodec,
}

impl Translate for ConnectJson {
    fn chunk(&mut self, data: Bytes, out: &mut Vec<Bytes>) -> Result<(), tonic::Status> {
        self.decoder.push_bytes(data);
        while let Some(frame) = self
            .decoder
            .next_frame()
            .map_err(|err| codec_status(&err))?
        {
            if frame.flags != 0 {
                return Err(tonic::Status::invalid_argument(
                    "a Connect request envelope must have flags 0 (no compression, no end-of-stream)",
                ));
            }
            let proto = self
                .json
                .json_to_proto(&self.input, &frame.payload)
                .map_err(|err| codec_status(&err))?;
            out.push(encode_frame(0, &proto));
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), tonic::Status> {
        self.decoder.finish().map_err(|err| codec_status(&err))
    }
}

/// The request body as the client sent it (gRPC and binary grpc-web frames
/// are the same bytes), every frame checked against `max` bytes.
pub fn limited_frames(incoming: Incoming, max: usize, slot: RequestSlot) -> tonic::body::Body {
    translated(incoming, Limited(FrameLimiter::new(max)), slot)
}

/// A grpc-web-text request body: base64 decoded as it arrives, then
/// checked as [`limited_frames`] does.
pub fn text_frames(incoming: Incoming, max: usize, slot: RequestSlot) -> tonic::body::Body {
    translated(
        incoming,
        Text(Base64Decoder::new(), Limited(FrameLimiter::new(max))),
        slot,
    )
}

/// A Connect streaming request in JSON: each envelope's JSON message
/// converted to protobuf and framed for gRPC.
pub fn connect_json_frames(
    incoming: Incoming,
    input: MessageDescriptor,
    json: JsonCodec,
    max: usize,
    slot: RequestSlot,
) -> tonic::body::Body {
    translated(
        incoming,
        ConnectJson {
            decoder: FrameDecoder::new(max),
            input,
            json,
        },
        slot,
    )
}

/// How a body read whole is bounded: its size, the memory all such bodies
/// share, and time.
pub struct CollectLimits<'a> {
    /// The largest body.
    pub max: usize,
    /// Bytes all bodies being held share (one permit per byte).
    pub budget: &'a Arc<Semaphore>,
    /// The call's deadline: the whole body must be there by then.
    pub deadline: Instant,
    /// The longest wait for the next piece of the body.
    pub idle: Duration,
}

/// A whole request body (Connect unary), refused as soon as its announced or
/// received length passes `limits.max`, when the bytes held by all clients
/// would pass the budget, or when it arrives too slowly. The permit holds
/// the body's share of the budget for as long as the body lives.
pub async fn collect_limited(
    mut incoming: Incoming,
    headers: &HeaderMap,
    limits: CollectLimits<'_>,
) -> Result<(Bytes, OwnedSemaphorePermit), tonic::Status> {
    let max = limits.max;
    let too_large = || {
        tonic::Status::resource_exhausted(format!("the request body is larger than {max} bytes"))
    };
    let announced = headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if announced.is_some_and(|length| length > max as u64) {
        return Err(too_large());
    }
    let mut held = Arc::clone(limits.budget)
        .try_acquire_many_owned(0)
        .map_err(|_| tonic::Status::unavailable("the gateway is shutting down"))?;
    let mut body = BytesMut::new();
    loop {
        let wait = Instant::now()
            .checked_add(limits.idle)
            .map_or(limits.deadline, |idle| idle.min(limits.deadline));
        let frame = match tokio::time::timeout_at(wait, incoming.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => {
                return Err(tonic::Status::deadline_exceeded(
                    "the request body arrived too slowly",
                ));
            }
        };
        let frame = frame.map_err(|err| {
            tonic::Status::cancelled(format!("the client's request body failed: {err}"))
        })?;
        if let Ok(data) = frame.into_data() {
            if body.len() + data.len() > max {
                return Err(too_large());
            }
            let share = u32::try_from(data.len()).map_err(|_| too_large())?;
            let permit = Arc::clone(limits.budget)
                .try_acquire_many_owned(share)
                .map_err(|_| {
                    tonic::Status::resource_exhausted(
                        "the gateway holds as many request bodies as it may: retry shortly",
                    )
                })?;
            held.merge(permit);
            body.extend_from_slice(&data);
        }
    }
    Ok((body.freeze(), held))
}

/// A body of one chunk that gives back its share of the buffer budget once
/// sent on.
pub fn held_body(bytes: Bytes, permit: OwnedSemaphorePermit) -> tonic::body::Body {
    let stream = futures::stream::once(async move {
        drop(permit);
        Ok::<_, tonic::Status>(Frame::data(bytes))
    });
    tonic::body::Body::new(StreamBody::new(stream))
}

/// The next frame of a backend's answer, or DEADLINE_EXCEEDED once the
/// call's deadline passes: the client stack's deadline covers only the wait
/// for the answer's head, and a stream must not outlive its deadline.
async fn next_frame(
    body: &mut tonic::body::Body,
    deadline: Instant,
) -> Option<Result<Frame<Bytes>, tonic::Status>> {
    match tokio::time::timeout_at(deadline, body.frame()).await {
        Ok(frame) => frame,
        Err(_) => Some(Err(tonic::Status::deadline_exceeded(
            "the call's deadline passed",
        ))),
    }
}

/// The status of trailers (or of a trailers-only reply's headers).
fn status_of(headers: &HeaderMap) -> Option<tonic::Status> {
    headers
        .contains_key("grpc-status")
        .then(|| tonic::Status::from_header_map(headers))
        .flatten()
}

/// The status's trailers.
fn trailers_of(status: &tonic::Status) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    if status.add_header(&mut trailers).is_err() {
        trailers.insert("grpc-status", HeaderValue::from(status.code() as i32));
    }
    trailers
}

fn ended_without_status() -> tonic::Status {
    tonic::Status::internal("the backend's answer ended without a gRPC status")
}

/// A native gRPC answer, passed through; a backend stream that breaks ends
/// with a status in trailers rather than a reset.
pub fn grpc_response(
    response: http::Response<tonic::body::Body>,
    deadline: Instant,
    mut log: CallLog,
    slot: RequestSlot,
) -> Response<EdgeBody> {
    let (parts, body) = response.into_parts();
    if let Some(status) = status_of(&parts.headers) {
        log.finish(status.code());
        return Response::from_parts(parts, empty());
    }
    let stream = async_stream::stream! {
        let mut body = body;
        while let Some(frame) = next_frame(&mut body, deadline).await {
            match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => yield Ok::<_, BoxError>(Frame::data(data)),
                    Err(frame) => {
                        let Ok(trailers) = frame.into_trailers() else { continue };
                        let trailers = match slot.take() {
                            Some(status) => trailers_of(&status),
                            None => trailers,
                        };
                        log.finish(status_of(&trailers).map_or(Code::Unknown, |s| s.code()));
                        yield Ok(Frame::trailers(trailers));
                        return;
                    }
                },
                Err(status) => {
                    let status = slot.take().unwrap_or(status);
                    log.finish(status.code());
                    yield Ok(Frame::trailers(trailers_of(&status)));
                    return;
                }
            }
        }
        let status = slot.take().unwrap_or_else(ended_without_status);
        log.finish(status.code());
        yield Ok(Frame::trailers(trailers_of(&status)));
    };
    Response::from_parts(parts, StreamBody::new(stream).boxed_unsync())
}

/// A grpc-web answer: the backend's frames as they come (base64 each in
/// text mode), then its trailers as the final 0x80 frame. A trailers-only
/// reply stays headers-only (an empty 0x80 frame breaks connect-es).
pub fn grpc_web_response(
    response: http::Response<tonic::body::Body>,
    format: WebFormat,
    deadline: Instant,
    mut log: CallLog,
    slot: RequestSlot,
) -> Response<EdgeBody> {
    let (mut parts, body) = response.into_parts();
    parts.headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(grpc_web::response_content_type(format)),
    );
    parts.headers.remove(CONTENT_LENGTH);
    if let Some(status) = status_of(&parts.headers) {
        log.finish(status.code());
        return Response::from_parts(parts, empty());
    }
    let encode = move |bytes: Bytes| match format {
        WebFormat::Binary => bytes,
        WebFormat::Text => encode_base64(&bytes),
    };
    let stream = async_stream::stream! {
        let mut body = body;
        let mut ended = None;
        while let Some(frame) = next_frame(&mut body, deadline).await {
            match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => yield Ok::<_, BoxError>(Frame::data(encode(data))),
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            ended = Some(trailers);
                            break;
                        }
                    }
                },
                Err(status) => {
                    ended = Some(trailers_of(&status));
                    break;
                }
            }
        }
        let trailers = match (slot.take(), ended) {
            (Some(status), _) => trailers_of(&status),
            (None, Some(trailers)) => trailers,
            (None, None) => trailers_of(&ended_without_status()),
        };
        log.finish(status_of(&trailers).map_or(Code::Unknown, |s| s.code()));
        yield Ok(Frame::data(encode(grpc_web::trailer_frame(&trailers))));
    };
    Response::from_parts(parts, StreamBody::new(stream).boxed_unsync())
}

/// A Connect streaming answer: each message in an envelope (converted to
/// JSON for the JSON codec; protobuf envelopes are the gRPC frames as they
/// are), then the end-of-stream envelope with the error, if any, and the
/// trailers as metadata.
#[allow(clippy::too_many_arguments)]
pub fn connect_stream_response(
    response: http::Response<tonic::body::Body>,
    codec: ConnectCodec,
    output: MessageDescriptor,
    json: JsonCodec,
    max: usize,
    deadline: Instant,
    mut log: CallLog,
    slot: RequestSlot,
) -> Response<EdgeBody> {
    let (parts, body) = response.into_parts();
    let mut headers = response_metadata(&parts.headers);
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(codec.stream_content_type()),
    );
    let end = |status: &tonic::Status, metadata: &HeaderMap| {
        if status.code() == Code::Ok {
            connect::end_stream_frame(None, metadata)
        } else {
            let details = status_details(status);
            connect::end_stream_frame(Some((status.code(), status.message(), &details)), metadata)
        }
    };
    if let Some(status) = status_of(&parts.headers) {
        log.finish(status.code());
        let frame = end(&status, &HeaderMap::new());
        let mut response = Response::new(full(frame));
        *response.headers_mut() = headers;
        return response;
    }
    let stream = async_stream::stream! {
        let mut body = body;
        let mut decoder = FrameDecoder::new(max);
        let mut ended: Option<(tonic::Status, HeaderMap)> = None;
        'frames: while let Some(frame) = next_frame(&mut body, deadline).await {
            match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => match codec {
                        ConnectCodec::Proto => yield Ok::<_, BoxError>(Frame::data(data)),
                        ConnectCodec::Json => {
                            decoder.push_bytes(data);
                            loop {
                                match decoder.next_frame() {
                                    Ok(None) => break,
                                    Ok(Some(message)) => match json.proto_to_json(&output, &message.payload) {
                                        Ok(converted) => yield Ok(Frame::data(encode_frame(0, &converted))),
                                        Err(err) => {
                                            let status = tonic::Status::internal(format!(
                                                "the backend's message cannot be written as JSON: {err}"
                                            ));
                                            ended = Some((status, HeaderMap::new()));
                                            break 'frames;
                                        }
                                    },
                                    Err(err) => {
                                        ended = Some((backend_codec_status(&err), HeaderMap::new()));
                                        break 'frames;
                                    }
                                }
                            }
                        }
                    },
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let status = status_of(&trailers).unwrap_or_else(ended_without_status);
                            ended = Some((status, response_metadata(&trailers)));
                            break;
                        }
                    }
                },
                Err(status) => {
                    ended = Some((status, HeaderMap::new()));
                    break;
                }
            }
        }
        let (status, metadata) = match (slot.take(), ended) {
            (Some(status), _) => (status, HeaderMap::new()),
            (None, Some(ended)) => ended,
            (None, None) => (ended_without_status(), HeaderMap::new()),
        };
        log.finish(status.code());
        yield Ok(Frame::data(end(&status, &metadata)));
    };
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    *response.headers_mut() = headers;
    response
}
