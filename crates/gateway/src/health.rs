//! The gateway's own `grpc.health.v1` status, kept current from the
//! backends' health `Watch` streams, and the readiness `/readyz` reports.
//!
//! Each backend gRPC service (`agora.catalog.v1.CatalogService`) has the
//! status its instances report, as seen through the client stack (so a
//! service with no reachable instance is NOT_SERVING); the empty name ""
//! is SERVING only when every backend is.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use agora_platform::backoff::Backoff;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

use crate::routes::BackendService;

/// What the gateway knows of its backends.
#[derive(Clone)]
pub struct HealthState {
    reporter: HealthReporter,
    /// gRPC service name -> last known status (`None` until first heard).
    statuses: Arc<Mutex<BTreeMap<String, Option<bool>>>>,
    draining: CancellationToken,
}

impl HealthState {
    /// Statuses for `backends`, reported through `reporter`, all unknown.
    pub fn new(reporter: HealthReporter, backends: &[BackendService]) -> Self {
        let statuses = backends
            .iter()
            .flat_map(|backend| backend.grpc_names.iter().map(|name| (name.clone(), None)))
            .collect();
        Self {
            reporter,
            statuses: Arc::new(Mutex::new(statuses)),
            draining: CancellationToken::new(),
        }
    }

    /// Sets every status NOT_SERVING, as the gateway starts, so a client
    /// never sees SERVING before it was true.
    pub async fn start(&self) {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        for name in names {
            self.reporter
                .set_service_status(&name, ServingStatus::NotServing)
                .await;
        }
        self.reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Option<bool>>> {
        self.statuses.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn set(&self, service: &str, serving: bool) {
        let (changed, all_before, all_serving) = {
            let mut statuses = self.lock();
            let all_before = statuses.values().all(|status| *status == Some(true));
            let previous = statuses.insert(service.to_owned(), Some(serving));
            let all = statuses.values().all(|status| *status == Some(true));
            (previous != Some(Some(serving)), all_before, all)
        };
        if !changed {
            // Watchers of "" and of this service have heard it already.
            return;
        }
        if serving {
            tracing::info!(service, "backend serving");
        } else {
            tracing::warn!(service, "backend not serving");
        }
        let status = |serving| {
            if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        self.reporter
            .set_service_status(service, status(serving))
            .await;
        if all_before != all_serving && !self.draining.is_cancelled() {
            self.reporter
                .set_service_status("", status(all_serving))
                .await;
        }
    }

    /// The gateway is stopping: readiness fails and "" turns NOT_SERVING so
    /// load balancers move away before connections close.
    pub async fn drain(&self) {
        self.draining.cancel();
        self.reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
    }

    /// Ready when not draining and every backend's health has been heard
    /// (serving or not: the gateway can answer for it either way). The
    /// body lists each backend's status.
    pub fn readiness(&self) -> (bool, String) {
        let statuses = self.lock();
        let mut body = String::new();
        let mut ready = !self.draining.is_cancelled();
        if !ready {
            body.push_str("draining\n");
        }
        for (name, status) in statuses.iter() {
            let text = match status {
                Some(true) => "SERVING",
                Some(false) => "NOT_SERVING",
                None => {
                    ready = false;
                    "UNKNOWN"
                }
            };
            body.push_str(&format!("{name} {text}\n"));
        }
        (ready, body)
    }

    /// Watches every backend service until `stop`, one task each.
    pub fn spawn_watchers(&self, backends: &[BackendService], stop: &CancellationToken) {
        for backend in backends {
            for name in &backend.grpc_names {
                let state = self.clone();
                let channel = backend.streaming.clone();
                let name = name.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = state.watch(channel, &name) => {}
                        () = stop.cancelled() => {}
                    }
                });
            }
        }
    }

    /// Follows one backend's `Watch` stream, again after every failure,
    /// marking the service NOT_SERVING while it cannot be heard.
    async fn watch(&self, channel: agora_platform_client::ServiceChannel, service: &str) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let mut client = HealthClient::new(channel.clone());
            let request = HealthCheckRequest {
                service: service.to_owned(),
            };
            match client.watch(request).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(update)) => {
                                backoff.reset();
                                let serving = update.status == WireStatus::Serving as i32;
                                self.set(service, serving).await;
                            }
                            Ok(None) => break,
                            Err(status) => {
                                tracing::debug!(service, %status, "health watch ended");
                                break;
                            }
                        }
                    }
                }
                Err(status) => {
                    tracing::debug!(service, %status, "cannot watch backend health");
                    self.set(service, false).await;
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}
