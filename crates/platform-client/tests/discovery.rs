//! Discovery against a real `nats-server`: instances registered in the
//! key-value bucket share the calls, and one that leaves (deregistered, or
//! killed and expired) stops getting them without calls failing. Static
//! addresses need no NATS at all.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use agora_platform_client::registry::{self, Health, Registration};
use agora_platform_client::{ClientSettings, Discovery, ServiceChannel};
use agora_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use agora_testkit::NatsServer;
use common::{Backend, catalog, config, eventually, get};
use tokio_util::sync::CancellationToken;

/// Heartbeats every second, gone after two without one.
fn registry_config() -> agora_platform::config::Config {
    config(&[], |clients| {
        clients.discovery = agora_platform::config::DiscoveryMode::Nats;
        clients.heartbeat_secs = 1;
        clients.instance_ttl_secs = 2;
        clients.max_retries = 2;
        clients.retry_budget_percent = 100;
    })
}

/// A registration heartbeating in the background.
struct Registered {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Registered {
    fn start(
        nats: &async_nats::Client,
        settings: ClientSettings,
        backend: &Backend,
        health: Health,
    ) -> anyhow::Result<Self> {
        Self::start_as(nats, settings, backend.name(), &backend.address(), health)
    }

    /// A registration of instance `instance_id` at `address`.
    fn start_as(
        nats: &async_nats::Client,
        settings: ClientSettings,
        instance_id: &str,
        address: &str,
        health: Health,
    ) -> anyhow::Result<Self> {
        let registration = Registration::new("catalog", address)?.with_instance_id(instance_id)?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(registration.run(
            nats.clone(),
            settings,
            move || async move { health },
            stop.clone(),
        ));
        Ok(Self { stop, task })
    }

    /// Shuts down as `agora serve` does: the key is deleted.
    async fn deregister(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await?;
        Ok(())
    }

    /// Dies: no more heartbeats, no deletion.
    fn kill(self) {
        self.task.abort();
    }
}

fn addresses(channel: &ServiceChannel) -> Vec<String> {
    let mut addresses: Vec<String> = channel
        .breaker_states()
        .into_iter()
        .map(|(address, _)| address)
        .collect();
    addresses.sort();
    addresses
}

/// `count` calls; how many each backend answered, and how many failed.
async fn spread(
    client: &mut CatalogServiceClient<ServiceChannel>,
    count: usize,
) -> (HashMap<String, usize>, usize) {
    let mut answered = HashMap::new();
    let mut failed = 0;
    for _ in 0..count {
        match get(client).await {
            Ok(name) => *answered.entry(name).or_insert(0) += 1,
            Err(status) => {
                eprintln!("call failed: {status:?}");
                failed += 1;
            }
        }
    }
    (answered, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_instances_share_calls_and_leaving_ones_stop_getting_them() -> anyhow::Result<()>
{
    let nats_server = NatsServer::start().await?;
    let nats = async_nats::connect(nats_server.url()).await?;
    let config = registry_config();
    let settings = ClientSettings::from_config(&config.clients)?;
    let mut a = Backend::start("a").await?;
    let mut b = Backend::start("b").await?;
    let registered_a = Registered::start(&nats, settings, &a, Health::Serving)?;
    let registered_b = Registered::start(&nats, settings, &b, Health::Serving)?;

    let (mut client, channel) = catalog(&config, Discovery::Nats(nats.clone()))?;
    let mut both = vec![a.address(), b.address()];
    both.sort();
    eventually(Duration::from_secs(5), || addresses(&channel) == both).await?;

    let (answered, failed) = spread(&mut client, 200).await;
    assert_eq!(failed, 0);
    for name in ["a", "b"] {
        let share = answered.get(name).copied().unwrap_or(0);
        assert!(share >= 50, "{name} answered {share} of 200: {answered:?}");
    }

    // `a` shuts down: it deregisters first, then stops serving.
    registered_a.deregister().await?;
    eventually(Duration::from_millis(750), || {
        addresses(&channel) == [b.address()]
    })
    .await?;
    a.stop().await?;
    let (answered, failed) = spread(&mut client, 50).await;
    assert_eq!((answered.get("b").copied(), failed), (Some(50), 0));

    // `c` joins; then `b` dies without a word: its key expires, and
    // meanwhile the calls that draw it are retried on `c`.
    let c = Backend::start("c").await?;
    let _registered_c = Registered::start(&nats, settings, &c, Health::Serving)?;
    let mut b_and_c = vec![b.address(), c.address()];
    b_and_c.sort();
    eventually(Duration::from_secs(5), || addresses(&channel) == b_and_c).await?;
    registered_b.kill();
    b.stop().await?;
    let gone = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut failed = 0;
    while addresses(&channel) != [c.address()] {
        assert!(
            tokio::time::Instant::now() < gone,
            "b was never dropped: {:?}",
            channel.breaker_states()
        );
        let (_, failures) = spread(&mut client, 10).await;
        failed += failures;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(failed, 0, "idempotent calls must not fail while b expires");
    let (answered, failed) = spread(&mut client, 50).await;
    assert_eq!((answered.get("c").copied(), failed), (Some(50), 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_not_serving_get_no_calls_and_the_registry_lists_them() -> anyhow::Result<()> {
    let nats_server = NatsServer::start().await?;
    let nats = async_nats::connect(nats_server.url()).await?;
    let config = registry_config();
    let settings = ClientSettings::from_config(&config.clients)?;
    let up = Backend::start("up").await?;
    let down = Backend::start("down").await?;
    let _up = Registered::start(&nats, settings, &up, Health::Serving)?;
    let _down = Registered::start(&nats, settings, &down, Health::NotServing)?;

    let listed = async {
        loop {
            let instances = registry::list(nats.clone()).await?;
            if instances.len() == 2 {
                return Ok::<_, anyhow::Error>(instances);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let instances = tokio::time::timeout(Duration::from_secs(5), listed).await??;
    let down_entry = instances
        .iter()
        .find(|instance| instance.instance_id == "down")
        .expect("down is listed");
    assert_eq!(down_entry.service, "catalog");
    assert_eq!(down_entry.health, Health::NotServing);
    assert_eq!(down_entry.address, down.address());

    let (mut client, channel) = catalog(&config, Discovery::Nats(nats.clone()))?;
    eventually(Duration::from_secs(5), || {
        addresses(&channel) == [up.address()]
    })
    .await?;
    let (answered, failed) = spread(&mut client, 20).await;
    assert_eq!((answered.get("up").copied(), failed), (Some(20), 0));
    assert_eq!(down.calls(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_survives_nats_starting_late_and_restarting() -> anyhow::Result<()> {
    // The client and the registration start before NATS does (a server
    // started and killed at once gives a port nothing listens on, for now).
    let mut nats_server = NatsServer::start().await?;
    nats_server.kill().await?;
    let nats = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(nats_server.url())
        .await?;
    let config = registry_config();
    let settings = ClientSettings::from_config(&config.clients)?;
    let first = Backend::start("first").await?;
    let _first = Registered::start(&nats, settings, &first, Health::Serving)?;
    let (mut client, channel) = catalog(&config, Discovery::Nats(nats.clone()))?;
    let status = get(&mut client).await.expect_err("nothing known yet");
    assert_eq!(status.message(), "no instance of catalog is available");

    nats_server.restart().await?;
    eventually(Duration::from_secs(10), || {
        addresses(&channel) == [first.address()]
    })
    .await?;
    assert_eq!(get(&mut client).await?, "first");

    // NATS restarts: the watch comes back and sees what registers afterwards.
    nats_server.kill().await?;
    nats_server.restart().await?;
    let second = Backend::start("second").await?;
    let _second = Registered::start(&nats, settings, &second, Health::Serving)?;
    let mut both = vec![first.address(), second.address()];
    both.sort();
    eventually(Duration::from_secs(10), || addresses(&channel) == both).await?;
    Ok(())
}

#[tokio::test]
async fn static_addresses_need_no_nats() -> anyhow::Result<()> {
    let a = Backend::start("a").await?;
    let b = Backend::start("b").await?;
    let config = config(&[a.address(), b.address()], |_| {});
    let (mut client, channel) = catalog(&config, Discovery::Static)?;
    assert_eq!(channel.breaker_states().len(), 2);
    let (answered, failed) = spread(&mut client, 100).await;
    assert_eq!(failed, 0);
    assert!(
        answered.get("a").copied().unwrap_or(0) >= 25,
        "{answered:?}"
    );
    assert!(
        answered.get("b").copied().unwrap_or(0) >= 25,
        "{answered:?}"
    );

    // Without addresses, a service is where it listens.
    let mut config = config;
    config.catalog.addresses.clear();
    config.catalog.listen_addr = a.address().trim_start_matches("http://").parse()?;
    let (mut client, channel) = catalog(&config, Discovery::Static)?;
    assert_eq!(channel.breaker_states().len(), 1);
    assert_eq!(get(&mut client).await?, "a");
    Ok(())
}

/// Writes `instance` into the registry directly, as a registering process
/// does (or one with a wrong clock, or a bogus writer). The bucket must
/// exist (a [`Registered`] creates it).
async fn put_entry(nats: &async_nats::Client, instance: &registry::Instance) -> anyhow::Result<()> {
    let store = async_nats::jetstream::new(nats.clone())
        .get_key_value(registry::BUCKET)
        .await?;
    store
        .put(instance.key(), serde_json::to_vec(instance)?.into())
        .await?;
    Ok(())
}

fn entry(instance_id: &str, address: &str, last_seen: i64) -> registry::Instance {
    registry::Instance {
        service: "catalog".into(),
        instance_id: instance_id.into(),
        address: address.into(),
        health: Health::Serving,
        last_seen,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_instances_outlive_a_nats_outage_and_dead_ones_still_expire() -> anyhow::Result<()> {
    let mut nats_server = NatsServer::start().await?;
    let nats = async_nats::ConnectOptions::new()
        .max_reconnects(None)
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(nats_server.url())
        .await?;
    let ttl = Duration::from_secs(3);
    let config = config(&[], |clients| {
        clients.discovery = agora_platform::config::DiscoveryMode::Nats;
        clients.heartbeat_secs = 1;
        clients.instance_ttl_secs = ttl.as_secs();
        clients.max_retries = 2;
        clients.retry_budget_percent = 100;
    });
    let settings = ClientSettings::from_config(&config.clients)?;
    let a = Backend::start("a").await?;
    let mut b = Backend::start("b").await?;
    let _registered_a = Registered::start(&nats, settings, &a, Health::Serving)?;
    let registered_b = Registered::start(&nats, settings, &b, Health::Serving)?;
    let (mut client, channel) = catalog(&config, Discovery::Nats(nats.clone()))?;
    let mut both = vec![a.address(), b.address()];
    both.sort();
    eventually(Duration::from_secs(5), || addresses(&channel) == both).await?;

    // NATS is gone for longer than the TTL: no heartbeat can arrive, which
    // says nothing about the instances, and they keep answering.
    nats_server.kill().await?;
    let outage_over = tokio::time::Instant::now() + ttl + Duration::from_millis(500);
    while tokio::time::Instant::now() < outage_over {
        let (_, failed) = spread(&mut client, 5).await;
        assert_eq!(failed, 0, "calls failed during the outage");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(addresses(&channel), both);

    // NATS is back (it expired both entries meanwhile): calls go on while
    // the instances write themselves in again.
    nats_server.restart().await?;
    let rewritten = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, failed) = spread(&mut client, 5).await;
        assert_eq!(failed, 0, "calls failed after the outage");
        let listed = tokio::time::timeout(Duration::from_secs(1), registry::list(nats.clone()))
            .await
            .ok()
            .and_then(Result::ok)
            .map_or(0, |instances| instances.len());
        if listed == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < rewritten,
            "the instances never registered again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(addresses(&channel), both);

    // With NATS up, a dead instance's entry expires and it is dropped.
    registered_b.kill();
    b.stop().await?;
    let gone = tokio::time::Instant::now() + ttl + Duration::from_secs(2);
    while addresses(&channel) != [a.address()] {
        assert!(
            tokio::time::Instant::now() < gone,
            "b was never dropped: {:?}",
            channel.breaker_states()
        );
        let (_, failed) = spread(&mut client, 5).await;
        assert_eq!(failed, 0, "idempotent calls must not fail while b expires");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clock_of_the_registering_host_plays_no_part() -> anyhow::Result<()> {
    let nats_server = NatsServer::start().await?;
    let nats = async_nats::connect(nats_server.url()).await?;
    let config = registry_config();
    let settings = ClientSettings::from_config(&config.clients)?;
    let up = Backend::start("up").await?;
    let behind = Backend::start("behind").await?;
    let _up = Registered::start(&nats, settings, &up, Health::Serving)?;
    let (mut client, channel) = catalog(&config, Discovery::Nats(nats.clone()))?;
    eventually(Duration::from_secs(5), || {
        addresses(&channel) == [up.address()]
    })
    .await?;

    // `behind` heartbeats from a host whose clock is an hour behind.
    let heartbeats = {
        let (nats, address) = (nats.clone(), behind.address());
        tokio::spawn(async move {
            loop {
                let an_hour_ago = agora_platform::time::now_micros() - 3_600_000_000;
                if let Err(err) = put_entry(&nats, &entry("behind", &address, an_hour_ago)).await {
                    eprintln!("heartbeat failed: {err}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let mut both = vec![up.address(), behind.address()];
    both.sort();
    let found = eventually(Duration::from_secs(3), || addresses(&channel) == both).await;
    let (answered, failed) = spread(&mut client, 40).await;
    heartbeats.abort();
    found?;
    assert_eq!(failed, 0);
    assert!(
        answered.get("behind").copied().unwrap_or(0) > 0,
        "{answered:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_registrations_is_capped() -> anyhow::Result<()> {
    let nats_server = NatsServer::start().await?;
    let nats = async_nats::connect(nats_server.url()).await?;
    let config = config(&[], |clients| {
        clients.discovery = agora_platform::config::DiscoveryMode::Nats;
        clients.heartbeat_secs = 1;
        // Long enough for the flood not to expire during the test.
        clients.instance_ttl_secs = 30;
    });
    let settings = ClientSettings::from_config(&config.clients)?;
    let up = Backend::start("up").await?;
    let _up = Registered::start(&nats, settings, &up, Health::Serving)?;
    let (_client, channel) = catalog(&config, Discovery::Nats(nats.clone()))?;
    eventually(Duration::from_secs(5), || {
        addresses(&channel) == [up.address()]
    })
    .await?;

    let cap = registry::MAX_INSTANCES_PER_SERVICE;
    let now = agora_platform::time::now_micros();
    for i in 0..cap + 10 {
        let address = format!("http://127.0.0.1:{}", 20_000 + i);
        put_entry(&nats, &entry(&format!("bogus-{i}"), &address, now)).await?;
    }
    // The last bogus entry is in when a later write is.
    put_entry(&nats, &entry("up", &up.address(), now)).await?;
    eventually(Duration::from_secs(5), || addresses(&channel).len() >= cap).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let known = addresses(&channel);
    assert_eq!(known.len(), cap, "{known:?}");
    assert!(known.contains(&up.address()), "instances known first stay");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_sharing_an_address_are_one_instance_spoken_for_by_the_serving_one()
-> anyhow::Result<()> {
    let nats_server = NatsServer::start().await?;
    let nats = async_nats::connect(nats_server.url()).await?;
    let config = registry_config();
    let settings = ClientSettings::from_config(&config.clients)?;
    let backend = Backend::start("restarted").await?;
    // Two keys for one address (a process restarted on a fixed port), the
    // first in key order saying it does not serve.
    let _old = Registered::start_as(
        &nats,
        settings,
        "a-old",
        &backend.address(),
        Health::NotServing,
    )?;
    let _new = Registered::start_as(
        &nats,
        settings,
        "b-new",
        &backend.address(),
        Health::Serving,
    )?;
    let (mut client, channel) = catalog(&config, Discovery::Nats(nats.clone()))?;
    eventually(Duration::from_secs(5), || {
        addresses(&channel) == [backend.address()]
    })
    .await?;
    let (answered, failed) = spread(&mut client, 10).await;
    assert_eq!((answered.get("restarted").copied(), failed), (Some(10), 0));
    Ok(())
}
