//! The server's transport limits over real gRPC on loopback: load shedding
//! per hosted service (health still answers, other services are not
//! affected), the default deadline of unary calls (streams are not cut by
//! it), the cap on stated deadlines, the streams one connection may open
//! at once, the connections the server keeps open at once, the response
//! size limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agora_platform::config::ServerConfig;
use agora_platform::error::reason_of;
use agora_platform::server::{HostedService, Server};
use agora_platform::shutdown::CancellationToken;
use agora_proto::notifications::v1 as pb;
use agora_proto::notifications::v1::notification_service_client::NotificationServiceClient;
use agora_proto::notifications::v1::notification_service_server::{
    NotificationService, NotificationServiceServer,
};
use agora_proto::orders::v1 as orders;
use agora_proto::orders::v1::order_service_client::OrderServiceClient;
use agora_proto::orders::v1::order_service_server::{OrderService, OrderServiceServer};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt as _;

/// Sends on a channel when dropped: tells the test a handler stopped.
struct DropSignal(mpsc::UnboundedSender<()>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// `ListNotifications` reports that it started, waits for the gate to
/// open, then answers with a page token of `page_size` bytes.
struct BlockingNotifications {
    started: mpsc::UnboundedSender<()>,
    stopped: mpsc::UnboundedSender<()>,
    gate: Arc<Semaphore>,
}

#[tonic::async_trait]
impl NotificationService for BlockingNotifications {
    async fn list_notifications(
        &self,
        request: Request<pb::ListNotificationsRequest>,
    ) -> Result<Response<pb::ListNotificationsResponse>, Status> {
        let _stopped = DropSignal(self.stopped.clone());
        let _ = self.started.send(());
        let _pass = self
            .gate
            .acquire()
            .await
            .map_err(|_| Status::internal("gate closed"))?;
        let filler = usize::try_from(request.into_inner().page_size).unwrap_or_default();
        Ok(Response::new(pb::ListNotificationsResponse {
            notifications: Vec::new(),
            next_page_token: "x".repeat(filler),
        }))
    }
}

type WatchSender = mpsc::Sender<Result<orders::WatchOrderResponse, Status>>;

/// `GetOrder` answers at once, with the caller's address as the server saw
/// it in `x-remote-addr`; `WatchOrder` sends one message at once and hands
/// the test the sender of the rest (the stream ends when the test drops it).
struct StreamingOrders {
    watches: mpsc::UnboundedSender<WatchSender>,
}

fn order(id: &str) -> orders::Order {
    orders::Order {
        id: id.to_owned(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl OrderService for StreamingOrders {
    async fn place_order(
        &self,
        _request: Request<orders::PlaceOrderRequest>,
    ) -> Result<Response<orders::PlaceOrderResponse>, Status> {
        Err(Status::unimplemented("test double"))
    }

    async fn get_order(
        &self,
        request: Request<orders::GetOrderRequest>,
    ) -> Result<Response<orders::GetOrderResponse>, Status> {
        let remote = request.remote_addr();
        let mut response = Response::new(orders::GetOrderResponse {
            order: Some(order(&request.into_inner().id)),
        });
        if let Some(value) = remote.and_then(|addr| addr.to_string().parse().ok()) {
            response.metadata_mut().insert("x-remote-addr", value);
        }
        Ok(response)
    }

    async fn list_orders(
        &self,
        _request: Request<orders::ListOrdersRequest>,
    ) -> Result<Response<orders::ListOrdersResponse>, Status> {
        Err(Status::unimplemented("test double"))
    }

    async fn cancel_order(
        &self,
        _request: Request<orders::CancelOrderRequest>,
    ) -> Result<Response<orders::CancelOrderResponse>, Status> {
        Err(Status::unimplemented("test double"))
    }

    type WatchOrderStream = ReceiverStream<Result<orders::WatchOrderResponse, Status>>;

    async fn watch_order(
        &self,
        request: Request<orders::WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let (sender, receiver) = mpsc::channel(4);
        let first = orders::WatchOrderResponse {
            order: Some(order(&request.into_inner().id)),
        };
        sender
            .send(Ok(first))
            .await
            .map_err(|_| Status::internal("receiver gone"))?;
        self.watches
            .send(sender)
            .map_err(|_| Status::internal("test gone"))?;
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

struct Running {
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// One message per `ListNotifications` handler that started.
    started: mpsc::UnboundedReceiver<()>,
    /// One message per `ListNotifications` handler that stopped (answered
    /// or dropped).
    stopped: mpsc::UnboundedReceiver<()>,
    /// Opens (adds permits) to let blocked `ListNotifications` answer.
    gate: Arc<Semaphore>,
    /// The sender of each `WatchOrder` stream opened.
    watches: mpsc::UnboundedReceiver<WatchSender>,
}

impl Running {
    fn notifications(&self) -> anyhow::Result<NotificationServiceClient<Channel>> {
        Ok(NotificationServiceClient::new(channel(self.addr)?))
    }

    fn orders(&self) -> anyhow::Result<OrderServiceClient<Channel>> {
        Ok(OrderServiceClient::new(channel(self.addr)?))
    }

    fn open_gate(&self) {
        self.gate.add_permits(1_000);
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await??;
        Ok(())
    }
}

/// Hosts both doubles (without access checks: they are called without
/// tokens; access has its own tests) under `limits`.
async fn start(limits: ServerConfig) -> anyhow::Result<Running> {
    let (started_tx, started) = mpsc::unbounded_channel();
    let (stopped_tx, stopped) = mpsc::unbounded_channel();
    let (watches_tx, watches) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    let notifications = agora_platform::message_limits!(
        NotificationServiceServer::new(BlockingNotifications {
            started: started_tx,
            stopped: stopped_tx,
            gate: Arc::clone(&gate),
        }),
        &limits
    );
    let orders = agora_platform::message_limits!(
        OrderServiceServer::new(StreamingOrders {
            watches: watches_tx
        }),
        &limits
    );
    let app = Server::new()
        .limits(&limits)
        .health_interval(Duration::from_millis(50))
        .host(HostedService::new(pb::SERVICE_NAME, notifications).without_access_checks())
        .host(HostedService::new(orders::SERVICE_NAME, orders).without_access_checks())
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await?;
    let addr = app.local_addr();
    let stop = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(stop.clone()));
    let running = Running {
        addr,
        stop,
        task,
        started,
        stopped,
        gate,
        watches,
    };
    wait_for_serving(addr, pb::SERVICE_NAME).await?;
    Ok(running)
}

/// One connection per call of this, so tests choose what shares one.
fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy())
}

async fn health(addr: SocketAddr, service: &str) -> anyhow::Result<ServingStatus> {
    let response = HealthClient::new(channel(addr)?)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(response.into_inner().status())
}

async fn wait_for_serving(addr: SocketAddr, service: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if health(addr, service).await? == ServingStatus::Serving {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("{service} never became SERVING")
}

/// Waits for `count` messages on `receiver`, failing after 10 s.
async fn expect_messages<T>(
    receiver: &mut mpsc::UnboundedReceiver<T>,
    count: usize,
) -> anyhow::Result<Vec<T>> {
    let mut seen = Vec::with_capacity(count);
    while seen.len() < count {
        let next = tokio::time::timeout(Duration::from_secs(10), receiver.recv()).await;
        match next {
            Ok(Some(message)) => seen.push(message),
            Ok(None) => anyhow::bail!("channel closed after {} of {count}", seen.len()),
            Err(_) => anyhow::bail!("only {} of {count} within 10 s", seen.len()),
        }
    }
    Ok(seen)
}

/// `call`, failing the test if it takes more than 10 s: a call that
/// should be refused or cut must never hang the test instead.
async fn within<T>(call: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 10 s"))
}

/// Asserts RESOURCE_EXHAUSTED from load shedding: reason `OVERLOADED`, a
/// short `RetryInfo`, a message naming the service.
fn assert_overloaded(status: &Status, service: &str) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        reason_of(status).as_deref(),
        Some("OVERLOADED"),
        "{status:?}"
    );
    assert!(
        status.message().contains(service) && status.message().contains("overloaded"),
        "{status:?}"
    );
    let retry = status.get_details_retry_info().expect("RetryInfo");
    let delay = retry.retry_delay.expect("a retry delay");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(1),
        "{delay:?}"
    );
}

#[tokio::test]
async fn a_saturated_service_sheds_load_at_once_while_health_and_other_services_answer()
-> anyhow::Result<()> {
    let mut running = start(ServerConfig {
        max_in_flight_per_service: 3,
        ..ServerConfig::default()
    })
    .await?;

    // Three calls hold every permit of the notifications service.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut client = running.notifications()?;
        held.push(tokio::spawn(async move {
            client
                .list_notifications(pb::ListNotificationsRequest::default())
                .await
        }));
    }
    expect_messages(&mut running.started, 3).await?;

    // Five more (on fresh connections and on one shared one) are refused
    // at once, before any handler runs.
    let mut shared = running.notifications()?;
    for attempt in 0..5 {
        let mut fresh = running.notifications()?;
        let client = if attempt % 2 == 0 {
            &mut shared
        } else {
            &mut fresh
        };
        let refused =
            within(client.list_notifications(pb::ListNotificationsRequest::default())).await?;
        let status = refused.expect_err("the service is saturated");
        assert_overloaded(&status, pb::SERVICE_NAME);
    }
    assert!(
        running.started.try_recv().is_err(),
        "a refused call reached its handler"
    );

    // Probes still answer, and another hosted service is not affected.
    assert_eq!(health(running.addr, "").await?, ServingStatus::Serving);
    assert_eq!(
        health(running.addr, pb::SERVICE_NAME).await?,
        ServingStatus::Serving
    );
    let other = running
        .orders()?
        .get_order(orders::GetOrderRequest { id: "o1".into() })
        .await?;
    assert_eq!(
        other.into_inner().order.map(|o| o.id).as_deref(),
        Some("o1")
    );

    // Released, the held calls finish and new calls are served again.
    running.open_gate();
    for call in held {
        call.await?.expect("a held call completes");
    }
    shared
        .list_notifications(pb::ListNotificationsRequest::default())
        .await?;
    running.stop().await
}

#[tokio::test]
async fn an_open_stream_leaves_the_permit_to_unary_calls_and_outlives_the_default_deadline()
-> anyhow::Result<()> {
    let mut running = start(ServerConfig {
        max_in_flight_per_service: 1,
        default_timeout_ms: 200,
        ..ServerConfig::default()
    })
    .await?;
    let mut client = running.orders()?;

    let mut stream = client
        .watch_order(orders::WatchOrderRequest { id: "o1".into() })
        .await?
        .into_inner();
    let first = stream.next().await.expect("a first message")?;
    assert_eq!(first.order.map(|o| o.id).as_deref(), Some("o1"));
    let sender = expect_messages(&mut running.watches, 1)
        .await?
        .pop()
        .expect("one sender");

    // The stream counted while it was set up, not while it stays open (its
    // own caps bound that): the service's one permit is free for unary calls.
    within(client.get_order(orders::GetOrderRequest { id: "o2".into() }))
        .await?
        .map_err(|status| anyhow::anyhow!("an open stream starved a unary call: {status:?}"))?;

    // Well past the unary default, the stream still delivers.
    tokio::time::sleep(Duration::from_millis(600)).await;
    sender
        .send(Ok(orders::WatchOrderResponse {
            order: Some(orders::Order {
                id: "o1-later".into(),
                ..Default::default()
            }),
        }))
        .await?;
    let later = stream.next().await.expect("a later message")?;
    assert_eq!(later.order.map(|o| o.id).as_deref(), Some("o1-later"));
    drop(sender);
    assert!(stream.next().await.is_none(), "the stream ended");
    running.stop().await
}

#[tokio::test]
async fn a_unary_call_without_a_deadline_gets_the_default_and_its_handler_is_dropped()
-> anyhow::Result<()> {
    let mut running = start(ServerConfig {
        max_in_flight_per_service: 1,
        default_timeout_ms: 200,
        ..ServerConfig::default()
    })
    .await?;
    let mut client = running.notifications()?;

    for _ in 0..2 {
        let status = within(client.list_notifications(pb::ListNotificationsRequest::default()))
            .await?
            .expect_err("the handler never answers");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        // The handler was dropped (its work stopped) and its permit
        // released: the next call is admitted, not shed.
        expect_messages(&mut running.started, 1).await?;
        expect_messages(&mut running.stopped, 1).await?;
    }

    // A deadline the caller states replaces the default, longer or not.
    let mut request = Request::new(pb::ListNotificationsRequest::default());
    request.set_timeout(Duration::from_secs(30));
    let call = tokio::spawn({
        let mut client = client.clone();
        async move { client.list_notifications(request).await }
    });
    expect_messages(&mut running.started, 1).await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    running.open_gate();
    call.await?
        .expect("the caller's 30 s deadline holds, not the default");
    expect_messages(&mut running.stopped, 1).await?;

    running.stop().await
}

#[tokio::test]
async fn a_handler_is_dropped_when_the_callers_deadline_passes() -> anyhow::Result<()> {
    let mut running = start(ServerConfig::default()).await?;
    let mut client = running.notifications()?;
    let mut request = Request::new(pb::ListNotificationsRequest::default());
    request.set_timeout(Duration::from_millis(150));
    let status = client
        .list_notifications(request)
        .await
        .expect_err("the handler never answers");
    // The server answers DEADLINE_EXCEEDED; the tonic client's own timer
    // on the same deadline may end the call first, as CANCELLED.
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    expect_messages(&mut running.started, 1).await?;
    // Far below the server's 30 s default: the caller's deadline stopped it.
    expect_messages(&mut running.stopped, 1).await?;
    running.stop().await
}

#[tokio::test]
async fn a_stated_deadline_of_years_is_cut_to_the_maximum() -> anyhow::Result<()> {
    let mut running = start(ServerConfig {
        max_in_flight_per_service: 1,
        // Long enough for a busy CI machine to start the handler and set up
        // the stream within it.
        max_timeout_ms: 1_500,
        ..ServerConfig::default()
    })
    .await?;
    let years = Duration::from_secs(10 * 365 * 24 * 3_600);
    let mut client = running.notifications()?;
    for _ in 0..2 {
        let mut request = Request::new(pb::ListNotificationsRequest::default());
        request.set_timeout(years);
        let status = within(client.list_notifications(request))
            .await?
            .expect_err("the handler never answers");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        // Dropped at the maximum, its permit released: the next call is
        // admitted (and cut in turn), not shed.
        expect_messages(&mut running.started, 1).await?;
        expect_messages(&mut running.stopped, 1).await?;
    }

    // A stream's deadline bounds only its setup: open with a deadline of
    // years, it still delivers well past the maximum.
    let mut request = Request::new(orders::WatchOrderRequest { id: "o1".into() });
    request.set_timeout(years);
    let mut stream = running.orders()?.watch_order(request).await?.into_inner();
    stream.next().await.expect("a first message")?;
    let sender = expect_messages(&mut running.watches, 1)
        .await?
        .pop()
        .expect("one sender");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    sender
        .send(Ok(orders::WatchOrderResponse {
            order: Some(order("o1-later")),
        }))
        .await?;
    let later = stream.next().await.expect("a later message")?;
    assert_eq!(later.order.map(|o| o.id).as_deref(), Some("o1-later"));
    drop(sender);
    assert!(stream.next().await.is_none(), "the stream ended");
    running.stop().await
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_and_frees_its_slot() -> anyhow::Result<()> {
    let running = start(ServerConfig {
        max_connections: 1,
        ..ServerConfig::default()
    })
    .await?;
    // A bare socket takes the one slot and never sends the HTTP/2 preface.
    let mut silent = tokio::net::TcpStream::connect(running.addr).await?;
    // The server closes it (it reads the SETTINGS frame, then the end), and
    // the slot serves the next client.
    let closed = tokio::time::timeout(
        agora_platform::server::FIRST_BYTES_TIMEOUT + Duration::from_secs(10),
        async {
            let mut sink = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut silent, &mut sink).await
        },
    )
    .await;
    assert!(closed.is_ok(), "the silent connection was kept open");
    let mut client = running.orders()?;
    within(client.get_order(orders::GetOrderRequest { id: "next".into() })).await??;
    running.stop().await
}

#[tokio::test]
async fn at_most_max_connections_are_open_and_the_next_waits_for_a_close() -> anyhow::Result<()> {
    let running = start(ServerConfig {
        max_connections: 1,
        ..ServerConfig::default()
    })
    .await?;
    // Connection A, a bare TCP socket the test closes at will, is accepted:
    // the server's one connection. Proof: the server speaks first on an
    // HTTP/2 connection it serves, with its SETTINGS frame.
    let mut connection_a = tokio::net::TcpStream::connect(running.addr).await?;
    let mut settings = [0u8; 9];
    within(tokio::io::AsyncReadExt::read_exact(
        &mut connection_a,
        &mut settings,
    ))
    .await??;
    assert_eq!(settings[3], 0x4, "a SETTINGS frame: {settings:?}");

    // Client B connects (the kernel's backlog takes it) and calls.
    let events = Arc::new(std::sync::Mutex::new(Vec::<&str>::new()));
    let mut client_b = running.orders()?;
    let call_b = tokio::spawn({
        let events = Arc::clone(&events);
        async move {
            let answer = client_b
                .get_order(orders::GetOrderRequest { id: "b".into() })
                .await;
            events.lock().expect("events").push("B answered");
            answer
        }
    });
    // Ample time for B to be served if the cap let it in.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !call_b.is_finished(),
        "a second connection was served while the first was open"
    );

    // A closes: B is accepted and answered, after that.
    events.lock().expect("events").push("A closed");
    drop(connection_a);
    let answer = within(call_b).await???;
    assert_eq!(
        *events.lock().expect("events"),
        ["A closed", "B answered"],
        "B was answered before A closed"
    );
    // The capped connection still reports its peer to handlers.
    let remote = answer
        .metadata()
        .get("x-remote-addr")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    assert!(
        remote
            .as_deref()
            .is_some_and(|addr| addr.starts_with("127.0.0.1:")),
        "{remote:?}"
    );
    assert_eq!(
        answer.into_inner().order.map(|o| o.id).as_deref(),
        Some("b")
    );
    running.stop().await
}

#[tokio::test]
async fn one_connection_opens_at_most_max_concurrent_streams_at_once() -> anyhow::Result<()> {
    let mut running = start(ServerConfig {
        max_concurrent_streams: 2,
        ..ServerConfig::default()
    })
    .await?;
    let channel = channel(running.addr)?;
    // A first call on the connection, so that the client has the server's
    // SETTINGS (and its stream limit) before the test begins.
    OrderServiceClient::new(channel.clone())
        .get_order(orders::GetOrderRequest { id: "o1".into() })
        .await?;

    let mut calls = Vec::new();
    for _ in 0..3 {
        let mut client = NotificationServiceClient::new(channel.clone());
        calls.push(tokio::spawn(async move {
            client
                .list_notifications(pb::ListNotificationsRequest::default())
                .await
        }));
    }
    expect_messages(&mut running.started, 2).await?;
    // The third waits in the client for a stream of the connection to end.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        running.started.try_recv().is_err(),
        "a third stream was opened on a connection limited to two"
    );
    running.open_gate();
    for call in calls {
        call.await?
            .expect("every call completes once streams free up");
    }
    expect_messages(&mut running.started, 1).await?;
    running.stop().await
}

#[tokio::test]
async fn responses_larger_than_max_response_bytes_are_not_sent() -> anyhow::Result<()> {
    let running = start(ServerConfig {
        max_response_bytes: 1_024,
        ..ServerConfig::default()
    })
    .await?;
    running.open_gate();
    let mut client = running.notifications()?;

    let small = client
        .list_notifications(pb::ListNotificationsRequest {
            page_size: 512,
            ..Default::default()
        })
        .await?;
    assert_eq!(small.into_inner().next_page_token.len(), 512);

    let status = client
        .list_notifications(pb::ListNotificationsRequest {
            page_size: 4_096,
            ..Default::default()
        })
        .await
        .expect_err("a response over the limit");
    // tonic's code for a message over the size limit.
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    running.stop().await
}
