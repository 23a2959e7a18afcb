//! The caller's credentials on every call: `authorization: Bearer <token>`.

use std::sync::Arc;
use std::task::{Context, Poll};

use agora_platform::error::Error;
use tower::ServiceExt as _;

use crate::{CallService, ResponseFuture};

/// Returns the token (a bare JWT) to call the named target service with;
/// the caller signs or caches it. Called on every call. `None` sends the
/// call without a token: a gateway forwarding an anonymous client's call
/// must not lend it an identity of its own.
pub type Credentials = Arc<dyn Fn(&str) -> Result<Option<String>, Error> + Send + Sync>;

/// Adds the caller's token to every call. A request that already carries an
/// `authorization` header keeps it: the caller chose to call on someone
/// else's behalf (a gateway forwarding a user's token).
#[derive(Clone)]
pub struct CredentialsLayer {
    service: Arc<str>,
    credentials: Credentials,
}

impl CredentialsLayer {
    /// Tokens for `service` from `credentials`.
    pub fn new(service: &str, credentials: Credentials) -> Self {
        Self {
            service: Arc::from(service),
            credentials,
        }
    }
}

impl<S> tower::Layer<S> for CredentialsLayer {
    type Service = Authorized<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorized {
            layer: self.clone(),
            inner,
        }
    }
}

/// The service made by [`CredentialsLayer`].
#[derive(Clone)]
pub struct Authorized<S> {
    layer: CredentialsLayer,
    inner: S,
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for Authorized<S>
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
        if !request.headers().contains_key(http::header::AUTHORIZATION) {
            let token = match (self.layer.credentials)(&self.layer.service) {
                Ok(Some(token)) => Ok(token),
                Ok(None) => return Box::pin(self.inner.clone().oneshot(request)),
                Err(err) => Err(tonic::Status::from(err)),
            };
            let value = token.and_then(|token| {
                http::HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
                    tonic::Status::internal(format!(
                        "the token for calling {} is not a valid header value",
                        self.layer.service
                    ))
                })
            });
            match value {
                Ok(mut value) => {
                    value.set_sensitive(true);
                    request
                        .headers_mut()
                        .insert(http::header::AUTHORIZATION, value);
                }
                Err(status) => return Box::pin(std::future::ready(Err(status))),
            }
        }
        Box::pin(self.inner.clone().oneshot(request))
    }
}
