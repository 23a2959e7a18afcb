//! Retrying calls that failed with UNAVAILABLE: the instance was down, its
//! breaker open, or it said so before doing anything. Only methods the
//! [`CallPolicy`] marks idempotent are retried (a repeated charge must be
//! harmless before it is repeated), at most `clients.max_retries` times,
//! after a jittered exponential pause, within a budget of
//! `clients.retry_budget_percent` of the calls made (so retries cannot
//! multiply the load on a service that is down), and never past the call's
//! deadline. Each retry prefers an instance not tried yet. A refusal because
//! no instance admits calls (every breaker open) is not retried: it would
//! only be refused again, after a pause.
//!
//! To be sent again a request body must be kept: it is buffered, up to
//! [`MAX_REPLAY_BODY_BYTES`]; a longer one is sent once, unretried.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use agora_platform::backoff::{exponential, jittered};
use bytes::{Bytes, BytesMut};
use tokio::time::Instant;
use tonic::Code;
use tower::ServiceExt as _;
use tower::retry::budget::{Budget as _, TpsBudget};

use crate::call::{CallDeadline, NoInstanceAdmits, TriedEndpoints, outcome_code};
use crate::deadline::set_grpc_timeout;
use crate::{CallPolicy, CallService, ClientSettings, ResponseFuture};

/// The largest request body kept for retries (unary requests between
/// services are far smaller).
pub const MAX_REPLAY_BODY_BYTES: usize = 64 * 1024;
/// Retries allowed per second whatever the traffic, so that a quiet caller
/// can still retry its few calls.
const MIN_RETRIES_PER_SECOND: u32 = 1;
/// The window the budget counts calls and retries over.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// The pause before the first retry (jittered); it doubles after each.
const BACKOFF_BASE: Duration = Duration::from_millis(50);
/// The longest pause between two attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Retries what the policy allows.
#[derive(Clone)]
pub struct RetryLayer {
    service: Arc<str>,
    policy: CallPolicy,
    max_retries: u32,
    budget: Arc<TpsBudget>,
}

impl RetryLayer {
    /// Retries for calls to `service`, with one budget for all of them.
    pub fn new(service: &str, policy: CallPolicy, settings: &ClientSettings) -> Self {
        // TpsBudget takes a ratio, at most 1000 (100 000 %).
        let ratio = (settings.retry_budget_percent as f32 / 100.0).min(1000.0);
        Self {
            service: Arc::from(service),
            policy,
            max_retries: settings.max_retries,
            budget: Arc::new(TpsBudget::new(BUDGET_WINDOW, MIN_RETRIES_PER_SECOND, ratio)),
        }
    }
}

impl<S> tower::Layer<S> for RetryLayer {
    type Service = Retrying<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retrying {
            layer: self.clone(),
            inner,
        }
    }
}

/// The service made by [`RetryLayer`].
#[derive(Clone)]
pub struct Retrying<S> {
    layer: RetryLayer,
    inner: S,
}

/// The pause before retry number `retry` (0 for the first): the
/// exponential delay, of which the second half is random, so that callers
/// that failed together do not come back together.
pub fn backoff(retry: u32) -> Duration {
    jittered(exponential(retry, BACKOFF_BASE, BACKOFF_MAX))
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for Retrying<S>
where
    S: CallService,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::Status;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        // Every call earns the budget its share of retries.
        self.layer.budget.deposit();
        let inner = self.inner.clone();
        if self.layer.max_retries == 0 || !self.layer.policy.is_idempotent(request.uri().path()) {
            return Box::pin(inner.oneshot(request));
        }
        let layer = self.layer.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let template = Template::from(parts);
            let body = match buffer(body, MAX_REPLAY_BODY_BYTES).await? {
                Buffered::Complete(body) => body,
                Buffered::TooLong { prefix, rest } => {
                    tracing::debug!(
                        service = %layer.service,
                        "request body too long to keep for retries; sending it once"
                    );
                    let body = tonic::body::Body::new(PrefixedBody {
                        prefix: Some(prefix),
                        rest,
                    });
                    return inner.oneshot(template.request(body)).await;
                }
            };
            let tried = TriedEndpoints::default();
            let none_admits = NoInstanceAdmits::default();
            let mut retries = 0;
            loop {
                let mut attempt = template.request(tonic::body::Body::new(body.clone()));
                attempt.extensions_mut().insert(tried.clone());
                attempt.extensions_mut().insert(none_admits.clone());
                if retries > 0
                    && let Some(CallDeadline { at, .. }) = template.deadline()
                {
                    // The callee gets what is left, not the whole budget again.
                    set_grpc_timeout(&mut attempt, at.saturating_duration_since(Instant::now()));
                    // And the breaker learns that this attempt runs short.
                    attempt.extensions_mut().insert(CallDeadline {
                        at,
                        full_budget: false,
                    });
                }
                let result = inner.clone().oneshot(attempt).await;
                if outcome_code(&result) != Some(Code::Unavailable) || retries >= layer.max_retries
                {
                    return result;
                }
                if none_admits.is_set() {
                    // Every breaker is open: fail fast, as an open breaker should.
                    return result;
                }
                let pause = backoff(retries);
                if let Some(CallDeadline { at, .. }) = template.deadline()
                    && Instant::now() + pause >= at
                {
                    // No time for another attempt: the failure is the answer.
                    return result;
                }
                if !layer.budget.withdraw() {
                    tracing::debug!(service = %layer.service, "retry budget spent; not retrying");
                    return result;
                }
                tracing::debug!(
                    service = %layer.service,
                    retry = retries + 1,
                    pause_ms = pause.as_millis(),
                    "retrying after UNAVAILABLE"
                );
                tokio::time::sleep(pause).await;
                retries += 1;
            }
        })
    }
}

/// Everything of a request but its body, to build each attempt from.
struct Template {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
    extensions: http::Extensions,
}

impl From<http::request::Parts> for Template {
    fn from(parts: http::request::Parts) -> Self {
        Self {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
            extensions: parts.extensions,
        }
    }
}

impl Template {
    fn request(&self, body: tonic::body::Body) -> http::Request<tonic::body::Body> {
        let mut request = http::Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        *request.extensions_mut() = self.extensions.clone();
        request
    }

    fn deadline(&self) -> Option<CallDeadline> {
        self.extensions.get::<CallDeadline>().copied()
    }
}

enum Buffered {
    /// The whole body, to send as often as needed.
    Complete(ReplayBody),
    /// More than the limit: what was read, and the rest still to read.
    TooLong {
        prefix: Bytes,
        rest: tonic::body::Body,
    },
}

/// Reads `body` to its end, unless it is longer than `limit`.
async fn buffer(mut body: tonic::body::Body, limit: usize) -> Result<Buffered, tonic::Status> {
    use http_body::Body as _;
    let mut data = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        match frame?.into_data() {
            Ok(chunk) => {
                data.extend_from_slice(&chunk);
                if data.len() > limit {
                    return Ok(Buffered::TooLong {
                        prefix: data.freeze(),
                        rest: body,
                    });
                }
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    Ok(Buffered::Complete(ReplayBody {
        data: Some(data.freeze()).filter(|data| !data.is_empty()),
        trailers,
    }))
}

/// A buffered request body, sent again as it was.
#[derive(Clone, Debug)]
struct ReplayBody {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl http_body::Body for ReplayBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
        }
        Poll::Ready(
            self.trailers
                .take()
                .map(|t| Ok(http_body::Frame::trailers(t))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let length = self.data.as_ref().map_or(0, Bytes::len);
        http_body::SizeHint::with_exact(u64::try_from(length).unwrap_or(u64::MAX))
    }
}

/// What was buffered of a long body, then the rest of it.
struct PrefixedBody {
    prefix: Option<Bytes>,
    rest: tonic::body::Body,
}

impl http_body::Body for PrefixedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(prefix))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use http_body::Body as _;

    use super::*;

    #[test]
    fn pauses_grow_jittered_and_capped() {
        for _ in 0..50 {
            let first = backoff(0);
            assert!(first >= Duration::from_millis(25) && first <= Duration::from_millis(50));
            let third = backoff(2);
            assert!(third >= Duration::from_millis(100) && third <= Duration::from_millis(200));
            assert!(backoff(30) <= BACKOFF_MAX && backoff(30) >= BACKOFF_MAX / 2);
        }
    }

    async fn collect(
        body: impl http_body::Body<Data = Bytes, Error = tonic::Status> + Unpin,
    ) -> Vec<u8> {
        let mut body = body;
        let mut out = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            if let Ok(data) = frame.expect("frame").into_data() {
                out.extend_from_slice(&data);
            }
        }
        out
    }

    #[tokio::test]
    async fn short_bodies_replay_and_long_ones_pass_through_whole() -> Result<(), tonic::Status> {
        let body = tonic::body::Body::new(ReplayBody {
            data: Some(Bytes::from_static(b"hello")),
            trailers: None,
        });
        let Buffered::Complete(replay) = buffer(body, 16).await? else {
            panic!("a short body is kept");
        };
        assert_eq!(collect(replay.clone()).await, b"hello");
        assert_eq!(collect(replay).await, b"hello", "and can be sent again");

        let long = vec![7_u8; 40];
        let body = tonic::body::Body::new(ReplayBody {
            data: Some(Bytes::from(long.clone())),
            trailers: None,
        });
        let Buffered::TooLong { prefix, rest } = buffer(body, 16).await? else {
            panic!("a long body is not kept");
        };
        let whole = PrefixedBody {
            prefix: Some(prefix),
            rest,
        };
        assert!(!whole.is_end_stream());
        assert_eq!(collect(whole).await, long);
        Ok(())
    }
}
