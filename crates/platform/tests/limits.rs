//! The contract's length limits, checked by the server on the encoded
//! request before any handler runs, over real gRPC on loopback: a double
//! of the inventory service counts the calls its handlers get, so every
//! refusal below also shows that the handler never ran.
//!
//! Well-formed calls go through tonic's client; broken frames, compressed
//! flags and a body that never ends go through hyper's bare HTTP/2 client,
//! as no well-behaved client would send them. The same bare client stalls
//! bodies, to show the body read timeout and the budget of buffered bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agora_platform::auth::{ServiceTokenSigner, TokenVerifier, generate_keypair_pem};
use agora_platform::config::ServerConfig;
use agora_platform::error::{MAX_VIOLATIONS, reason_of};
use agora_platform::server::{HostedService, Server};
use agora_platform::shutdown::CancellationToken;
use agora_proto::catalog::v1 as catalog_pb;
use agora_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use agora_proto::inventory::v1 as pb;
use agora_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use agora_proto::inventory::v1::inventory_service_server::{
    InventoryService, InventoryServiceServer,
};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost_reflect::prost::Message as _;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt as _;

const ISSUER: &str = "agora";
/// `server.max_request_bytes` of the test server: small, so that an
/// oversized message is cheap to send.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Counts the calls that reached a handler and echoes what it got.
struct Inventory {
    calls: Arc<AtomicUsize>,
}

impl Inventory {
    fn ran(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl InventoryService for Inventory {
    async fn set_stock(
        &self,
        request: Request<pb::SetStockRequest>,
    ) -> Result<Response<pb::SetStockResponse>, Status> {
        self.ran();
        let request = request.into_inner();
        Ok(Response::new(pb::SetStockResponse {
            stock: Some(pb::StockLevel {
                product_id: request.product_id,
                available: request.quantity,
                reserved: 0,
            }),
        }))
    }

    async fn get_stock(
        &self,
        request: Request<pb::GetStockRequest>,
    ) -> Result<Response<pb::GetStockResponse>, Status> {
        self.ran();
        Ok(Response::new(pb::GetStockResponse {
            stock: Some(pb::StockLevel {
                product_id: request.into_inner().product_id,
                ..Default::default()
            }),
        }))
    }

    async fn reserve_stock(
        &self,
        request: Request<pb::ReserveStockRequest>,
    ) -> Result<Response<pb::ReserveStockResponse>, Status> {
        self.ran();
        let request = request.into_inner();
        Ok(Response::new(pb::ReserveStockResponse {
            reservation: Some(pb::Reservation {
                reservation_id: request.reservation_id,
                items: request.items,
                ..Default::default()
            }),
        }))
    }

    async fn release_reservation(
        &self,
        _request: Request<pb::ReleaseReservationRequest>,
    ) -> Result<Response<pb::ReleaseReservationResponse>, Status> {
        self.ran();
        Ok(Response::new(pb::ReleaseReservationResponse {}))
    }

    async fn commit_reservation(
        &self,
        _request: Request<pb::CommitReservationRequest>,
    ) -> Result<Response<pb::CommitReservationResponse>, Status> {
        self.ran();
        Ok(Response::new(pb::CommitReservationResponse {}))
    }
}

struct Harness {
    addr: SocketAddr,
    channel: Channel,
    calls: Arc<AtomicUsize>,
    /// A service token of "orders" addressed to inventory.
    orders_token: String,
    stop: CancellationToken,
}

impl Harness {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn client(&self) -> InventoryServiceClient<Channel> {
        // Large messages on purpose: the server is the one to refuse them.
        InventoryServiceClient::new(self.channel.clone())
            .max_encoding_message_size(64 << 20)
            .max_decoding_message_size(64 << 20)
    }

    fn as_orders<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let value = format!("Bearer {}", self.orders_token)
            .parse()
            .expect("ascii token");
        request.metadata_mut().insert("authorization", value);
        request
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One server hosting the inventory double (with real access checks) on
/// port 0, with `server.max_request_bytes` = [`MAX_REQUEST_BYTES`].
async fn start() -> anyhow::Result<Harness> {
    start_with(ServerConfig {
        max_request_bytes: MAX_REQUEST_BYTES,
        ..ServerConfig::default()
    })
    .await
}

/// [`start`] with the transport limits `limits`.
async fn start_with(limits: ServerConfig) -> anyhow::Result<Harness> {
    let (_, user_public) = generate_keypair_pem()?;
    let (orders_private, orders_public) = generate_keypair_pem()?;
    let verifier = TokenVerifier::from_pem(user_public.as_bytes(), ISSUER, "inventory")?
        .with_service_key("orders", orders_public.as_bytes())?;
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Server::new()
        .limits(&limits)
        .host(
            HostedService::new(
                pb::SERVICE_NAME,
                InventoryServiceServer::new(Inventory {
                    calls: Arc::clone(&calls),
                }),
            )
            .with_token_verifier(verifier),
        )
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await?;
    let addr = app.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone()));
    let orders_token =
        ServiceTokenSigner::from_pem(orders_private.expose().as_bytes(), ISSUER, "orders", 60)?
            .token_for("inventory")?;
    Ok(Harness {
        addr,
        channel: Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy(),
        calls,
        orders_token,
        stop,
    })
}

/// `(field, description)` of each `BadRequest` violation of a status.
fn violations(status: &Status) -> Vec<(String, String)> {
    status
        .get_details_bad_request()
        .map(|details| {
            details
                .field_violations
                .into_iter()
                .map(|v| (v.field, v.description))
                .collect()
        })
        .unwrap_or_default()
}

fn fields(status: &Status) -> Vec<String> {
    violations(status)
        .into_iter()
        .map(|(field, _)| field)
        .collect()
}

#[tokio::test]
async fn an_over_long_field_is_invalid_argument_before_the_handler() -> anyhow::Result<()> {
    let h = start().await?;
    let mut client = h.client();

    // At the limit (64 bytes), the handler gets the bytes as they were sent.
    let id = "é".repeat(32);
    let stock = client
        .get_stock(pb::GetStockRequest {
            product_id: id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(stock.stock.unwrap_or_default().product_id, id);
    assert_eq!(h.calls(), 1);

    // One byte more is refused, naming the field, and the handler never runs.
    let status = client
        .get_stock(pb::GetStockRequest {
            product_id: format!("{id}x"),
        })
        .await
        .expect_err("65 bytes");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        violations(&status),
        [(
            "product_id".to_owned(),
            "must be at most 64 bytes".to_owned()
        )]
    );
    assert_eq!(status.message(), "invalid product_id");

    // Nested: the path names the item.
    let item = |product_id: String| pb::ReservationItem {
        product_id,
        quantity: 1,
    };
    let status = client
        .reserve_stock(h.as_orders(pb::ReserveStockRequest {
            reservation_id: "r".repeat(129),
            items: vec![item("p".into()), item("p".repeat(65))],
        }))
        .await
        .expect_err("too long");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(fields(&status), ["reservation_id", "items[1].product_id"]);
    assert_eq!(h.calls(), 1, "no handler ran for a refused request");

    // The caller is checked first: anonymous callers learn nothing about
    // the limits of an RPC they may not call, and their body is not read.
    let status = client
        .reserve_stock(pb::ReserveStockRequest {
            reservation_id: "r".repeat(129),
            items: Vec::new(),
        })
        .await
        .expect_err("anonymous");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(h.calls(), 1);
    Ok(())
}

#[tokio::test]
async fn a_hundred_thousand_items_get_a_bounded_answer() -> anyhow::Result<()> {
    let h = start().await?;
    let items: Vec<pb::ReservationItem> = (0..100_000)
        .map(|i| pb::ReservationItem {
            // Every item is also invalid: only the first 100 are looked into.
            product_id: if i < 100 {
                "x".repeat(65)
            } else {
                String::new()
            },
            quantity: 1,
        })
        .collect();
    let request = pb::ReserveStockRequest {
        reservation_id: "saga-1".into(),
        items,
    };
    assert!(request.encoded_len() < MAX_REQUEST_BYTES);
    let status = h
        .client()
        .reserve_stock(h.as_orders(request))
        .await
        .expect_err("too many");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let found = violations(&status);
    assert_eq!(found.len(), MAX_VIOLATIONS);
    assert_eq!(
        found[0],
        ("items".to_owned(), "must have at most 100 items".to_owned())
    );
    assert_eq!(found[1].0, "items[0].product_id");
    assert!(
        status.message().ends_with("and 81 more"),
        "{}",
        status.message()
    );
    // The whole answer stays small.
    assert!(
        status.details().len() < 2048,
        "{} bytes",
        status.details().len()
    );
    assert_eq!(h.calls(), 0);

    // 100 items are fine.
    let hundred = pb::ReserveStockRequest {
        reservation_id: "saga-2".into(),
        items: vec![
            pb::ReservationItem {
                product_id: "p".into(),
                quantity: 1,
            };
            100
        ],
    };
    let reserved = h.client().reserve_stock(h.as_orders(hundred)).await?;
    assert_eq!(
        reserved
            .into_inner()
            .reservation
            .unwrap_or_default()
            .items
            .len(),
        100
    );
    assert_eq!(h.calls(), 1);
    Ok(())
}

#[tokio::test]
async fn an_oversized_message_is_resource_exhausted() -> anyhow::Result<()> {
    let h = start().await?;
    // Within its field limits, over the message limit: refused on size.
    let request = pb::ReserveStockRequest {
        reservation_id: "saga".into(),
        items: Vec::new(),
    };
    let mut bytes = request.encode_to_vec();
    // An unknown field the size of the limit.
    bytes.extend(len_field(1000, &vec![b'x'; MAX_REQUEST_BYTES]));
    let answer = raw_call(
        h.addr,
        "/agora.inventory.v1.InventoryService/GetStock",
        &[],
        Full::new(Bytes::from(frame(0, &bytes))),
    )
    .await?;
    assert_eq!(answer.code, Some(Code::ResourceExhausted), "{answer:?}");
    assert!(answer.message.contains("too large"), "{answer:?}");

    // Through tonic, the same.
    let status = h
        .client()
        .get_stock(pb::GetStockRequest {
            product_id: "x".repeat(MAX_REQUEST_BYTES),
        })
        .await
        .expect_err("too large");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason_of(&status).as_deref(), Some("MESSAGE_TOO_LARGE"));

    // Decided on the length prefix alone: the header of a frame announcing
    // 100 MB, and a body that never ends, are answered at once.
    let (sender, receiver) =
        tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::convert::Infallible>>(1);
    let mut header = vec![0u8];
    header.extend_from_slice(&100_000_000u32.to_be_bytes());
    sender
        .send(Ok(http_body::Frame::data(Bytes::from(header))))
        .await?;
    let endless = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(receiver));
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        raw_call(
            h.addr,
            "/agora.inventory.v1.InventoryService/GetStock",
            &[],
            endless,
        ),
    )
    .await??;
    assert_eq!(answer.code, Some(Code::ResourceExhausted), "{answer:?}");
    drop(sender);
    assert_eq!(h.calls(), 0);
    Ok(())
}

/// A request body under the test's control: `first` is sent at once, then
/// the body stays open, sending nothing, until the sender is dropped.
type FrameSender =
    tokio::sync::mpsc::Sender<Result<http_body::Frame<Bytes>, std::convert::Infallible>>;
type HeldBody = StreamBody<
    tokio_stream::wrappers::ReceiverStream<
        Result<http_body::Frame<Bytes>, std::convert::Infallible>,
    >,
>;

async fn held_body(first: &[u8]) -> anyhow::Result<(FrameSender, HeldBody)> {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    if !first.is_empty() {
        sender
            .send(Ok(http_body::Frame::data(Bytes::copy_from_slice(first))))
            .await?;
    }
    Ok((
        sender,
        StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(receiver)),
    ))
}

/// The 5-byte header of a frame announcing a message of `length` bytes.
fn frame_header(length: u32) -> Vec<u8> {
    let mut header = vec![0u8];
    header.extend_from_slice(&length.to_be_bytes());
    header
}

/// A raw call's answer as a status, its details decoded.
fn status_of(answer: &Answer) -> Status {
    use base64::Engine as _;
    let details = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(answer.details.as_ref())
        .unwrap_or_default();
    Status::with_details(
        answer.code.unwrap_or(Code::Unknown),
        answer.message.clone(),
        Bytes::from(details),
    )
}

#[tokio::test]
async fn a_body_that_never_comes_is_deadline_exceeded_and_frees_its_slot() -> anyhow::Result<()> {
    // One call at a time: a stalled call that kept its slot would get the
    // next one shed with OVERLOADED instead of timed out.
    let h = start_with(ServerConfig {
        max_request_bytes: MAX_REQUEST_BYTES,
        max_in_flight_per_service: 1,
        body_read_timeout_ms: 1_000,
        ..ServerConfig::default()
    })
    .await?;
    let path = "/agora.inventory.v1.InventoryService/GetStock";
    // The caller's own deadline is generous (100 s): the server's body
    // read timeout, not the caller, decides.
    let generous: &[(&str, &str)] = &[("grpc-timeout", "100S")];
    for (what, first) in [
        (
            "a header announcing 100 bytes, then nothing",
            frame_header(100),
        ),
        ("half a header, then nothing", vec![0, 0]),
        ("no data at all", Vec::new()),
    ] {
        let (sender, body) = held_body(&first).await?;
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            raw_call(h.addr, path, generous, body),
        )
        .await??;
        assert_eq!(
            answer.code,
            Some(Code::DeadlineExceeded),
            "{what}: {answer:?}"
        );
        assert!(answer.message.contains("too slow"), "{what}: {answer:?}");
        drop(sender);
    }
    assert_eq!(h.calls(), 0);

    // The slot is free: a whole request is served at once.
    h.client()
        .get_stock(pb::GetStockRequest {
            product_id: "p1".into(),
        })
        .await?;
    assert_eq!(h.calls(), 1);
    Ok(())
}

#[tokio::test]
async fn request_bytes_over_the_budget_are_refused_at_once_and_given_back() -> anyhow::Result<()> {
    // Room for one message of 800 bytes (805 with its header), not two.
    let h = start_with(ServerConfig {
        max_request_bytes: 1_000,
        max_buffered_request_bytes: 1_500,
        ..ServerConfig::default()
    })
    .await?;
    let path = "/agora.inventory.v1.InventoryService/GetStock";

    // Three calls announce 800 bytes each and stall: one is granted its
    // bytes and waits for them; the two others are refused at once.
    let (answers_tx, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let mut senders = Vec::new();
    for _ in 0..3 {
        let (sender, body) = held_body(&frame_header(800)).await?;
        senders.push(sender);
        let answers_tx = answers_tx.clone();
        let addr = h.addr;
        tokio::spawn(async move {
            let _ = answers_tx.send(raw_call(addr, path, &[], body).await);
        });
    }
    for _ in 0..2 {
        let answer = tokio::time::timeout(Duration::from_secs(10), answers.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("a caller task failed"))??;
        let status = status_of(&answer);
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(
            reason_of(&status).as_deref(),
            Some("OVERLOADED"),
            "{status:?}"
        );
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert!(
            retry
                .retry_delay
                .is_some_and(|delay| delay > Duration::ZERO)
        );
    }
    assert!(
        answers.try_recv().is_err(),
        "the call within the budget was answered before its body came"
    );

    // The granted one's body breaks off: cut short, and its bytes are
    // given back, so that a whole message of the same size is served.
    drop(senders);
    let answer = tokio::time::timeout(Duration::from_secs(10), answers.recv())
        .await?
        .ok_or_else(|| anyhow::anyhow!("a caller task failed"))??;
    assert_eq!(answer.code, Some(Code::InvalidArgument), "{answer:?}");
    assert!(answer.message.contains("cut short"), "{answer:?}");

    let mut message = pb::GetStockRequest {
        product_id: "p1".into(),
    }
    .encode_to_vec();
    message.extend(len_field(1000, &[b'x'; 780]));
    for _ in 0..3 {
        // One after the other, each within the budget once the last is done.
        let answer = raw_call(
            h.addr,
            path,
            &[],
            Full::new(Bytes::from(frame(0, &message))),
        )
        .await?;
        assert_eq!(answer.code, Some(Code::Ok), "{answer:?}");
    }
    assert_eq!(h.calls(), 3);
    Ok(())
}

/// What is sent, the headers it is sent with, the code expected.
type BrokenCase = (
    &'static str,
    Vec<u8>,
    &'static [(&'static str, &'static str)],
    Code,
);

#[tokio::test]
async fn broken_frames_are_client_errors_never_internal() -> anyhow::Result<()> {
    let h = start().await?;
    let good = pb::GetStockRequest {
        product_id: "p1".into(),
    }
    .encode_to_vec();
    let path = "/agora.inventory.v1.InventoryService/GetStock";
    let two_messages = [frame(0, &good), frame(0, &good)].concat();
    let mut invalid_utf8 = Vec::new();
    invalid_utf8.extend(len_field(1, &[0xff, 0xfe]));
    let cases: Vec<BrokenCase> = vec![
        ("no message at all", Vec::new(), &[], Code::InvalidArgument),
        ("half a header", vec![0, 0, 0], &[], Code::InvalidArgument),
        (
            "a message cut short",
            frame(0, &good)[..7].to_vec(),
            &[],
            Code::InvalidArgument,
        ),
        (
            "two messages in a unary call",
            two_messages,
            &[],
            Code::InvalidArgument,
        ),
        (
            "compressed flag without grpc-encoding",
            frame(1, &good),
            &[],
            Code::InvalidArgument,
        ),
        (
            "an unknown compression flag",
            frame(7, &good),
            &[],
            Code::InvalidArgument,
        ),
        (
            "gzip, which this server does not accept",
            frame(1, &good),
            &[("grpc-encoding", "gzip")],
            Code::Unimplemented,
        ),
        (
            "random bytes as the message",
            frame(0, &[0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]),
            &[],
            Code::InvalidArgument,
        ),
        (
            "a string that is not UTF-8",
            frame(0, &invalid_utf8),
            &[],
            Code::InvalidArgument,
        ),
    ];
    for (what, body, headers, code) in cases {
        let answer = raw_call(h.addr, path, headers, Full::new(Bytes::from(body))).await?;
        assert_eq!(answer.code, Some(code), "{what}: {answer:?}");
    }
    assert_eq!(h.calls(), 0, "no broken request reached the handler");

    // The invalid UTF-8 names its field.
    let status = raw_status(h.addr, path, frame(0, &invalid_utf8)).await?;
    assert_eq!(fields(&status), ["product_id"]);
    assert_eq!(violations(&status)[0].1, "must be valid UTF-8");

    // Identity encoding is no compression: served.
    let answer = raw_call(
        h.addr,
        path,
        &[("grpc-encoding", "identity")],
        Full::new(Bytes::from(frame(0, &good))),
    )
    .await?;
    assert_eq!(answer.code, Some(Code::Ok), "{answer:?}");
    assert_eq!(h.calls(), 1);
    Ok(())
}

#[tokio::test]
async fn health_and_services_not_hosted_are_untouched() -> anyhow::Result<()> {
    let h = start().await?;
    // Health answers (it is not a contract RPC, nothing is checked).
    let mut health = HealthClient::new(h.channel.clone());
    let mut serving = false;
    for _ in 0..100 {
        let answer = health
            .check(HealthCheckRequest {
                service: pb::SERVICE_NAME.to_owned(),
            })
            .await?
            .into_inner();
        if answer.status == ServingStatus::Serving as i32 {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(serving, "inventory never turned SERVING");
    // A contract RPC of a service hosted elsewhere: the router's answer,
    // not a limits check of a request this server cannot serve anyway.
    let status = CatalogServiceClient::new(h.channel.clone())
        .get_product(catalog_pb::GetProductRequest {
            id: "x".repeat(10_000),
        })
        .await
        .expect_err("not hosted");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    Ok(())
}

// ---- Raw HTTP/2 --------------------------------------------------------

/// A gRPC frame: the flag, the big-endian length, the message.
fn frame(flag: u8, message: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(message);
    out
}

/// Field `number` as a length-delimited field holding `payload`.
fn len_field(number: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut varint = |mut value: u64| {
        while value >= 0x80 {
            out.push((value as u8 & 0x7f) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    };
    varint((u64::from(number) << 3) | 2);
    varint(payload.len() as u64);
    out.extend_from_slice(payload);
    out
}

#[derive(Debug)]
struct Answer {
    code: Option<Code>,
    message: String,
    details: Bytes,
}

/// POSTs `body` to `path` over a bare HTTP/2 connection and reads the gRPC
/// status from the trailers (or the headers, for a trailers-only answer).
async fn raw_call<B>(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: B,
) -> anyhow::Result<Answer>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let mut request = http::Request::post(format!("http://{addr}{path}"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender.send_request(request.body(body)?).await?;
    let (parts, body) = response.into_parts();
    let trailers = match parts.headers.get("grpc-status") {
        // Trailers-only: the answer is complete without reading the body.
        Some(_) => parts.headers.clone(),
        None => body
            .collect()
            .await?
            .trailers()
            .cloned()
            .unwrap_or_default(),
    };
    let code = trailers
        .get("grpc-status")
        .and_then(|s| s.to_str().ok())
        .and_then(|s| s.parse::<i32>().ok())
        .map(Code::from_i32);
    let header = |name: &str| trailers.get(name).map(|v| v.as_bytes().to_vec());
    let message = header("grpc-message")
        .map(|m| percent_decode(&m))
        .unwrap_or_default();
    let details = header("grpc-status-details-bin")
        .map(Bytes::from)
        .unwrap_or_default();
    Ok(Answer {
        code,
        message,
        details,
    })
}

/// `grpc-message` is percent-encoded.
fn percent_decode(encoded: &[u8]) -> String {
    let mut out = Vec::with_capacity(encoded.len());
    let mut rest = encoded;
    while let Some((&byte, tail)) = rest.split_first() {
        let hex = tail
            .get(..2)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (byte, hex) {
            (b'%', Some(decoded)) => {
                out.push(decoded);
                rest = &tail[2..];
            }
            _ => {
                out.push(byte);
                rest = tail;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The status of a raw call, with its details decoded.
async fn raw_status(addr: SocketAddr, path: &str, body: Vec<u8>) -> anyhow::Result<Status> {
    let answer = raw_call(addr, path, &[], Full::new(Bytes::from(body))).await?;
    Ok(status_of(&answer))
}
