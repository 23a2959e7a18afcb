//! A real gRPC backend for the client stack to call (a test double of the
//! catalog service: the code under test is the client, the network is
//! real), and the configuration the tests build clients from.

#![allow(dead_code, missing_docs)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use agora_platform::config::{ClientsConfig, Config};
use agora_platform::server::HostedService;
use agora_platform_client::{CallPolicy, Clients, Credentials, Discovery, ServiceChannel};
use agora_proto::catalog::v1 as pb;
use agora_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use agora_proto::catalog::v1::catalog_service_server::{CatalogService, CatalogServiceServer};
use agora_testkit::TestServer;
use tonic::{Request, Response, Status};

/// The idempotent method of the tests.
pub const GET_PRODUCT: &str = "/agora.catalog.v1.CatalogService/GetProduct";

/// How a backend answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A product whose id is the backend's name.
    Answer,
    /// UNAVAILABLE, as a server shedding load does.
    Unavailable,
    /// FAILED_PRECONDITION: a business error, from a working server.
    FailedPrecondition,
    /// Answers after this long.
    Slow(Duration),
}

/// What a backend saw of one call.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: &'static str,
    pub grpc_timeout: Option<Duration>,
    pub traceparent: Option<String>,
    pub authorization: Option<String>,
}

struct State {
    name: String,
    calls: AtomicUsize,
    mode: Mutex<Mode>,
    seen: Mutex<Vec<Seen>>,
}

impl State {
    async fn answer(
        &self,
        method: &'static str,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<pb::Product, Status> {
        let text = |name: &str| {
            metadata
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Seen {
                method,
                grpc_timeout: text("grpc-timeout")
                    .and_then(|v| agora_platform::deadline::parse_grpc_timeout(&v)),
                traceparent: text("traceparent"),
                authorization: text("authorization"),
            });
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mode = *self.mode.lock().unwrap_or_else(PoisonError::into_inner);
        match mode {
            Mode::Answer => {}
            Mode::Unavailable => return Err(Status::unavailable("backend says no")),
            Mode::FailedPrecondition => return Err(Status::failed_precondition("not like this")),
            Mode::Slow(delay) => tokio::time::sleep(delay).await,
        }
        Ok(pb::Product {
            id: self.name.clone(),
            ..Default::default()
        })
    }
}

struct CatalogDouble(Arc<State>);

#[tonic::async_trait]
impl CatalogService for CatalogDouble {
    async fn create_product(
        &self,
        request: Request<pb::CreateProductRequest>,
    ) -> Result<Response<pb::CreateProductResponse>, Status> {
        let product = self.0.answer("CreateProduct", request.metadata()).await?;
        Ok(Response::new(pb::CreateProductResponse {
            product: Some(product),
        }))
    }

    async fn get_product(
        &self,
        request: Request<pb::GetProductRequest>,
    ) -> Result<Response<pb::GetProductResponse>, Status> {
        let product = self.0.answer("GetProduct", request.metadata()).await?;
        Ok(Response::new(pb::GetProductResponse {
            product: Some(product),
        }))
    }

    async fn list_products(
        &self,
        _request: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        Err(Status::unimplemented("not in this double"))
    }

    async fn update_product(
        &self,
        _request: Request<pb::UpdateProductRequest>,
    ) -> Result<Response<pb::UpdateProductResponse>, Status> {
        Err(Status::unimplemented("not in this double"))
    }
}

/// A catalog backend on 127.0.0.1, port 0, answering as told.
pub struct Backend {
    state: Arc<State>,
    address: String,
    server: Option<TestServer>,
}

impl Backend {
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let state = Arc::new(State {
            name: name.to_owned(),
            calls: AtomicUsize::new(0),
            mode: Mutex::new(Mode::Answer),
            seen: Mutex::new(Vec::new()),
        });
        let service = CatalogServiceServer::new(CatalogDouble(Arc::clone(&state)));
        // A double answering made-up tokens: no access checks.
        let hosted = HostedService::new(pb::SERVICE_NAME, service).without_access_checks();
        let server = TestServer::start(vec![hosted]).await?;
        Ok(Self {
            state,
            address: format!("http://{}", server.addr()),
            server: Some(server),
        })
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn address(&self) -> String {
        self.address.clone()
    }

    /// Calls that reached it.
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self
            .state
            .mode
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = mode;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops the server (it refuses connections afterwards).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(server) = self.server.take() {
            server.stop().await?;
        }
        Ok(())
    }
}

/// An address where nothing listens: connections are refused.
pub fn dead_address() -> anyhow::Result<String> {
    Ok(format!("http://127.0.0.1:{}", agora_testkit::free_port()?))
}

/// A configuration whose `catalog` service is at `addresses`, with the
/// clients settings `tweak` leaves.
pub fn config(addresses: &[String], tweak: impl FnOnce(&mut ClientsConfig)) -> Config {
    let mut config = Config::default();
    config.catalog.addresses = addresses.to_vec();
    tweak(&mut config.clients);
    config
}

/// Credentials that name the target, so a backend can tell what it got.
pub fn credentials() -> Credentials {
    Arc::new(|target: &str| Ok(Some(format!("token-for-{target}"))))
}

/// A catalog client through the stack of `orders`, retrying `GetProduct` only.
pub fn catalog(
    config: &Config,
    discovery: Discovery,
) -> anyhow::Result<(CatalogServiceClient<ServiceChannel>, ServiceChannel)> {
    let clients = Clients::new(config, "orders", discovery, credentials())?;
    let channel = clients.channel("catalog", CallPolicy::idempotent_methods([GET_PRODUCT]))?;
    Ok((CatalogServiceClient::new(channel.clone()), channel))
}

/// Calls `GetProduct` and returns the id the backend answered with (its name).
pub async fn get(client: &mut CatalogServiceClient<ServiceChannel>) -> Result<String, Status> {
    let response = client
        .get_product(pb::GetProductRequest { id: "p".into() })
        .await?;
    Ok(response
        .into_inner()
        .product
        .map(|p| p.id)
        .unwrap_or_default())
}

/// Calls `CreateProduct` (not idempotent: never retried).
pub async fn create(client: &mut CatalogServiceClient<ServiceChannel>) -> Result<String, Status> {
    let response = client
        .create_product(pb::CreateProductRequest::default())
        .await?;
    Ok(response
        .into_inner()
        .product
        .map(|p| p.id)
        .unwrap_or_default())
}

/// Waits until `check` holds, for up to `within`.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    while !check() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
