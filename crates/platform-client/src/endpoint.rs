//! The connection to one instance: a lazily connecting HTTP/2 channel that
//! enforces the call's deadline and reports every failure as a gRPC status.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::transport::Channel;
use tower::ServiceExt as _;

use crate::ResponseFuture;
use crate::call::CallDeadline;

/// How long connecting to an instance may take before it counts as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 pings on idle connections, so that a dead peer is noticed before
/// the next call finds out.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// A ping unanswered for this long closes the connection.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A channel to the instance at one address. Connects on first use and
/// again after the connection is lost.
#[derive(Clone, Debug)]
pub struct EndpointChannel {
    service: Arc<str>,
    address: Arc<str>,
    channel: Channel,
}

impl EndpointChannel {
    /// A channel to `address` (`http://host:port`), instance of `service`.
    /// Fails only on an address that is not a URI.
    pub fn lazy(service: &str, address: &str) -> Result<Self, tonic::Status> {
        let endpoint = tonic::transport::Endpoint::from_shared(address.to_owned())
            .map_err(|err| {
                tonic::Status::invalid_argument(format!(
                    "bad address {address:?} for {service}: {err}"
                ))
            })?
            // Small gRPC frames must not wait for Nagle's algorithm.
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        Ok(Self {
            service: Arc::from(service),
            address: Arc::from(address),
            channel: endpoint.connect_lazy(),
        })
    }

    /// The instance's address.
    pub fn address(&self) -> &str {
        &self.address
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for EndpointChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::Status;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The channel's own readiness is awaited in the call, under its deadline.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let deadline = request.extensions().get::<CallDeadline>().copied();
        let channel = self.channel.clone();
        let (service, address) = (Arc::clone(&self.service), Arc::clone(&self.address));
        Box::pin(async move {
            let call = channel.oneshot(request);
            let result = match deadline {
                Some(CallDeadline { at, .. }) => match tokio::time::timeout_at(at, call).await {
                    Ok(result) => result,
                    Err(_elapsed) => {
                        return Err(tonic::Status::deadline_exceeded(format!(
                            "deadline exceeded calling {service} at {address}"
                        )));
                    }
                },
                None => call.await,
            };
            result.map_err(|err| transport_status(&service, &address, &err))
        })
    }
}

/// A failure of the connection as a status: DEADLINE_EXCEEDED when the
/// channel's own timer (from `grpc-timeout`) fired, UNAVAILABLE otherwise
/// (refused, reset, unreachable: the instance did not answer).
fn transport_status(
    service: &str,
    address: &str,
    err: &(dyn std::error::Error + 'static),
) -> tonic::Status {
    let mut source = Some(err);
    let mut detail = err.to_string();
    while let Some(current) = source {
        if current.is::<tonic::TimeoutExpired>() {
            return tonic::Status::deadline_exceeded(format!(
                "deadline exceeded calling {service} at {address}"
            ));
        }
        if current.source().is_none() {
            // The innermost cause says the most ("Connection refused").
            detail = current.to_string();
        }
        source = current.source();
    }
    tonic::Status::unavailable(format!("cannot reach {service} at {address}: {detail}"))
}
