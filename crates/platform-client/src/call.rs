//! What the layers tell each other about one call, through the request's
//! extensions, and how they read its outcome.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::time::Instant;
use tonic::Code;

/// When the attempt must be answered, and whether it had the whole
/// configured budget for it: set by the deadline layer, enforced on every
/// attempt by the endpoint channel, respected by retries, and read by the
/// breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallDeadline {
    /// When the time is up.
    pub at: Instant,
    /// Whether the attempt runs with the full `clients.default_timeout_ms`:
    /// not cut short by the caller's own timeout or by what was left of
    /// the request being served, and not a retry (which gets what the
    /// earlier attempts left). Only then does running out of time say the
    /// instance is too slow; otherwise any caller with a tiny budget could
    /// open an instance's breaker for every other caller.
    pub full_budget: bool,
}

/// Set by the balancer when it refuses an attempt because no instance of
/// the service admits calls (every breaker open, or half-open with its
/// probe out): a retry would only wait its pause to be refused again, so the
/// retry layer gives up at once (an open breaker fails fast).
#[derive(Clone, Debug, Default)]
pub struct NoInstanceAdmits(Arc<AtomicBool>);

impl NoInstanceAdmits {
    /// Notes the refusal.
    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether an attempt was refused so.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The instances this call was already sent to: set by the retry layer for
/// the attempts of one call, read and extended by the balancer so that a
/// retry goes elsewhere while somewhere else exists.
#[derive(Clone, Debug, Default)]
pub struct TriedEndpoints(Arc<Mutex<Vec<Arc<str>>>>);

impl TriedEndpoints {
    /// Whether `address` was tried.
    pub fn contains(&self, address: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|tried| &**tried == address)
    }

    /// Notes that `address` is being tried.
    pub fn insert(&self, address: Arc<str>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(address);
    }
}

/// The gRPC status a response already carries: from `grpc-status` in its
/// headers (a trailers-only response, how errors are sent) or from an HTTP
/// status other than 200 (a proxy's answer, mapped as the gRPC spec says).
/// `None` for a response whose status comes later, in its trailers.
pub fn response_code<B>(response: &http::Response<B>) -> Option<Code> {
    if let Some(code) = response
        .headers()
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i32>().ok())
    {
        return Some(Code::from_i32(code));
    }
    let code = match response.status().as_u16() {
        200 => return None,
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    };
    Some(code)
}

/// The code a call ended with, as far as its response headers tell.
pub fn outcome_code<B>(result: &Result<http::Response<B>, tonic::Status>) -> Option<Code> {
    match result {
        Ok(response) => response_code(response),
        Err(status) => Some(status.code()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_come_from_grpc_status_or_the_http_status() {
        let response = |status: u16, grpc: Option<&str>| {
            let mut builder = http::Response::builder().status(status);
            if let Some(grpc) = grpc {
                builder = builder.header("grpc-status", grpc);
            }
            builder.body(()).expect("response")
        };
        assert_eq!(response_code(&response(200, None)), None);
        assert_eq!(
            response_code(&response(200, Some("14"))),
            Some(Code::Unavailable)
        );
        assert_eq!(
            response_code(&response(200, Some("9"))),
            Some(Code::FailedPrecondition)
        );
        assert_eq!(response_code(&response(503, None)), Some(Code::Unavailable));
        assert_eq!(
            response_code(&response(404, None)),
            Some(Code::Unimplemented)
        );
    }
}
