//! Every call's deadline: the shortest of the configured default, the
//! caller's own timeout (a `grpc-timeout` set on the tonic request) and the
//! time left of the request being served
//! ([`agora_platform::deadline::remaining`]).
//!
//! The callee learns it from `grpc-timeout`; the layers below learn it from
//! [`CallDeadline`]; the call ends with DEADLINE_EXCEEDED when it passes,
//! and a call with no time left is not sent at all. [`CallDeadline`] also
//! says whether the call got the full configured budget: a call cut short by
//! its caller that runs out of time says nothing about the instance, and
//! the breaker does not count it.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use agora_platform::deadline::{GRPC_TIMEOUT, format_grpc_timeout, grpc_timeout, remaining};
use tokio::time::Instant;
use tower::ServiceExt as _;

use crate::call::CallDeadline;
use crate::{CallService, ResponseFuture};

/// Sets the deadline of every call.
#[derive(Clone, Debug)]
pub struct DeadlineLayer {
    service: Arc<str>,
    default_timeout: Duration,
}

impl DeadlineLayer {
    /// Calls to `service` get at most `default_timeout`.
    pub fn new(service: &str, default_timeout: Duration) -> Self {
        Self {
            service: Arc::from(service),
            default_timeout,
        }
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadlined<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadlined {
            layer: self.clone(),
            inner,
        }
    }
}

/// The service made by [`DeadlineLayer`].
#[derive(Clone, Debug)]
pub struct Deadlined<S> {
    layer: DeadlineLayer,
    inner: S,
}

/// The time a call gets: the shortest of the three budgets.
pub fn call_timeout(
    default_timeout: Duration,
    requested: Option<Duration>,
    inbound_remaining: Option<Duration>,
) -> Duration {
    [requested, inbound_remaining]
        .into_iter()
        .flatten()
        .fold(default_timeout, Duration::min)
}

/// `grpc-timeout: <timeout>` on `request`.
pub fn set_grpc_timeout<B>(request: &mut http::Request<B>, timeout: Duration) {
    if let Ok(value) = http::HeaderValue::try_from(format_grpc_timeout(timeout)) {
        request.headers_mut().insert(GRPC_TIMEOUT, value);
    }
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for Deadlined<S>
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
        let now = Instant::now();
        // Read here, on the caller's task: the task-local budget of the
        // request being served is not visible anywhere else.
        let timeout = call_timeout(
            self.layer.default_timeout,
            grpc_timeout(request.headers()),
            remaining(),
        );
        let service = Arc::clone(&self.layer.service);
        let exceeded = move || {
            tonic::Status::deadline_exceeded(format!("deadline exceeded calling {service}"))
        };
        let Some(deadline) = now.checked_add(timeout).filter(|_| !timeout.is_zero()) else {
            // Spent before it started: nothing is sent.
            return Box::pin(std::future::ready(Err(exceeded())));
        };
        set_grpc_timeout(&mut request, timeout);
        request.extensions_mut().insert(CallDeadline {
            at: deadline,
            // Neither the caller's timeout nor the inbound request shortened it.
            full_budget: timeout >= self.layer.default_timeout,
        });
        let call = self.inner.clone().oneshot(request);
        Box::pin(async move {
            tokio::time::timeout_at(deadline, call)
                .await
                .unwrap_or_else(|_elapsed| Err(exceeded()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shortest_budget_wins() {
        let ms = Duration::from_millis;
        assert_eq!(call_timeout(ms(5_000), None, None), ms(5_000));
        assert_eq!(call_timeout(ms(5_000), Some(ms(300)), None), ms(300));
        assert_eq!(
            call_timeout(ms(5_000), Some(ms(300)), Some(ms(120))),
            ms(120)
        );
        assert_eq!(call_timeout(ms(100), Some(ms(300)), Some(ms(120))), ms(100));
        assert_eq!(
            call_timeout(ms(100), None, Some(Duration::ZERO)),
            Duration::ZERO
        );
    }
}
