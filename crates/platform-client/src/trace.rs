//! One client span per call, and its W3C trace context in the call's
//! headers, so that the callee's span is its child.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Code;
use tower::ServiceExt as _;
use tracing::Instrument as _;

use crate::call::response_code;
use crate::{CallService, ResponseFuture};

/// Traces every call.
#[derive(Clone, Debug)]
pub struct TraceLayer {
    service: Arc<str>,
}

impl TraceLayer {
    /// Calls to `service` (the name in configuration, e.g. `payments`).
    pub fn new(service: &str) -> Self {
        Self {
            service: Arc::from(service),
        }
    }
}

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Traced<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Traced {
            service: Arc::clone(&self.service),
            inner,
        }
    }
}

/// The service made by [`TraceLayer`].
#[derive(Clone, Debug)]
pub struct Traced<S> {
    service: Arc<str>,
    inner: S,
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for Traced<S>
where
    S: CallService,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::Status;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let path = request.uri().path().trim_start_matches('/');
        let (grpc_service, method) = path.split_once('/').unwrap_or((path, ""));
        let span = tracing::info_span!(
            "rpc.client",
            otel.name = %format_args!("{grpc_service}/{method}"),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = %grpc_service,
            rpc.method = %method,
            peer.service = %self.service,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        // The callee's parent is this span, so its context is taken inside it.
        let headers = span.in_scope(agora_platform::telemetry::current_trace_headers);
        for (name, value) in headers {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::try_from(name),
                http::HeaderValue::try_from(value),
            ) {
                request.headers_mut().insert(name, value);
            }
        }
        let call = self.inner.clone().oneshot(request);
        let call_span = span.clone();
        Box::pin(
            async move {
                match call.await {
                    Ok(response) => {
                        let (parts, body) = response.into_parts();
                        let mut body = SpanBody {
                            inner: body,
                            span: call_span,
                            finished: false,
                        };
                        // An error arrives as a trailers-only response;
                        // otherwise the status comes at the end of the body.
                        let probe = http::Response::from_parts(parts, ());
                        if let Some(code) = response_code(&probe) {
                            body.finish(code);
                        }
                        let (parts, ()) = probe.into_parts();
                        Ok(http::Response::from_parts(
                            parts,
                            tonic::body::Body::new(body),
                        ))
                    }
                    Err(status) => {
                        record(&call_span, status.code());
                        Err(status)
                    }
                }
            }
            .instrument(span),
        )
    }
}

fn record(span: &tracing::Span, code: Code) {
    span.record("rpc.grpc.status_code", code as i32);
    if code != Code::Ok {
        // For the caller any failed call is an error.
        span.record("otel.status_code", "ERROR");
    }
}

/// The response body, recording the call's status on its span when the
/// trailers pass (or when the caller drops the response first).
struct SpanBody {
    inner: tonic::body::Body,
    span: tracing::Span,
    finished: bool,
}

impl SpanBody {
    fn finish(&mut self, code: Code) {
        if !std::mem::replace(&mut self.finished, true) {
            record(&self.span, code);
        }
    }
}

impl http_body::Body for SpanBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame
                    .trailers_ref()
                    .and_then(|trailers| trailers.get("grpc-status"))
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.parse::<i32>().ok())
                {
                    self.finish(Code::from_i32(code));
                }
            }
            Poll::Ready(Some(Err(status))) => {
                let code = status.code();
                self.finish(code);
            }
            Poll::Ready(None) => self.finish(Code::Ok),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for SpanBody {
    fn drop(&mut self) {
        // Dropped before its end: the caller gave up on the call.
        self.finish(Code::Cancelled);
    }
}
