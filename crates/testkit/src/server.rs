//! Services on port 0 with a configuration of their own.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use agora_platform::auth::{
    Claims, ServiceTokenSigner, TokenIssuer, TokenKind, generate_keypair_pem,
};
use agora_platform::config::{Config, Secret};
use agora_platform::server::{HostedService, Server};
use agora_platform::shutdown::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::database::{Backend, TestDatabase};

/// Everything one test needs to start services: a [`Config`] pointing at a
/// fresh database and data folder, the user-token key pair, and one
/// service-token key pair per service (each private key in its service's
/// settings, every public key in `auth`), as in production.
pub struct TestEnv {
    /// The configuration to start services with; adjust it before starting.
    pub config: Config,
    issuer: TokenIssuer,
    /// Per service: its token signer and its private key (for tokens the
    /// signer would never make, such as expired ones).
    service_keys: BTreeMap<&'static str, (ServiceTokenSigner, Secret<String>)>,
    databases: Vec<TestDatabase>,
    _data_dir: tempfile::TempDir,
}

/// A NATS URL where nothing listens (port 1 on loopback): the default of
/// tests that start no `nats-server`.
pub const UNREACHABLE_NATS: &str = "nats://127.0.0.1:1";

/// The services of the mesh, as named in configuration.
pub const SERVICES: [&str; 6] = [
    "users",
    "catalog",
    "inventory",
    "payments",
    "orders",
    "notifications",
];

impl TestEnv {
    /// A fresh environment whose services all use one new database on
    /// `backend`: enough for a test of one service.
    pub async fn new(backend: Backend) -> anyhow::Result<Self> {
        let database = TestDatabase::create(backend).await?;
        Self::with_database(database)
    }

    /// A fresh environment where each service has a new database of its own,
    /// as in production (needed when a test runs several services, since each
    /// keeps its own migration history).
    pub async fn per_service(backend: Backend) -> anyhow::Result<Self> {
        let mut env = Self::with_database(TestDatabase::create(backend).await?)?;
        for name in SERVICES.iter().skip(1) {
            let database = TestDatabase::create(backend).await?;
            env.set_database(name, database.url());
            env.databases.push(database);
        }
        Ok(env)
    }

    fn set_database(&mut self, service: &str, url: &str) {
        let settings = match service {
            "users" => &mut self.config.users,
            "catalog" => &mut self.config.catalog,
            "inventory" => &mut self.config.inventory,
            "payments" => &mut self.config.payments,
            "orders" => &mut self.config.orders,
            _ => &mut self.config.notifications,
        };
        settings.database_url = Some(Secret::new(url.to_owned()));
    }

    /// A fresh environment on an existing (empty) database.
    pub fn with_database(database: TestDatabase) -> anyhow::Result<Self> {
        let data_dir = tempfile::tempdir()?;
        let (private_pem, public_pem) = generate_keypair_pem()?;
        let mut config = Config {
            data_dir: data_dir.path().to_path_buf(),
            // Never the machine's own NATS: nothing listens here, so events
            // wait in the outbox unless the test starts a NatsServer and
            // calls `use_nats`.
            nats_url: UNREACHABLE_NATS.to_owned(),
            ..Config::default()
        };
        config.auth.private_key_pem = Some(private_pem.clone());
        config.auth.public_key_pem = Some(public_pem);
        let mut service_keys = BTreeMap::new();
        for name in SERVICES {
            let (service_private, service_public) = generate_keypair_pem()?;
            let signer = ServiceTokenSigner::from_pem(
                service_private.expose().as_bytes(),
                &config.auth.issuer,
                name,
                config.auth.service_token_ttl_secs,
            )?;
            config
                .auth
                .service_public_keys
                .insert(name.to_owned(), service_public);
            service_keys.insert(name, (signer, service_private));
        }
        for (name, service) in [
            ("users", &mut config.users),
            ("catalog", &mut config.catalog),
            ("inventory", &mut config.inventory),
            ("payments", &mut config.payments),
            ("orders", &mut config.orders),
            ("notifications", &mut config.notifications),
        ] {
            service.signing_key_pem = service_keys.get(name).map(|(_, key)| key.clone());
        }
        let url = Some(Secret::new(database.url().to_owned()));
        for service in [
            &mut config.users,
            &mut config.catalog,
            &mut config.inventory,
            &mut config.payments,
            &mut config.orders,
            &mut config.notifications,
        ] {
            service.listen_addr = SocketAddr::from(([127, 0, 0, 1], 0));
            service.database_url = url.clone();
        }
        let issuer = TokenIssuer::from_pem(
            private_pem.expose().as_bytes(),
            &config.auth.issuer,
            config.auth.token_ttl_secs,
        )?;
        Ok(Self {
            config,
            issuer,
            service_keys,
            databases: vec![database],
            _data_dir: data_dir,
        })
    }

    /// Points the services at `nats` for their events.
    pub fn use_nats(&mut self, nats: &crate::NatsServer) {
        self.config.nats_url = nats.url().to_owned();
    }

    /// The URL of the database of `service`.
    pub fn service_database_url(&self, service: &str) -> Option<String> {
        self.config
            .service(service)
            .and_then(|s| s.database_url.as_ref())
            .map(|url| url.expose().clone())
    }

    /// The URL of the first test database (the only one made by [`TestEnv::new`]).
    pub fn database_url(&self) -> &str {
        self.databases.first().map_or("", TestDatabase::url)
    }

    /// `Bearer` value of a token for user `id` with `roles`.
    pub fn user_token(&self, id: &str, email: &str, roles: &[&str]) -> anyhow::Result<String> {
        let roles: Vec<String> = roles.iter().map(|r| (*r).to_owned()).collect();
        Ok(self.issuer.issue_user_token(id, email, &roles)?.token)
    }

    /// A token for an admin user with a random id.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        let id = uuid::Uuid::now_v7().to_string();
        self.user_token(&id, "admin@agora.test", &["admin"])
    }

    /// A token of service `caller` for calling service `audience`'s
    /// internal RPCs, signed with `caller`'s own key as that service would.
    pub fn service_token(&self, caller: &str, audience: &str) -> anyhow::Result<String> {
        Ok(self.service_key(caller)?.0.token_for(audience)?)
    }

    /// A token of service `caller` for `audience`, signed with its key, that
    /// expired ten minutes ago (well beyond the tolerated clock skew).
    pub fn expired_service_token(&self, caller: &str, audience: &str) -> anyhow::Result<String> {
        let (_, private_pem) = self.service_key(caller)?;
        let now = agora_platform::time::now_micros() / 1_000_000;
        let claims = Claims {
            iss: self.config.auth.issuer.clone(),
            sub: caller.to_owned(),
            aud: Some(audience.to_owned()),
            iat: now - 660,
            exp: now - 600,
            jti: uuid::Uuid::now_v7().to_string(),
            kind: TokenKind::Service,
            email: None,
            roles: Vec::new(),
        };
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(caller.to_owned());
        let key = jsonwebtoken::EncodingKey::from_ed_pem(private_pem.expose().as_bytes())?;
        Ok(jsonwebtoken::encode(&header, &claims, &key)?)
    }

    fn service_key(&self, caller: &str) -> anyhow::Result<&(ServiceTokenSigner, Secret<String>)> {
        self.service_keys
            .get(caller)
            .ok_or_else(|| anyhow::anyhow!("no service {caller} (one of {SERVICES:?})"))
    }
}

/// Services running on 127.0.0.1 on a free port, stopped when dropped.
pub struct TestServer {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Starts `services` in one server on a free port.
    pub async fn start(services: Vec<HostedService>) -> anyhow::Result<Self> {
        let mut server = Server::new().health_interval(std::time::Duration::from_millis(200));
        for service in services {
            server = server.host(service);
        }
        let app = server.bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = app.local_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        Ok(Self {
            addr,
            shutdown,
            task: Some(task),
        })
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A channel to the server (connects on first use).
    pub fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Endpoint::from_shared(format!("http://{}", self.addr))?
            .tcp_nodelay(true)
            .connect_lazy())
    }

    /// Stops the server gracefully and waits until it has stopped.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
