//! The server builder over real gRPC on loopback: draining on shutdown,
//! health driven by checks, reflection v1 and v1alpha, trace propagation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agora_platform::error::{Error, ErrorKind};
use agora_platform::server::{HealthCheck, HostedService, Server};
use agora_platform::shutdown::CancellationToken;
use agora_proto::notifications::v1 as pb;
use agora_proto::notifications::v1::notification_service_client::NotificationServiceClient;
use agora_proto::notifications::v1::notification_service_server::{
    NotificationService, NotificationServiceServer,
};
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A service whose one RPC reports that it started, takes a while, and
/// answers with the trace context it ran in (`traceparent` as the page token).
struct SlowService {
    started: mpsc::UnboundedSender<()>,
    delay: Duration,
}

#[tonic::async_trait]
impl NotificationService for SlowService {
    async fn list_notifications(
        &self,
        _request: Request<pb::ListNotificationsRequest>,
    ) -> Result<Response<pb::ListNotificationsResponse>, Status> {
        let _ = self.started.send(());
        tokio::time::sleep(self.delay).await;
        let mut metadata = tonic::metadata::MetadataMap::new();
        agora_platform::telemetry::inject_current(&mut metadata);
        let traceparent = metadata
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok(Response::new(pb::ListNotificationsResponse {
            notifications: Vec::new(),
            next_page_token: traceparent,
        }))
    }
}

/// A dependency the test can break and repair.
#[derive(Clone, Default)]
struct Switch(Arc<AtomicBool>);

impl HealthCheck for Switch {
    fn name(&self) -> &str {
        "switch"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), Error>> {
        let broken = self.0.load(Ordering::SeqCst);
        Box::pin(async move {
            if broken {
                Err(Error::new(ErrorKind::Unavailable, "switched off"))
            } else {
                Ok(())
            }
        })
    }
}

struct Running {
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    started: mpsc::UnboundedReceiver<()>,
    switch: Switch,
}

async fn start(delay: Duration) -> anyhow::Result<Running> {
    let (tx, started) = mpsc::unbounded_channel();
    let switch = Switch::default();
    let service = NotificationServiceServer::new(SlowService { started: tx, delay });
    let app = Server::new()
        .health_interval(Duration::from_millis(50))
        // A double, called without tokens: the access checks have their own
        // tests (tests/access.rs).
        .host(
            HostedService::new(pb::SERVICE_NAME, service)
                .without_access_checks()
                .with_check(switch.clone()),
        )
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await?;
    let addr = app.local_addr();
    let stop = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(stop.clone()));
    Ok(Running {
        addr,
        stop,
        task,
        started,
        switch,
    })
}

fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy())
}

async fn health(addr: SocketAddr, service: &str) -> anyhow::Result<ServingStatus> {
    let mut client = HealthClient::new(channel(addr)?);
    let response = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(response.into_inner().status())
}

async fn wait_for(addr: SocketAddr, service: &str, want: ServingStatus) -> anyhow::Result<()> {
    for _ in 0..100 {
        if health(addr, service).await? == want {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{service:?} never became {want:?}")
}

#[tokio::test]
async fn shutdown_drains_in_flight_calls_then_refuses_connections() -> anyhow::Result<()> {
    let mut running = start(Duration::from_millis(500)).await?;
    let mut client = NotificationServiceClient::new(channel(running.addr)?);
    let call = tokio::spawn(async move {
        client
            .list_notifications(pb::ListNotificationsRequest::default())
            .await
    });
    running.started.recv().await;
    running.stop.cancel();
    // The call was in flight when shutdown began: it must complete normally.
    let response = call.await?;
    assert!(response.is_ok(), "in-flight call failed: {response:?}");
    running.task.await??;
    assert!(tokio::net::TcpStream::connect(running.addr).await.is_err());
    Ok(())
}

#[tokio::test]
async fn health_follows_the_dependency_checks() -> anyhow::Result<()> {
    let running = start(Duration::ZERO).await?;
    wait_for(running.addr, pb::SERVICE_NAME, ServingStatus::Serving).await?;
    wait_for(running.addr, "", ServingStatus::Serving).await?;

    running.switch.0.store(true, Ordering::SeqCst);
    wait_for(running.addr, pb::SERVICE_NAME, ServingStatus::NotServing).await?;
    wait_for(running.addr, "", ServingStatus::NotServing).await?;

    running.switch.0.store(false, Ordering::SeqCst);
    wait_for(running.addr, pb::SERVICE_NAME, ServingStatus::Serving).await?;

    // Services not hosted here are unknown to health.
    let status = HealthClient::new(channel(running.addr)?)
        .check(HealthCheckRequest {
            service: "agora.users.v1.UserService".into(),
        })
        .await
        .expect_err("not hosted");
    assert_eq!(status.code(), tonic::Code::NotFound);
    running.stop.cancel();
    running.task.await??;
    Ok(())
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_what_is_hosted() -> anyhow::Result<()> {
    let running = start(Duration::ZERO).await?;
    let expected = vec![
        "agora.notifications.v1.NotificationService".to_owned(),
        "grpc.health.v1.Health".to_owned(),
        "grpc.reflection.v1.ServerReflection".to_owned(),
        "grpc.reflection.v1alpha.ServerReflection".to_owned(),
    ];

    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(channel(running.addr)?);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::once(request))
            .await?
            .into_inner();
        let Some(Ok(response)) = tokio_stream::StreamExt::next(&mut stream).await else {
            anyhow::bail!("no v1 reflection response");
        };
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            anyhow::bail!("unexpected v1 reflection response");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        assert_eq!(names, expected);
    }
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(channel(running.addr)?);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "google.rpc.BadRequest".into(),
            )),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::once(request))
            .await?
            .into_inner();
        let Some(Ok(response)) = tokio_stream::StreamExt::next(&mut stream).await else {
            anyhow::bail!("no v1alpha reflection response");
        };
        // Error details are describable, so grpcurl can print field violations.
        assert!(matches!(
            response.message_response,
            Some(MessageResponse::FileDescriptorResponse(_))
        ));
    }
    running.stop.cancel();
    running.task.await??;
    Ok(())
}

#[tokio::test]
async fn the_callers_trace_continues_in_the_server_span() -> anyhow::Result<()> {
    let _telemetry = agora_platform::telemetry::init("test", Default::default())?;
    let running = start(Duration::ZERO).await?;
    let mut client = NotificationServiceClient::new(channel(running.addr)?);
    let mut request = Request::new(pb::ListNotificationsRequest::default());
    request.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?,
    );
    let seen = client
        .list_notifications(request)
        .await?
        .into_inner()
        .next_page_token;
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!(parts.len(), 4, "{seen}");
    assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
    assert_ne!(
        parts[2], "00f067aa0ba902b7",
        "a new span of the server's own"
    );
    running.stop.cancel();
    running.task.await??;
    Ok(())
}
