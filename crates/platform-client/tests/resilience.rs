//! The client stack against real gRPC servers on loopback: circuit breaker,
//! retries and their budget, deadlines carried from the request being served.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use agora_platform::server::{HostedService, Server};
use agora_platform::shutdown::CancellationToken;
use agora_platform_client::{BreakerState, Discovery, ServiceChannel};
use agora_proto::catalog::v1 as pb;
use agora_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use agora_proto::catalog::v1::catalog_service_server::{CatalogService, CatalogServiceServer};
use common::{Backend, Mode, catalog, config, create, dead_address, get};
use tokio::time::Instant;
use tonic::{Code, Request, Response, Status};

#[tokio::test]
async fn the_breaker_opens_fails_fast_half_opens_and_closes_again() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    backend.set_mode(Mode::Unavailable);
    let config = config(&[backend.address()], |clients| {
        clients.breaker_failure_threshold = 3;
        clients.breaker_recovery_ms = 500;
        clients.max_retries = 0;
    });
    let (mut client, channel) = catalog(&config, Discovery::Static)?;
    let state = |channel: &ServiceChannel| channel.breaker_states();

    for _ in 0..3 {
        assert_eq!(
            get(&mut client).await.expect_err("unavailable").code(),
            Code::Unavailable
        );
    }
    assert_eq!(backend.calls(), 3);
    assert_eq!(state(&channel), [(backend.address(), BreakerState::Open)]);

    // Open: calls fail at once and nothing reaches the backend.
    for _ in 0..5 {
        let status = get(&mut client).await.expect_err("fails fast");
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            format!("circuit open for catalog at {}", backend.address())
        );
    }
    assert_eq!(
        backend.calls(),
        3,
        "no call may reach an instance while its breaker is open"
    );

    // After the recovery time one probe goes through; it fails: open again.
    tokio::time::sleep(Duration::from_millis(550)).await;
    assert_eq!(
        state(&channel),
        [(backend.address(), BreakerState::HalfOpen)]
    );
    let status = get(&mut client).await.expect_err("the probe fails");
    assert_eq!(status.message(), "backend says no");
    assert_eq!(backend.calls(), 4);
    assert_eq!(state(&channel), [(backend.address(), BreakerState::Open)]);
    assert!(get(&mut client).await.is_err());
    assert_eq!(backend.calls(), 4);

    // The backend recovers: the next probe succeeds and closes the breaker.
    tokio::time::sleep(Duration::from_millis(550)).await;
    assert_eq!(
        state(&channel),
        [(backend.address(), BreakerState::HalfOpen)]
    );
    backend.set_mode(Mode::Answer);
    assert_eq!(get(&mut client).await?, "a");
    assert_eq!(state(&channel), [(backend.address(), BreakerState::Closed)]);
    for _ in 0..3 {
        assert_eq!(get(&mut client).await?, "a");
    }
    assert_eq!(backend.calls(), 8);
    Ok(())
}

#[tokio::test]
async fn refused_connections_open_the_breaker_and_business_errors_do_not() -> anyhow::Result<()> {
    let dead = dead_address()?;
    let config = config(std::slice::from_ref(&dead), |clients| {
        clients.breaker_failure_threshold = 2;
        clients.max_retries = 0;
    });
    let (mut client, channel) = catalog(&config, Discovery::Static)?;
    let status = get(&mut client).await.expect_err("nothing listens");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .starts_with(&format!("cannot reach catalog at {dead}")),
        "{status:?}"
    );
    assert!(get(&mut client).await.is_err());
    assert_eq!(channel.breaker_states(), [(dead, BreakerState::Open)]);

    let backend = Backend::start("b").await?;
    backend.set_mode(Mode::FailedPrecondition);
    let config = common::config(&[backend.address()], |clients| {
        clients.breaker_failure_threshold = 2;
    });
    let (mut client, channel) = catalog(&config, Discovery::Static)?;
    for _ in 0..10 {
        let status = get(&mut client).await.expect_err("a business error");
        assert_eq!(status.code(), Code::FailedPrecondition);
    }
    assert_eq!(
        backend.calls(),
        10,
        "business errors are neither retried nor cut off"
    );
    assert_eq!(
        channel.breaker_states(),
        [(backend.address(), BreakerState::Closed)]
    );
    Ok(())
}

#[tokio::test]
async fn idempotent_calls_survive_a_dead_instance_and_others_are_not_retried() -> anyhow::Result<()>
{
    let live = Backend::start("live").await?;
    let addresses = [dead_address()?, live.address()];
    let config = config(&addresses, |clients| {
        clients.max_retries = 2;
        clients.retry_budget_percent = 100;
        // Keep the dead instance in play: this test is about retries.
        clients.breaker_failure_threshold = 1_000;
    });
    let (mut client, channel) = catalog(&config, Discovery::Static)?;
    for _ in 0..20 {
        assert_eq!(get(&mut client).await?, "live");
    }
    assert_eq!(live.calls(), 20);

    // CreateProduct is not idempotent: the calls that drew the dead
    // instance fail, and no other attempt is made.
    let mut failed = 0;
    for _ in 0..30 {
        match create(&mut client).await {
            Ok(answer) => assert_eq!(answer, "live"),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "30 calls without one drawing the dead instance");
    assert_eq!(live.calls(), 20 + 30 - failed);
    assert_eq!(channel.breaker_states().len(), 2);
    Ok(())
}

#[tokio::test]
async fn unavailable_answers_are_retried_for_idempotent_methods_only() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    backend.set_mode(Mode::Unavailable);
    let config = config(&[backend.address()], |clients| {
        clients.max_retries = 2;
        clients.breaker_failure_threshold = 1_000;
    });
    let (mut client, _channel) = catalog(&config, Discovery::Static)?;
    assert_eq!(
        create(&mut client).await.expect_err("unavailable").code(),
        Code::Unavailable
    );
    assert_eq!(backend.calls(), 1);
    assert_eq!(
        get(&mut client).await.expect_err("unavailable").code(),
        Code::Unavailable
    );
    assert_eq!(backend.calls(), 1 + 3, "one call and two retries");
    // A backend back on its feet answers the retry.
    backend.set_mode(Mode::Answer);
    assert_eq!(get(&mut client).await?, "a");
    Ok(())
}

#[tokio::test]
async fn the_retry_budget_caps_retries() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    backend.set_mode(Mode::Unavailable);
    let config = config(&[backend.address()], |clients| {
        clients.max_retries = 1;
        // No share of the calls: only the floor of one retry per second
        // over the 10 s window, i.e. 10 retries.
        clients.retry_budget_percent = 0;
        clients.breaker_failure_threshold = 1_000;
    });
    let (mut client, _channel) = catalog(&config, Discovery::Static)?;
    for _ in 0..15 {
        assert!(get(&mut client).await.is_err());
    }
    assert_eq!(
        backend.calls(),
        15 + 10,
        "15 calls, 10 of them retried once"
    );
    let before = backend.calls();
    assert!(get(&mut client).await.is_err());
    assert_eq!(
        backend.calls(),
        before + 1,
        "with the budget spent, no retry"
    );
    Ok(())
}

#[tokio::test]
async fn retries_stop_at_the_deadline() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    backend.set_mode(Mode::Unavailable);
    let config = config(&[backend.address()], |clients| {
        clients.max_retries = 50;
        clients.retry_budget_percent = 1_000;
        clients.breaker_failure_threshold = 1_000;
    });
    let (mut client, _channel) = catalog(&config, Discovery::Static)?;
    let started = Instant::now();
    let mut request = Request::new(pb::GetProductRequest::default());
    request.set_timeout(Duration::from_millis(300));
    let status = client
        .get_product(request)
        .await
        .expect_err("never answered");
    assert!(
        matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1_000),
        "{:?}",
        started.elapsed()
    );
    // 25-50, 50-100, 100-200 ms pauses: a handful of attempts fit in 300 ms.
    assert!(
        (2..=6).contains(&backend.calls()),
        "{} attempts",
        backend.calls()
    );
    Ok(())
}

/// The frontend of the deadline test: its `GetProduct` waits a while, then
/// asks the backend through the client stack.
struct Relay {
    backend: CatalogServiceClient<ServiceChannel>,
    work_before_calling: Duration,
}

#[tonic::async_trait]
impl CatalogService for Relay {
    async fn create_product(
        &self,
        _request: Request<pb::CreateProductRequest>,
    ) -> Result<Response<pb::CreateProductResponse>, Status> {
        Err(Status::unimplemented("not in this relay"))
    }

    async fn get_product(
        &self,
        request: Request<pb::GetProductRequest>,
    ) -> Result<Response<pb::GetProductResponse>, Status> {
        tokio::time::sleep(self.work_before_calling).await;
        self.backend.clone().get_product(request.into_inner()).await
    }

    async fn list_products(
        &self,
        _request: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        Err(Status::unimplemented("not in this relay"))
    }

    async fn update_product(
        &self,
        _request: Request<pb::UpdateProductRequest>,
    ) -> Result<Response<pb::UpdateProductResponse>, Status> {
        Err(Status::unimplemented("not in this relay"))
    }
}

#[tokio::test]
async fn the_callee_gets_at_most_what_is_left_of_the_callers_budget() -> anyhow::Result<()> {
    let backend = Backend::start("backend").await?;
    let config = config(&[backend.address()], |_| {});
    let (to_backend, _channel) = catalog(&config, Discovery::Static)?;
    let relay = Relay {
        backend: to_backend,
        work_before_calling: Duration::from_millis(50),
    };
    let app = Server::new()
        .host(HostedService::new(
            pb::SERVICE_NAME,
            CatalogServiceServer::new(relay),
        ))
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await?;
    let frontend = app.local_addr();
    let stop = CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    tokio::spawn(app.run_until_stopped(stop));
    let mut caller = CatalogServiceClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{frontend}"))?.connect_lazy(),
    );

    // 200 ms from the caller, 50 of them spent before the outgoing call.
    let mut request = Request::new(pb::GetProductRequest::default());
    request
        .metadata_mut()
        .insert("grpc-timeout", "200m".parse()?);
    let answer = caller.get_product(request).await?.into_inner();
    assert_eq!(answer.product.map(|p| p.id).as_deref(), Some("backend"));
    let seen = backend.seen();
    let timeout = seen[0]
        .grpc_timeout
        .expect("the backend got a grpc-timeout");
    assert!(
        timeout <= Duration::from_millis(150) && timeout > Duration::ZERO,
        "the backend was given {timeout:?}"
    );
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some("Bearer token-for-catalog")
    );

    // Without a deadline from the caller, the configured default applies.
    caller.get_product(pb::GetProductRequest::default()).await?;
    let timeout = backend.seen()[1].grpc_timeout.expect("a grpc-timeout");
    assert!(
        timeout <= Duration::from_secs(5) && timeout > Duration::from_secs(4),
        "{timeout:?}"
    );

    // A caller's budget that runs out during the work: the outgoing call is
    // never made (the server gives up on the call when it runs out).
    let mut request = Request::new(pb::GetProductRequest::default());
    request
        .metadata_mut()
        .insert("grpc-timeout", "30m".parse()?);
    let status = caller.get_product(request).await.expect_err("out of time");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(backend.calls(), 2);
    Ok(())
}

#[tokio::test]
async fn calls_without_time_left_are_not_sent_and_slow_ones_are_cut_off() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let config = config(&[backend.address()], |clients| {
        clients.breaker_failure_threshold = 1_000;
    });
    let (mut client, _channel) = catalog(&config, Discovery::Static)?;

    let status = agora_platform::deadline::scope(Instant::now(), get(&mut client))
        .await
        .expect_err("no time left");
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(backend.calls(), 0, "a call without time left is not sent");

    // Within a budget: a caller's own shorter timeout wins and is enforced.
    backend.set_mode(Mode::Slow(Duration::from_millis(500)));
    let started = Instant::now();
    let status = agora_platform::deadline::scope(Instant::now() + Duration::from_secs(2), async {
        let mut request = Request::new(pb::GetProductRequest::default());
        request.set_timeout(Duration::from_millis(100));
        client.get_product(request).await
    })
    .await
    .expect_err("too slow");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );
    let timeout = backend.seen()[0].grpc_timeout.expect("a grpc-timeout");
    assert!(timeout <= Duration::from_millis(100), "{timeout:?}");
    Ok(())
}

#[tokio::test]
async fn short_deadlines_of_callers_do_not_open_breakers_and_hanging_instances_do()
-> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    // Healthy, just slower than the callers below are willing to wait.
    backend.set_mode(Mode::Slow(Duration::from_millis(3)));
    let config = config(&[backend.address()], |clients| {
        clients.default_timeout_ms = 300;
        clients.breaker_failure_threshold = 3;
        clients.max_retries = 0;
    });
    let (mut client, channel) = catalog(&config, Discovery::Static)?;
    let closed = [(backend.address(), BreakerState::Closed)];

    // A request served with an inbound `grpc-timeout: 1m` (1 ms) makes its
    // calls within `deadline::scope` of that deadline, which is what the
    // server's deadline layer does (called here directly: through a real
    // relay, the relay's server would cancel the handler, and with it the
    // call, before the client stack could notice anything).
    for _ in 0..20 {
        let inbound = Instant::now() + Duration::from_millis(1);
        let status = agora_platform::deadline::scope(inbound, get(&mut client))
            .await
            .expect_err("1 ms is too short");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
    assert_eq!(channel.breaker_states(), closed);
    // The caller's own short timeout says no more about the instance.
    for _ in 0..20 {
        let mut request = Request::new(pb::GetProductRequest::default());
        request.set_timeout(Duration::from_millis(1));
        let status = client.get_product(request).await.expect_err("too short");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
    assert_eq!(channel.breaker_states(), closed);
    assert_eq!(
        get(&mut client).await?,
        "a",
        "with the full budget it answers"
    );

    // An instance that hangs through the whole configured budget is cut
    // off, also when the request being served had more time than that.
    backend.set_mode(Mode::Slow(Duration::from_secs(30)));
    for _ in 0..3 {
        let inbound = Instant::now() + Duration::from_secs(60);
        let status = agora_platform::deadline::scope(inbound, get(&mut client))
            .await
            .expect_err("hangs");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
    assert_eq!(
        channel.breaker_states(),
        [(backend.address(), BreakerState::Open)]
    );
    Ok(())
}

#[tokio::test]
async fn an_open_breaker_fails_idempotent_calls_at_once_when_no_other_instance_admits()
-> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    backend.set_mode(Mode::Unavailable);
    let config = config(&[backend.address()], |clients| {
        clients.breaker_failure_threshold = 1;
        clients.breaker_recovery_ms = 60_000;
        clients.max_retries = 2;
        // Plenty of budget: the budget is not what stops the retries here.
        clients.retry_budget_percent = 1_000;
    });
    let (mut client, channel) = catalog(&config, Discovery::Static)?;
    assert!(get(&mut client).await.is_err());
    assert_eq!(backend.calls(), 1);
    assert_eq!(
        channel.breaker_states(),
        [(backend.address(), BreakerState::Open)]
    );

    // Retrying would mean waiting 25-100 ms per retry to be refused again.
    let started = Instant::now();
    for _ in 0..10 {
        let status = get(&mut client).await.expect_err("open");
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            format!("circuit open for catalog at {}", backend.address())
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "10 refusals took {:?}",
        started.elapsed()
    );
    assert_eq!(backend.calls(), 1);
    Ok(())
}
