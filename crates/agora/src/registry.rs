//! The service registry, for `clients.discovery = "nats"`: `agora serve`
//! registers every service it runs ([`Registrar`]), and `agora registry`
//! prints what is registered.
//!
//! ```text
//! SERVICE        INSTANCE                   ADDRESS                    HEALTH       LAST SEEN
//! payments       payments-7d9f-3a1c0b2e     http://10.1.2.3:50054      SERVING      0.8s ago
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use agora_platform::config::{Config, DiscoveryMode};
use agora_platform::shutdown::CancellationToken;
use agora_platform_client::ClientSettings;
use agora_platform_client::registry::{self, Health, Registration};
use agora_platform_events::EventBus;
use anyhow::Context as _;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::Target;

/// Arguments of `agora registry`.
#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    /// NATS server (default: `nats_url` of the configuration, i.e.
    /// AGORA_NATS_URL or nats://127.0.0.1:4222).
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// TOML configuration file.
    #[arg(long, env = "AGORA_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Prints the registered instances as a table.
pub async fn run(args: RegistryArgs) -> anyhow::Result<()> {
    let (config, bus) =
        crate::events::connect_tool(args.nats_url.as_deref(), args.config.as_deref()).await?;
    let instances = registry::list(bus.client().clone()).await?;
    if instances.is_empty() {
        println!(
            "no instance registered (services register themselves with clients.discovery = \"nats\")"
        );
        return Ok(());
    }
    let ttl = Duration::from_secs(config.clients.instance_ttl_secs);
    let now = agora_platform::time::now_micros();
    println!(
        "{:<14} {:<26} {:<26} {:<12} LAST SEEN",
        "SERVICE", "INSTANCE", "ADDRESS", "HEALTH"
    );
    for instance in &instances {
        println!(
            "{:<14} {:<26} {:<26} {:<12} {}",
            instance.service,
            instance.instance_id,
            instance.address,
            instance.health.as_str(),
            age(now, instance.last_seen, ttl)
        );
    }
    Ok(())
}

/// `0.8s ago`, and `(expired)` past the TTL (the bucket drops it soon).
fn age(now_micros: i64, last_seen_micros: i64, ttl: Duration) -> String {
    let ago = Duration::from_micros(u64::try_from(now_micros - last_seen_micros).unwrap_or(0));
    let expired = if ago > ttl { " (expired)" } else { "" };
    format!("{:.1}s ago{expired}", ago.as_secs_f64())
}

/// Keeps the services `agora serve` runs registered, with
/// `clients.discovery = "nats"`.
pub struct Registrar {
    /// The NATS connection of every registration of this process.
    bus: EventBus,
    settings: ClientSettings,
}

impl Registrar {
    /// A registrar when discovery is `nats`, else `None`. Connects in the
    /// background: NATS may come up after the services.
    pub async fn connect(config: &Config, label: &str) -> anyhow::Result<Option<Self>> {
        if config.clients.discovery != DiscoveryMode::Nats {
            return Ok(None);
        }
        let settings = ClientSettings::from_config(&config.clients)?;
        // A tool's connection: registering needs no event stream.
        let bus = EventBus::connect_as_tool(&config.nats_url, &format!("{label}-registry")).await?;
        Ok(Some(Self { bus, settings }))
    }

    /// Registers `service`, bound at `bound`, heartbeating its gRPC health,
    /// until `stop`. Returns the token its server stops on: cancelled once
    /// the entry is deleted, so that callers stop picking this instance
    /// before it drains.
    pub fn register(
        &self,
        service: Target,
        config: &Config,
        bound: SocketAddr,
        stop: &CancellationToken,
    ) -> anyhow::Result<CancellationToken> {
        let settings = config
            .service(service.name())
            .context("no configuration for the service")?;
        let address = settings.advertised_address(bound);
        if settings.advertise_addr.is_none() && bound.ip().is_unspecified() {
            tracing::warn!(
                service = service.name(), %address,
                "registered with a loopback address: set advertise_addr for other hosts to reach it"
            );
        }
        let registration = Registration::new(service.name(), address)?;
        let health = LocalHealth::new(bound, service.grpc_service())?;
        let server_stop = CancellationToken::new();
        let registered = registration.run(
            self.bus.client().clone(),
            self.settings,
            move || health.clone().check(),
            stop.clone(),
        );
        let stop_server = server_stop.clone().drop_guard();
        tokio::spawn(async move {
            registered.await;
            // Deregistered (or the task failed): now the server may drain.
            drop(stop_server);
        });
        Ok(server_stop)
    }
}

/// The gRPC health of a service of this process, asked over loopback.
#[derive(Clone)]
struct LocalHealth {
    client: HealthClient<tonic::transport::Channel>,
    grpc_service: &'static str,
}

impl LocalHealth {
    fn new(bound: SocketAddr, grpc_service: &'static str) -> anyhow::Result<Self> {
        // A server bound to every interface answers on loopback.
        let ip = if bound.ip().is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            bound.ip()
        };
        let channel = tonic::transport::Endpoint::from_shared(format!(
            "http://{}",
            SocketAddr::new(ip, bound.port())
        ))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(1))
        .connect_lazy();
        Ok(Self {
            client: HealthClient::new(channel),
            grpc_service,
        })
    }

    async fn check(mut self) -> Health {
        let request = HealthCheckRequest {
            service: self.grpc_service.to_owned(),
        };
        match self.client.check(request).await {
            Ok(response) if response.get_ref().status() == ServingStatus::Serving => {
                Health::Serving
            }
            _ => Health::NotServing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_in_seconds_and_expired_ones_say_so() {
        let ttl = Duration::from_secs(10);
        let now = 100_000_000;
        assert_eq!(age(now, now - 800_000, ttl), "0.8s ago");
        assert_eq!(age(now, now - 12_000_000, ttl), "12.0s ago (expired)");
        assert_eq!(age(now, now + 5_000, ttl), "0.0s ago");
    }
}
