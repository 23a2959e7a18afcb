//! One request at the edge, whatever its protocol: classify it, apply the
//! edge policy, translate it to a gRPC call, send it, translate the answer.
//!
//! The policy runs in this order, each step before anything costlier:
//! 1. the route (UNIMPLEMENTED for an unknown service or method), and
//!    PERMISSION_DENIED for a method the contract reserves to services;
//! 2. the token, verified once here (the backend verifies it again);
//! 3. the client's rate limit (keyed by the verified user, else the IP, so
//!    a flood of bad tokens is limited too);
//! 4. UNAUTHENTICATED for a bad token, then the method's access level;
//! 5. the deadline: the client's (`grpc-timeout`, `connect-timeout-ms`)
//!    cut to `gateway.max_timeout_ms`, else the default for its kind.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_platform::auth::{Caller, TokenVerifier};
use agora_platform::deadline::{GRPC_TIMEOUT, format_grpc_timeout, grpc_timeout};
use agora_platform::server::{is_server_fault, split_rpc_path};
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use http_body_util::BodyExt as _;
use tonic::Code;
use tracing::Instrument as _;

use crate::body::{self, EdgeBody, RequestSlot};
use crate::codec::connect::{self, ConnectCodec, ConnectKind};
use crate::codec::grpc_web::{self, WebFormat};
use crate::codec::json::JsonCodec;
use crate::cors::CorsPolicy;
use crate::health::HealthState;
use crate::listener::ConnActivity;
use crate::metrics::Metrics;
use crate::ratelimit::{ClientKey, RateLimiter};
use crate::routes::{Route, Routes};

/// The protocol of one call, from its method and content type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Native gRPC: frames pass through untouched.
    Grpc,
    /// grpc-web, binary or base64 text.
    GrpcWeb(WebFormat),
    /// Connect, unary or streaming, JSON or proto.
    Connect(ConnectKind),
    /// Connect unary by HTTP GET (side-effect-free methods only).
    ConnectGet(ConnectCodec),
}

impl Protocol {
    /// The label of metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::GrpcWeb(_) => "grpc-web",
            Self::Connect(_) | Self::ConnectGet(_) => "connect",
        }
    }
}

/// The limits of one request, from `GatewayConfig`.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The largest request message or unary body.
    pub max_request_bytes: usize,
    /// The largest response message converted for Connect.
    pub max_response_bytes: usize,
    /// A unary call's deadline when the client sets none.
    pub default_timeout: Duration,
    /// The longest deadline, and a streaming call's when the client sets none.
    pub max_timeout: Duration,
    /// The longest wait for the next piece of a body read whole.
    pub body_read_timeout: Duration,
    /// Bytes of request bodies held whole, all clients together.
    pub buffer_budget: Arc<tokio::sync::Semaphore>,
    /// Trust the last `x-forwarded-for` address.
    pub trust_forwarded_for: bool,
    /// Calls in flight at once, all clients together (load shedding).
    pub in_flight: Arc<tokio::sync::Semaphore>,
}

/// Everything every request shares.
pub struct Edge {
    /// Routes by gRPC path.
    pub routes: Routes,
    /// User-token verification.
    pub verifier: TokenVerifier,
    /// Per-client token buckets.
    pub limiter: RateLimiter,
    /// Browser origins.
    pub cors: CorsPolicy,
    /// Prometheus counters.
    pub metrics: Metrics,
    /// Connect JSON.
    pub json: JsonCodec,
    /// Backend health and readiness.
    pub health: HealthState,
    /// Size and time limits.
    pub limits: Limits,
}

/// Who is calling, as far as the edge can tell.
struct Client {
    ip: IpAddr,
}

impl Edge {
    /// Answers one HTTP request.
    pub async fn handle(
        self: Arc<Self>,
        mut request: http::Request<hyper::body::Incoming>,
        peer: SocketAddr,
        activity: ConnActivity,
    ) -> Response<EdgeBody> {
        let client = Client {
            ip: self.client_ip(request.headers(), peer),
        };
        let path = request.uri().path().to_owned();
        let method = request.method().clone();
        match (&method, path.as_str()) {
            (&Method::GET, "/healthz") => return plain(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => {
                let (ready, body) = self.health.readiness();
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                return plain(status, body);
            }
            (&Method::GET, "/metrics") => {
                let text = self.metrics.render(&self.breaker_gauges());
                let mut response = Response::new(body::full(Bytes::from(text)));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                return response;
            }
            (&Method::OPTIONS, _) => return self.preflight(request.headers()),
            _ => {}
        }
        let cors = self.cors.response_headers(request.headers());
        let content_type = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let protocol = if method == Method::POST {
            if is_grpc(&content_type) {
                Some(Protocol::Grpc)
            } else if let Some(format) = grpc_web::web_format(&content_type) {
                Some(Protocol::GrpcWeb(format))
            } else {
                connect::connect_kind(&content_type).map(Protocol::Connect)
            }
        } else if method == Method::GET {
            match connect::parse_get_query(
                request.uri().query().unwrap_or_default(),
                self.limits.max_request_bytes,
            ) {
                Ok((codec, message)) => {
                    // Parsed once: the call takes the message from here.
                    request.extensions_mut().insert(GetMessage(message));
                    Some(Protocol::ConnectGet(codec))
                }
                Err(err) if path.len() > 1 && path[1..].contains('/') => {
                    let status = tonic::Status::invalid_argument(err.to_string());
                    let mut response = connect_error_response(&status, &HeaderMap::new());
                    append_headers(response.headers_mut(), &cors);
                    return response;
                }
                Err(_) => return plain(StatusCode::NOT_FOUND, "not found\n"),
            }
        } else {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
        };
        let Some(protocol) = protocol else {
            let mut response = plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "unsupported content-type {:?}: use application/grpc, application/grpc-web(-text)(+proto), \
                     application/json, application/proto or application/connect+json|proto\n",
                    truncate(&content_type, 80)
                ),
            );
            append_headers(response.headers_mut(), &cors);
            return response;
        };
        let mut response = self.call(request, protocol, &path, client, activity).await;
        if matches!(
            protocol,
            Protocol::GrpcWeb(_) | Protocol::Connect(_) | Protocol::ConnectGet(_)
        ) {
            append_headers(response.headers_mut(), &cors);
        }
        response
    }

    fn client_ip(&self, headers: &HeaderMap, peer: SocketAddr) -> IpAddr {
        if self.limits.trust_forwarded_for
            && let Some(ip) = headers
                .get("x-forwarded-for")
                .and_then(|value| value.to_str().ok())
                // The last address is the one the proxy appended; those
                // before it are whatever the client sent.
                .and_then(|value| value.rsplit(',').next())
                .and_then(|last| last.trim().parse().ok())
        {
            return ip;
        }
        peer.ip()
    }

    fn preflight(&self, headers: &HeaderMap) -> Response<EdgeBody> {
        match self.cors.preflight(headers) {
            Some(allowed) => {
                let mut response = Response::new(body::empty());
                *response.status_mut() = StatusCode::NO_CONTENT;
                *response.headers_mut() = allowed;
                response
            }
            None => plain(StatusCode::FORBIDDEN, "origin not allowed\n"),
        }
    }

    /// Backend instances by circuit-breaker state, per service: counts, not
    /// addresses, so the public port does not list the backends' pods.
    fn breaker_gauges(&self) -> Vec<crate::metrics::Gauge> {
        let mut gauges = Vec::new();
        for backend in &self.routes.backends {
            let mut counts = [0u32; 3];
            for channel in backend.channels() {
                for (_, state) in channel.breaker_states() {
                    let slot = usize::try_from(state.gauge_value()).unwrap_or(0).min(2);
                    counts[slot] += 1;
                }
            }
            for (state, count) in ["closed", "open", "half_open"].into_iter().zip(counts) {
                gauges.push(crate::metrics::Gauge {
                    name: "agora_gateway_backend_breakers",
                    help: "Backend instances (per call kind) whose circuit breaker is in each state",
                    labels: vec![("service", backend.name.clone()), ("state", state.to_owned())],
                    value: f64::from(count),
                });
            }
        }
        gauges
    }

    /// The policy, then the call, with its span, metrics and access log.
    async fn call(
        self: &Arc<Self>,
        request: http::Request<hyper::body::Incoming>,
        protocol: Protocol,
        path: &str,
        client: Client,
        activity: ConnActivity,
    ) -> Response<EdgeBody> {
        let (service, method) = split_rpc_path(path);
        let span = tracing::info_span!(
            "rpc",
            otel.name = %format_args!("{service}/{method}"),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.protocol = protocol.label(),
            client.address = %client.ip,
            enduser.id = tracing::field::Empty,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(
            &span,
            agora_platform::telemetry::extract_parent(request.headers()),
        );
        let route = self.routes.get(path).cloned();
        let log = CallLog::new(
            Arc::clone(self),
            route.as_ref().map(|r| r.path.clone()),
            protocol,
            client.ip,
            span.clone(),
            activity,
        );
        let edge = Arc::clone(self);
        async move {
            edge.policy_and_call(request, protocol, route, client, log)
                .await
        }
        .instrument(span)
        .await
    }

    async fn policy_and_call(
        self: Arc<Self>,
        request: http::Request<hyper::body::Incoming>,
        protocol: Protocol,
        route: Option<Arc<Route>>,
        client: Client,
        mut log: CallLog,
    ) -> Response<EdgeBody> {
        // Load shedding first: an overloaded gateway refuses at once, with
        // no token verified and nothing queued. The permit lives as long as
        // the call's log, that is until its answer has been sent.
        let admitted = match Arc::clone(&self.limits.in_flight).try_acquire_owned() {
            Ok(permit) => Ok(permit),
            Err(_) => Err(Refusal::from(overloaded())),
        };
        let allowed = admitted.and_then(|permit| {
            log._permit = Some(permit);
            self.policy(&request, protocol, route, &client, &mut log)
        });
        let (route, timeout) = match allowed {
            Ok(allowed) => allowed,
            Err(refusal) => {
                // An HTTP/1.1 client may still be sending its body: read it
                // (bounded) so the answer reaches it and the connection
                // stays usable, instead of a reset on its next write.
                if request.version() < http::Version::HTTP_2 {
                    drain(request.into_body(), self.limits.max_request_bytes).await;
                }
                let mut response = log.refuse(protocol, refusal.status);
                if let Some(http_status) = refusal.http_status {
                    *response.status_mut() = http_status;
                }
                return response;
            }
        };

        // The gRPC call.
        let slot = RequestSlot::default();
        let deadline = timeout.deadline;
        let outgoing = match self
            .outgoing(request, protocol, &route, timeout, client.ip, &slot)
            .await
        {
            Ok(outgoing) => outgoing,
            Err(status) => return log.refuse(protocol, status),
        };
        let result = route.backend.call(outgoing).await;
        let response = match (result, slot.take()) {
            // The request body failed (too large, not decodable): that is
            // the answer, whatever the backend made of the cut stream.
            (_, Some(status)) => return log.refuse(protocol, status),
            (Ok(response), None) => response,
            (Err(status), None) => return log.refuse(protocol, status),
        };
        match protocol {
            Protocol::Grpc => body::grpc_response(response, deadline, log, slot),
            Protocol::GrpcWeb(format) => {
                body::grpc_web_response(response, format, deadline, log, slot)
            }
            Protocol::Connect(ConnectKind::Stream(codec)) => body::connect_stream_response(
                response,
                codec,
                route.output.clone(),
                self.json.clone(),
                self.limits.max_response_bytes,
                deadline,
                log,
                slot,
            ),
            Protocol::Connect(ConnectKind::Unary(codec)) | Protocol::ConnectGet(codec) => {
                self.connect_unary_response(response, codec, &route, deadline, log)
                    .await
            }
        }
    }

    /// The edge policy over the request head (module docs): the route and
    /// the deadline of an allowed call, or why not.
    fn policy(
        &self,
        request: &http::Request<hyper::body::Incoming>,
        protocol: Protocol,
        route: Option<Arc<Route>>,
        client: &Client,
        log: &mut CallLog,
    ) -> Result<(Arc<Route>, CallTimeout), Refusal> {
        let path = request.uri().path();
        let Some(route) = route else {
            let (service, _) = split_rpc_path(path);
            let message = if self.routes.has_service(service) {
                format!("unknown method {path}")
            } else {
                format!("unknown service {service}")
            };
            return Err(tonic::Status::unimplemented(message).into());
        };
        if route.is_internal() {
            return Err(tonic::Status::permission_denied(format!(
                "{path} is internal to Agora services and cannot be called from outside"
            ))
            .into());
        }
        if matches!(protocol, Protocol::ConnectGet(_)) && !route.no_side_effects {
            return Err(Refusal {
                status: tonic::Status::unimplemented(format!(
                    "{path} changes state: call it with POST (GET is only for side-effect-free methods)"
                )),
                http_status: Some(StatusCode::METHOD_NOT_ALLOWED),
            });
        }
        let streams = route.client_streaming || route.server_streaming;
        match protocol {
            Protocol::Connect(ConnectKind::Unary(_)) | Protocol::ConnectGet(_) if streams => {
                return Err(tonic::Status::invalid_argument(format!(
                    "{path} streams: use content-type application/connect+json or application/connect+proto"
                ))
                .into());
            }
            Protocol::Connect(ConnectKind::Stream(_)) if !streams => {
                return Err(tonic::Status::invalid_argument(format!(
                    "{path} is unary: use content-type application/json or application/proto"
                ))
                .into());
            }
            Protocol::Connect(ConnectKind::Stream(_)) => {
                refuse_compression(request.headers(), "connect-content-encoding")?;
            }
            Protocol::Connect(ConnectKind::Unary(_)) => {
                refuse_compression(request.headers(), "content-encoding")?;
                if let Some(version) = request.headers().get("connect-protocol-version")
                    && version.as_bytes() != b"1"
                {
                    return Err(tonic::Status::invalid_argument(
                        "connect-protocol-version must be 1",
                    )
                    .into());
                }
            }
            _ => {}
        }

        // The token, the rate limit, the access level.
        let caller = self.caller(request.headers());
        let key = match &caller {
            Ok(Caller::User { id, .. }) => ClientKey::User(Arc::from(id.as_str())),
            _ => ClientKey::Ip(client.ip),
        };
        if let Err(retry_after) = self.limiter.check(&key) {
            return Err(rate_limited(retry_after).into());
        }
        let caller = caller?;
        if let Some(user) = caller.user_id() {
            log.user = Some(user.to_owned());
            log.span.record("enduser.id", user);
        }
        route.authorize(&caller).map_err(tonic::Status::from)?;
        let timeout = self.timeout(request.headers(), protocol, &route)?;
        Ok((route, timeout))
    }

    /// The caller of a request: anonymous without `authorization`, a user
    /// with a valid user token, UNAUTHENTICATED otherwise (service tokens
    /// included: services call each other directly, never through the edge).
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, tonic::Status> {
        match self.verifier.caller_from_headers(headers) {
            Ok(Caller::Service { .. }) => Err(tonic::Status::unauthenticated(
                "service tokens are not accepted at the edge: log in as a user",
            )),
            Ok(caller) => Ok(caller),
            Err(err) => Err(tonic::Status::from(err)),
        }
    }

    /// The call's deadline: the client's, cut to the maximum, or (sent as
    /// no `grpc-timeout`, so the client stack's own default applies and
    /// counts as a full budget for its breakers) the default of its kind.
    fn timeout(
        &self,
        headers: &HeaderMap,
        protocol: Protocol,
        route: &Route,
    ) -> Result<CallTimeout, tonic::Status> {
        let requested = match protocol {
            Protocol::Connect(_) | Protocol::ConnectGet(_) => {
                match headers.get("connect-timeout-ms") {
                    Some(value) => {
                        Some(connect::parse_timeout_ms(value.as_bytes()).map_err(|_| {
                            tonic::Status::invalid_argument(
                                "connect-timeout-ms must be 1 to 10 digits",
                            )
                        })?)
                    }
                    None => None,
                }
            }
            Protocol::Grpc | Protocol::GrpcWeb(_) => grpc_timeout(headers),
        };
        let requested = requested.map(|timeout| timeout.min(self.limits.max_timeout));
        let default = if route.client_streaming || route.server_streaming {
            self.limits.max_timeout
        } else {
            self.limits.default_timeout
        };
        let budget = requested.unwrap_or(default);
        Ok(CallTimeout {
            requested,
            budget,
            deadline: tokio::time::Instant::now() + budget,
        })
    }

    /// The gRPC request sent to the backend.
    async fn outgoing(
        &self,
        request: http::Request<hyper::body::Incoming>,
        protocol: Protocol,
        route: &Route,
        timeout: CallTimeout,
        client_ip: IpAddr,
        slot: &RequestSlot,
    ) -> Result<http::Request<tonic::body::Body>, tonic::Status> {
        let (parts, incoming) = request.into_parts();
        let mut headers = forwarded_headers(&parts.headers, protocol);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        if let Some(requested) = timeout.requested
            && let Ok(value) = HeaderValue::try_from(format_grpc_timeout(requested))
        {
            headers.insert(GRPC_TIMEOUT, value);
        }
        if let Ok(value) = HeaderValue::try_from(client_ip.to_string()) {
            headers.insert(HeaderName::from_static("x-forwarded-for"), value);
        }
        let max = self.limits.max_request_bytes;
        let outgoing_body = match protocol {
            Protocol::Grpc | Protocol::GrpcWeb(WebFormat::Binary) => {
                body::limited_frames(incoming, max, slot.clone())
            }
            Protocol::GrpcWeb(WebFormat::Text) => body::text_frames(incoming, max, slot.clone()),
            Protocol::Connect(ConnectKind::Stream(codec)) => match codec {
                ConnectCodec::Proto => body::limited_frames(incoming, max, slot.clone()),
                ConnectCodec::Json => body::connect_json_frames(
                    incoming,
                    route.input.clone(),
                    self.json.clone(),
                    max,
                    slot.clone(),
                ),
            },
            Protocol::Connect(ConnectKind::Unary(codec)) => {
                let (bytes, permit) = body::collect_limited(
                    incoming,
                    &parts.headers,
                    body::CollectLimits {
                        max,
                        budget: &self.limits.buffer_budget,
                        deadline: timeout.deadline,
                        idle: self.limits.body_read_timeout,
                    },
                )
                .await?;
                self.unary_message(codec, route, bytes, Some(permit))?
            }
            Protocol::ConnectGet(codec) => {
                let message = parts
                    .extensions
                    .get::<GetMessage>()
                    .map(|get| get.0.clone())
                    .unwrap_or_default();
                self.unary_message(codec, route, message, None)?
            }
        };
        let mut outgoing = http::Request::new(outgoing_body);
        *outgoing.method_mut() = Method::POST;
        *outgoing.uri_mut() = http::Uri::try_from(route.path.as_str())
            .map_err(|_| tonic::Status::internal("route path is not a URI"))?;
        *outgoing.headers_mut() = headers;
        Ok(outgoing)
    }

    /// A Connect unary body as one gRPC frame.
    fn unary_message(
        &self,
        codec: ConnectCodec,
        route: &Route,
        bytes: Bytes,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<tonic::body::Body, tonic::Status> {
        let proto = match codec {
            ConnectCodec::Proto => bytes,
            ConnectCodec::Json => self
                .json
                .json_to_proto(&route.input, &bytes)
                .map_err(|err| body::codec_status(&err))?,
        };
        let framed = crate::codec::frame::encode_frame(0, &proto);
        Ok(match permit {
            // The JSON is converted: the body held is the protobuf now.
            Some(permit) => body::held_body(framed, permit),
            None => tonic::body::Body::new(http_body_util::Full::new(framed)),
        })
    }

    /// A Connect unary answer: the one message (or the error) of the whole
    /// gRPC response, read to its trailers (bounded by
    /// `max_response_bytes`).
    async fn connect_unary_response(
        &self,
        response: http::Response<tonic::body::Body>,
        codec: ConnectCodec,
        route: &Route,
        deadline: tokio::time::Instant,
        mut log: CallLog,
    ) -> Response<EdgeBody> {
        let (parts, mut incoming) = response.into_parts();
        let refuse = |log: &mut CallLog, status: tonic::Status, metadata: &HeaderMap| {
            log.finish(status.code());
            connect_error_response(&status, metadata)
        };
        if let Some(status) = tonic::Status::from_header_map(&parts.headers)
            && status.code() != Code::Ok
        {
            return refuse(&mut log, status, &parts.headers);
        }
        let mut decoder = crate::codec::frame::FrameDecoder::new(self.limits.max_response_bytes);
        let mut message: Option<Bytes> = None;
        let mut trailers = HeaderMap::new();
        loop {
            let frame = match tokio::time::timeout_at(deadline, incoming.frame()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(None) => break,
                Ok(Some(Err(status))) => return refuse(&mut log, status, &parts.headers),
                Err(_) => {
                    let status = tonic::Status::deadline_exceeded("the call's deadline passed");
                    return refuse(&mut log, status, &parts.headers);
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    decoder.push_bytes(data);
                    loop {
                        match decoder.next_frame() {
                            Ok(Some(frame)) if message.is_none() && frame.flags == 0 => {
                                message = Some(frame.payload);
                            }
                            Ok(Some(_)) => {
                                let status = tonic::Status::internal(
                                    "the backend answered a unary call with several or compressed messages",
                                );
                                return refuse(&mut log, status, &parts.headers);
                            }
                            Ok(None) => break,
                            Err(err) => {
                                let status = body::backend_codec_status(&err);
                                return refuse(&mut log, status, &parts.headers);
                            }
                        }
                    }
                }
                Err(frame) => {
                    if let Ok(received) = frame.into_trailers() {
                        trailers = received;
                    }
                }
            }
        }
        let status = tonic::Status::from_header_map(&trailers).unwrap_or_else(|| {
            tonic::Status::internal("the backend's answer ended without a gRPC status")
        });
        let mut metadata = response_metadata(&parts.headers);
        for (name, value) in response_metadata(&trailers).iter() {
            if let Ok(prefixed) = HeaderName::try_from(format!("trailer-{name}")) {
                metadata.append(prefixed, value.clone());
            }
        }
        if status.code() != Code::Ok {
            return refuse(&mut log, status, &metadata);
        }
        let Some(message) = message else {
            let status =
                tonic::Status::internal("the backend answered a unary call with no message");
            return refuse(&mut log, status, &metadata);
        };
        let body = match codec {
            ConnectCodec::Proto => message,
            ConnectCodec::Json => match self.json.proto_to_json(&route.output, &message) {
                Ok(json) => json,
                Err(err) => {
                    let status = tonic::Status::internal(format!(
                        "the backend's answer cannot be written as JSON: {err}"
                    ));
                    return refuse(&mut log, status, &metadata);
                }
            },
        };
        log.finish(Code::Ok);
        let mut response = Response::new(body::full(body));
        *response.headers_mut() = metadata;
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static(codec.unary_content_type()),
        );
        response
    }
}

/// What the gateway records of every call: its span's status, a metric, an
/// access-log line; once, when the status is known or the client left.
pub struct CallLog {
    edge: Arc<Edge>,
    method: Option<String>,
    protocol: Protocol,
    client: IpAddr,
    /// The user, once the token is verified.
    pub user: Option<String>,
    span: tracing::Span,
    started: Instant,
    finished: bool,
    _activity: ConnActivity,
    _in_flight: crate::metrics::InFlightGuard,
    /// The call's share of `max_in_flight`.
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl CallLog {
    fn new(
        edge: Arc<Edge>,
        method: Option<String>,
        protocol: Protocol,
        client: IpAddr,
        span: tracing::Span,
        activity: ConnActivity,
    ) -> Self {
        let in_flight = edge.metrics.in_flight();
        Self {
            edge,
            method,
            protocol,
            client,
            user: None,
            span,
            started: Instant::now(),
            finished: false,
            _activity: activity,
            _in_flight: in_flight,
            _permit: None,
        }
    }

    /// Records the call's final code (the first call wins).
    pub fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let elapsed = self.started.elapsed();
        let method = self.method.as_deref().unwrap_or("other");
        self.edge
            .metrics
            .record(method, self.protocol.label(), code, elapsed);
        self.span.record("rpc.grpc.status_code", code as i32);
        if is_server_fault(code) {
            self.span.record("otel.status_code", "ERROR");
        }
        let _entered = self.span.enter();
        tracing::info!(
            target: "agora_gateway::access",
            method,
            protocol = self.protocol.label(),
            code = ?code,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            client = %self.client,
            user = self.user.as_deref().unwrap_or("-"),
            "call"
        );
    }

    /// An answer made at the edge, in the call's protocol.
    pub fn refuse(&mut self, protocol: Protocol, status: tonic::Status) -> Response<EdgeBody> {
        self.finish(status.code());
        status_response(protocol, &status)
    }
}

impl Drop for CallLog {
    fn drop(&mut self) {
        // Dropped before its status: the client went away.
        self.finish(Code::Cancelled);
    }
}

/// A status as the answer of `protocol`: for gRPC and grpc-web a
/// headers-only reply (HTTP 200, so every client library reads a gRPC
/// status), for Connect its error body and HTTP status.
pub fn status_response(protocol: Protocol, status: &tonic::Status) -> Response<EdgeBody> {
    match protocol {
        Protocol::Grpc | Protocol::GrpcWeb(_) => {
            let mut response = Response::new(body::empty());
            let content_type = match protocol {
                Protocol::GrpcWeb(format) => grpc_web::response_content_type(format),
                _ => "application/grpc",
            };
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            if status.add_header(response.headers_mut()).is_err() {
                response
                    .headers_mut()
                    .insert("grpc-status", HeaderValue::from(status.code() as i32));
            }
            response
        }
        Protocol::Connect(ConnectKind::Stream(codec)) => {
            let details = status_details(status);
            let frame = connect::end_stream_frame(
                Some((status.code(), status.message(), &details)),
                &HeaderMap::new(),
            );
            let mut response = Response::new(body::full(frame));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(codec.stream_content_type()),
            );
            response
        }
        Protocol::Connect(ConnectKind::Unary(_)) | Protocol::ConnectGet(_) => {
            connect_error_response(status, &HeaderMap::new())
        }
    }
}

/// The `google.rpc.Status` details of a status, for Connect error bodies.
pub fn status_details(status: &tonic::Status) -> Vec<connect::ErrorDetail> {
    if status.details().is_empty() {
        return Vec::new();
    }
    connect::details_from_status_bytes(status.details()).unwrap_or_default()
}

/// Connect's unary error: HTTP status by code, JSON body, metadata headers.
fn connect_error_response(status: &tonic::Status, metadata: &HeaderMap) -> Response<EdgeBody> {
    let details = status_details(status);
    let body = connect::error_body(status.code(), status.message(), &details);
    let mut response = Response::new(body::full(body));
    *response.status_mut() = connect::http_status(status.code());
    response.headers_mut().extend(response_metadata(metadata));
    // Errors are JSON whatever the request's codec (Connect protocol).
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The message of a Connect GET, from its query.
#[derive(Clone)]
struct GetMessage(Bytes);

/// A call's time: what the client asked (cut to the maximum), and the
/// budget it gets either way.
#[derive(Clone, Copy, Debug)]
pub struct CallTimeout {
    /// The client's deadline, cut to `gateway.max_timeout_ms`.
    pub requested: Option<Duration>,
    /// The time the call gets.
    pub budget: Duration,
    /// When it runs out, from the call's arrival.
    pub deadline: tokio::time::Instant,
}

/// Why the edge refused a call: a status, and for Connect an HTTP status
/// other than the code's own, if any.
struct Refusal {
    status: tonic::Status,
    http_status: Option<StatusCode>,
}

impl From<tonic::Status> for Refusal {
    fn from(status: tonic::Status) -> Self {
        Self {
            status,
            http_status: None,
        }
    }
}

/// How long a refused HTTP/1.1 client gets to finish sending its body.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads and drops a refused request's body: at most `limit` bytes, for at
/// most [`DRAIN_TIMEOUT`]; past either, the connection closes after the
/// answer, as it must.
async fn drain(mut body: hyper::body::Incoming, limit: usize) {
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                seen = seen.saturating_add(data.len());
                if seen > limit {
                    return;
                }
            }
        }
    })
    .await;
}

/// RESOURCE_EXHAUSTED for a gateway at `max_in_flight`: `ErrorInfo` reason
/// `OVERLOADED` and a short `RetryInfo`, built by the platform's one refusal
/// builder, exactly as the services shed load.
fn overloaded() -> tonic::Status {
    tonic::Status::from(agora_platform::error::Error::overloaded(
        "the gateway is overloaded: try again shortly",
        agora_platform::error::OVERLOADED,
        OVERLOADED_RETRY_AFTER,
    ))
}

/// When a client refused by load shedding should try again: the services'
/// delay, so that a client sees one policy whoever refused it.
const OVERLOADED_RETRY_AFTER: Duration = agora_platform::server::OVERLOADED_RETRY_AFTER;

/// RESOURCE_EXHAUSTED with `google.rpc.RetryInfo` (when to try again) and
/// `ErrorInfo` reason `RATE_LIMITED`.
fn rate_limited(retry_after: Duration) -> tonic::Status {
    tonic::Status::from(agora_platform::error::Error::overloaded(
        format!(
            "too many requests: try again in {} ms",
            retry_after.as_millis().max(1)
        ),
        "RATE_LIMITED",
        retry_after,
    ))
}

fn refuse_compression(headers: &HeaderMap, name: &str) -> Result<(), tonic::Status> {
    match headers.get(name).map(HeaderValue::as_bytes) {
        None | Some(b"identity") => Ok(()),
        Some(_) => Err(tonic::Status::unimplemented(format!(
            "{name}: only identity is supported"
        ))),
    }
}

/// `application/grpc` and `application/grpc+proto` (parameters ignored).
fn is_grpc(content_type: &str) -> bool {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    media == "application/grpc" || media == "application/grpc+proto"
}

/// Request headers that are the caller's metadata, for the backend: not
/// hop-by-hop, not the HTTP framing the gateway replaces, not browser or
/// Connect protocol headers, no cookies.
fn forwarded_headers(incoming: &HeaderMap, protocol: Protocol) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(incoming.len() + 4);
    for (name, value) in incoming {
        let name_str = name.as_str();
        let dropped = matches!(
            name_str,
            "connection"
                | "keep-alive"
                | "proxy-connection"
                | "proxy-authorization"
                | "transfer-encoding"
                | "upgrade"
                | "te"
                | "host"
                | "content-length"
                | "content-type"
                | "content-encoding"
                | "accept"
                | "accept-encoding"
                | "cookie"
                | "origin"
                | "referer"
                | "x-grpc-web"
                | "x-user-agent"
                | "x-forwarded-for"
                | "forwarded"
                | "grpc-timeout"
        ) || name_str.starts_with("access-control-")
            || name_str.starts_with("sec-")
            || name_str.starts_with("connect-");
        // Messages are decoded for Connect, so the backend must not compress.
        let compression = matches!(name_str, "grpc-encoding" | "grpc-accept-encoding")
            && matches!(protocol, Protocol::Connect(_) | Protocol::ConnectGet(_));
        if !dropped && !compression {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

/// A backend's response headers or trailers that are metadata for the
/// client (not gRPC framing).
pub fn response_metadata(headers: &HeaderMap) -> HeaderMap {
    let mut metadata = HeaderMap::new();
    for (name, value) in headers {
        let name_str = name.as_str();
        if name_str.starts_with("grpc-")
            || matches!(
                name_str,
                "content-type" | "content-length" | "te" | "trailer" | "transfer-encoding" | "date"
            )
        {
            continue;
        }
        metadata.append(name.clone(), value.clone());
    }
    metadata
}

/// Adds `extra` without replacing what is there (`extend` would replace a
/// response's own `Vary`).
fn append_headers(headers: &mut HeaderMap, extra: &HeaderMap) {
    for (name, value) in extra {
        headers.append(name.clone(), value.clone());
    }
}

fn plain(status: StatusCode, text: impl Into<String>) -> Response<EdgeBody> {
    let mut response = Response::new(body::full(Bytes::from(text.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((index, _)) => &text[..index],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types_are_recognised_exactly() {
        assert!(is_grpc("application/grpc"));
        assert!(is_grpc("application/grpc+proto"));
        assert!(is_grpc("Application/GRPC; charset=x"));
        assert!(!is_grpc("application/grpc-web"));
        assert!(!is_grpc("application/grpc+json"));
    }

    #[test]
    fn only_metadata_is_forwarded() {
        let mut incoming = HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer x"),
            ("x-request-id", "r1"),
            ("traceparent", "00-abc"),
            ("cookie", "session=1"),
            ("connection", "keep-alive"),
            ("content-length", "12"),
            ("connect-timeout-ms", "100"),
            ("origin", "http://x"),
            ("grpc-accept-encoding", "gzip"),
            ("x-forwarded-for", "1.2.3.4"),
        ] {
            incoming.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let grpc = forwarded_headers(&incoming, Protocol::Grpc);
        let names: Vec<&str> = grpc.keys().map(HeaderName::as_str).collect();
        assert_eq!(
            names,
            [
                "authorization",
                "x-request-id",
                "traceparent",
                "grpc-accept-encoding"
            ]
        );
        let connect = forwarded_headers(
            &incoming,
            Protocol::Connect(ConnectKind::Unary(ConnectCodec::Json)),
        );
        assert!(!connect.contains_key("grpc-accept-encoding"));
    }

    #[test]
    fn trailer_metadata_leaves_grpc_framing_behind() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("x-custom", HeaderValue::from_static("v"));
        let metadata = response_metadata(&trailers);
        assert_eq!(metadata.len(), 1);
        assert_eq!(metadata["x-custom"], "v");
    }

    #[test]
    fn rate_limited_carries_retry_info() {
        use tonic_types::StatusExt as _;
        let status = rate_limited(Duration::from_millis(250));
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        let retry = details.retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(Duration::from_millis(250)));
        assert_eq!(
            details.error_info().map(|info| info.reason.as_str()),
            Some("RATE_LIMITED")
        );
    }

    #[test]
    fn a_long_content_type_is_cut_in_messages() {
        assert_eq!(truncate("abcdef", 3), "abc");
        assert_eq!(truncate("ab", 3), "ab");
    }
}
