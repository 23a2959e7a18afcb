//! Picking an instance: power of two choices by least outstanding requests,
//! over the instances discovery currently offers.
//!
//! Not tower's `p2c::Balance`: it expects a `Discover` stream it owns, is
//! not `Clone` (it would need a `Buffer` task in front, and its errors
//! boxed), waits while it has no endpoint instead of failing, and drops an
//! endpoint that fails readiness for good. Here the instance set is a
//! watched value shared by every clone, an empty set fails at once with
//! UNAVAILABLE, and an instance whose breaker is open is only skipped until
//! it recovers. The choice itself is the same: two instances at random, the
//! one with fewer calls in flight.
//!
//! An instance is an address: registry keys sharing one (a process
//! restarted on a fixed port while its old key lives on) are merged, the
//! most recently received serving entry speaking for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use rand::Rng as _;
use tower::ServiceBuilder;

use crate::ResponseFuture;
use crate::breaker::{BreakerSettings, BreakerState, CircuitBreaker, Guarded};
use crate::call::{NoInstanceAdmits, TriedEndpoints};
use crate::discovery::{Target, Targets};
use crate::endpoint::EndpointChannel;

/// One instance as the balancer holds it.
struct Instance {
    address: Arc<str>,
    /// Calls sent and not answered yet (the load compared by the choice).
    in_flight: Arc<()>,
    breaker: Arc<CircuitBreaker>,
    service: Guarded<EndpointChannel>,
    /// What discovery last said about it.
    target: Target,
}

impl Instance {
    fn load(&self) -> usize {
        // Every call in flight holds a clone of `in_flight`.
        Arc::strong_count(&self.in_flight) - 1
    }
}

/// The instances of one service, kept in step with discovery; shared by
/// every clone of a channel.
pub struct Balancer {
    service: Arc<str>,
    breaker: BreakerSettings,
    table: Mutex<Table>,
}

struct Table {
    targets: Targets,
    instances: Vec<Instance>,
}

impl Balancer {
    /// The instances of `service` that `targets` announces.
    pub fn new(service: &str, targets: Targets, breaker: BreakerSettings) -> Self {
        let balancer = Self {
            service: Arc::from(service),
            breaker,
            table: Mutex::new(Table {
                targets,
                instances: Vec::new(),
            }),
        };
        balancer.sync(&mut balancer.lock(), true);
        balancer
    }

    /// The service balanced over.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The instances calls may go to now, and their breakers' states.
    pub fn breaker_states(&self) -> Vec<(String, BreakerState)> {
        let mut table = self.lock();
        self.sync(&mut table, false);
        table
            .instances
            .iter()
            .filter(|instance| instance.target.is_live())
            .map(|instance| (instance.address.to_string(), instance.breaker.state()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies what discovery announced since the last look: new addresses
    /// get a channel and a breaker, gone ones are dropped, kept ones keep
    /// theirs (and their breaker's state).
    fn sync(&self, table: &mut Table, force: bool) {
        if !force && !table.targets.has_changed().unwrap_or(false) {
            return;
        }
        let targets = merge_duplicates(table.targets.borrow_and_update().iter().cloned());
        let mut kept: HashMap<Arc<str>, Instance> = table
            .instances
            .drain(..)
            .map(|instance| (Arc::clone(&instance.address), instance))
            .collect();
        for target in targets {
            if let Some(mut instance) = kept.remove(target.address.as_str()) {
                instance.target = target;
                table.instances.push(instance);
                continue;
            }
            match EndpointChannel::lazy(&self.service, &target.address) {
                Ok(channel) => {
                    let breaker = CircuitBreaker::new(&self.service, &target.address, self.breaker);
                    let service = ServiceBuilder::new()
                        // Per instance, in front of its connection: an open
                        // breaker answers without touching the network.
                        .layer_fn(|channel| Guarded::new(Arc::clone(&breaker), channel))
                        // Innermost: the lazily connected HTTP/2 channel,
                        // which enforces the call's deadline.
                        .service(channel);
                    table.instances.push(Instance {
                        address: Arc::from(target.address.as_str()),
                        in_flight: Arc::new(()),
                        breaker,
                        service,
                        target,
                    });
                }
                Err(status) => tracing::warn!(
                    service = %self.service, address = %target.address, error = %status.message(),
                    "ignoring an instance with a bad address"
                ),
            }
        }
    }

    /// Chooses the instance for one attempt of a call and marks it as tried.
    fn choose(
        &self,
        tried: Option<&TriedEndpoints>,
        none_admits: Option<&NoInstanceAdmits>,
    ) -> Result<Chosen, tonic::Status> {
        let mut table = self.lock();
        self.sync(&mut table, false);
        let live: Vec<&Instance> = table
            .instances
            .iter()
            .filter(|instance| instance.target.is_live())
            .collect();
        let no_instance =
            || tonic::Status::unavailable(format!("no instance of {} is available", self.service));
        let Some(first) = live.first() else {
            return Err(no_instance());
        };
        let admitting: Vec<&Instance> = live
            .iter()
            .copied()
            .filter(|instance| instance.breaker.admits_calls())
            .collect();
        if admitting.is_empty() {
            // Tells the retry layer that trying again is pointless.
            if let Some(none_admits) = none_admits {
                none_admits.set();
            }
            return Err(tonic::Status::unavailable(format!(
                "circuit open for {} at {}",
                self.service, first.address
            )));
        }
        // A retry goes elsewhere while elsewhere exists.
        let untried: Vec<&Instance> = admitting
            .iter()
            .copied()
            .filter(|instance| tried.is_none_or(|tried| !tried.contains(&instance.address)))
            .collect();
        let pool = if untried.is_empty() {
            admitting
        } else {
            untried
        };
        let chosen = power_of_two_choices(&pool, Instance::load).ok_or_else(no_instance)?;
        if let Some(tried) = tried {
            tried.insert(Arc::clone(&chosen.address));
        }
        Ok(Chosen {
            service: chosen.service.clone(),
            in_flight: Arc::clone(&chosen.in_flight),
        })
    }
}

/// One target per address, in the order addresses first appear: of the
/// entries sharing one, the serving ones win over the others, and among
/// those the most recently received. Which key sorts first (perhaps the
/// dead process's) does not matter.
fn merge_duplicates(targets: impl IntoIterator<Item = Target>) -> Vec<Target> {
    let rank = |target: &Target| (target.serving, target.received);
    let mut merged: Vec<Target> = Vec::new();
    for target in targets {
        match merged
            .iter_mut()
            .find(|known| known.address == target.address)
        {
            Some(known) if rank(&target) > rank(known) => *known = target,
            Some(_) => {}
            None => merged.push(target),
        }
    }
    merged
}

/// Of two distinct items picked at random, the one with the lower load
/// (ties go to either, as the pick order is random); `None` for no items.
fn power_of_two_choices<'a, T>(pool: &[&'a T], load: impl Fn(&T) -> usize) -> Option<&'a T> {
    match pool.len() {
        0 => None,
        1 => Some(pool[0]),
        len => {
            let mut rng = rand::thread_rng();
            let first = rng.gen_range(0..len);
            let mut second = rng.gen_range(0..len - 1);
            if second >= first {
                second += 1;
            }
            let (a, b) = (pool[first], pool[second]);
            Some(if load(b) < load(a) { b } else { a })
        }
    }
}

struct Chosen {
    service: Guarded<EndpointChannel>,
    in_flight: Arc<()>,
}

/// The balancing service: each call goes to the instance [`Balancer`]
/// chooses.
#[derive(Clone)]
pub struct Balance {
    balancer: Arc<Balancer>,
}

impl Balance {
    /// Balances over `balancer`'s instances.
    pub fn new(balancer: Arc<Balancer>) -> Self {
        Self { balancer }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Balance {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::Status;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // No instance is not "not ready": the call fails at once instead.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let tried = request.extensions().get::<TriedEndpoints>().cloned();
        let none_admits = request.extensions().get::<NoInstanceAdmits>().cloned();
        match self.balancer.choose(tried.as_ref(), none_admits.as_ref()) {
            Ok(Chosen {
                mut service,
                in_flight,
            }) => {
                let call = tower::Service::call(&mut service, request);
                Box::pin(async move {
                    // Counted until the response (or failure) arrives.
                    let _in_flight = in_flight;
                    call.await
                })
            }
            Err(status) => Box::pin(std::future::ready(Err(status))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_less_loaded_of_two_wins_and_every_instance_gets_picked() {
        let loads = [5_usize, 0, 5];
        let items: Vec<&usize> = loads.iter().collect();
        let mut picked = [0_u32; 3];
        for _ in 0..300 {
            let chosen = power_of_two_choices(&items, |load| *load).expect("an item");
            let index = loads
                .iter()
                .position(|load| std::ptr::eq(load, chosen))
                .expect("one of them");
            picked[index] += 1;
        }
        // Index 1 wins whenever it is one of the two (2 pairs in 3).
        assert!(picked[1] > 150, "{picked:?}");
        assert!(picked[0] > 10 && picked[2] > 10, "{picked:?}");
        let single = [&7_usize];
        assert_eq!(power_of_two_choices(&single, |load| *load), Some(&7));
        assert_eq!(power_of_two_choices::<usize>(&[], |load| *load), None);
    }

    #[test]
    fn keys_sharing_an_address_merge_into_the_latest_serving_entry() {
        let start = tokio::time::Instant::now();
        let at = |address: &str, serving: bool, secs: u64| Target {
            address: address.into(),
            serving,
            received: Some(start + std::time::Duration::from_secs(secs)),
        };
        let merged = merge_duplicates([
            at("http://a:1", true, 1),
            at("http://b:1", true, 1),
            at("http://a:1", true, 3),
            at("http://a:1", false, 5),
            at("http://a:1", true, 2),
        ]);
        assert_eq!(
            merged,
            [at("http://a:1", true, 3), at("http://b:1", true, 1)]
        );
        // None serving: the latest speaks.
        let merged = merge_duplicates([at("http://a:1", false, 2), at("http://a:1", false, 1)]);
        assert_eq!(merged, [at("http://a:1", false, 2)]);
    }
}
