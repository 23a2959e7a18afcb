//! The checkout saga's orchestrator: `PlaceOrder` and `CancelOrder` as a
//! durable distributed transaction across inventory and payments.
//!
//! `PlaceOrder` prices the items in the catalog, then creates the PENDING
//! order and its saga in one transaction (idempotent per user and request
//! id) and starts a task that drives the saga step by step (see
//! [`crate::saga`]). Each step is one idempotent call keyed by the saga id;
//! its outcome is persisted, with the order change it makes and the
//! step's history row, in one transaction ([`SagaStore::advance`]) before
//! the next step starts. The caller waits for the outcome up to a bound and
//! gets the order PENDING after it.
//!
//! The replica that drives a saga holds a lease on it, renewed before each
//! call. A replica that dies leaves its sagas' leases to run out; every
//! replica's [`Checkout::resume_expired`] (a worker) then takes them over and
//! drives them on, without the card number, which is never stored: a saga
//! resumed before its charge compensates with `CHECKOUT_INTERRUPTED`.
//!
//! Deadlines: each call has `checkout.step_timeout_ms` (the client stack
//! retries within it where safe); a checkout not charged by
//! `checkout.saga_timeout_ms` compensates (once paid, it completes).
//! Compensation and the final commit must happen, so they are retried until
//! they do, with backoff; the refund does not hold up the stock, which is
//! released while payments does not answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use agora_platform::auth::Caller;
use agora_platform::backoff::{exponential, jittered};
use agora_platform::card::CardNumber;
use agora_platform::config::{CheckoutConfig, Secret};
use agora_platform::error::{Error, ErrorKind, Result, Violations};
use agora_platform::money::Money;
use agora_platform::time::now_micros;
use agora_proto::catalog::v1 as catalog;
use agora_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use agora_proto::inventory::v1 as inventory;
use agora_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use agora_proto::payments::v1 as payments;
use agora_proto::payments::v1::payment_service_client::PaymentServiceClient;
use futures::StreamExt as _;
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::domain::{
    MAX_ITEMS, MAX_QUANTITY, NewOrder, Order, OrderItem, OrderStatus, check_identifier,
};
use crate::saga::{CallOutcome, SagaStep, payment_id, reason, reservation_id};
use crate::saga_store::{Advance, Saga, SagaStart, SagaStore};
use crate::store::{Failure, OrderStore, SqlOrderStore};

/// The channel the orders service reaches other services through.
pub type Channel = agora_platform_client::ServiceChannel;
pub use agora_platform_client::BreakerState;

/// Channels to the services the saga calls.
#[derive(Clone, Debug)]
pub struct Backends {
    /// Stock reservations.
    pub inventory: Channel,
    /// Charges and refunds.
    pub payments: Channel,
    /// Prices.
    pub catalog: Channel,
}

/// A validated `PlaceOrder`.
#[derive(Clone, Debug)]
pub struct PlaceOrder {
    /// The client's idempotency key.
    pub request_id: String,
    /// Products and quantities, as ordered.
    pub lines: Vec<(String, i64)>,
    /// Charged once, kept in memory only while the saga needs it.
    pub card_number: Secret<String>,
}

impl PlaceOrder {
    /// Validates a request, naming every bad field.
    pub fn parse(request: agora_proto::orders::v1::PlaceOrderRequest) -> Result<Self> {
        let mut violations = Violations::default();
        violations.check("request_id", check_identifier(&request.request_id));
        if request.items.is_empty() {
            violations.add("items", "must have at least one item");
        }
        if request.items.len() > MAX_ITEMS {
            violations.add("items", format!("must have at most {MAX_ITEMS} items"));
        } else {
            for (index, item) in request.items.iter().enumerate() {
                violations.check(
                    &format!("items[{index}].product_id"),
                    check_identifier(&item.product_id),
                );
                if !(1..=MAX_QUANTITY).contains(&item.quantity) {
                    violations.add(
                        format!("items[{index}].quantity"),
                        format!("must be between 1 and {MAX_QUANTITY}"),
                    );
                }
            }
        }
        // The same rule payments applies, checked before any order exists,
        // so that a mistyped number never uses up the request id.
        let card = request.card_number;
        violations.check("card_number", CardNumber::parse(&card));
        violations.finish()?;
        Ok(Self {
            request_id: request.request_id,
            lines: request
                .items
                .into_iter()
                .map(|item| (item.product_id, item.quantity))
                .collect(),
            card_number: Secret::new(card),
        })
    }
}

/// Saga timing, from [`CheckoutConfig`].
#[derive(Clone, Copy, Debug)]
struct Timing {
    step: Duration,
    saga: Duration,
    wait: Duration,
    lease: Duration,
}

/// Catalog lookups one PlaceOrder makes at once.
const PRICE_LOOKUPS_AT_ONCE: usize = 8;
/// Sagas one replica drives at once (new, cancelled and taken over): a
/// bound on the tasks and the calls an outage can pile up. Beyond it,
/// PlaceOrder is RESOURCE_EXHAUSTED and take-overs wait for the next scan.
const MAX_DRIVERS: usize = 1024;
/// Expired sagas claimed per scan.
const RESUME_BATCH: i64 = 64;
/// Longest pause between two attempts of a step that must happen.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);
/// How often a waiting `PlaceOrder` re-reads without a notice (another
/// replica may be driving the saga).
const WAIT_RECHECK: Duration = Duration::from_millis(250);

/// The orchestrator. Clones share everything.
#[derive(Clone)]
pub struct Checkout {
    inner: Arc<Inner>,
}

struct Inner {
    orders: SqlOrderStore,
    sagas: SagaStore,
    backends: Backends,
    timing: Timing,
    /// This replica's name in leases.
    owner: String,
    /// The progress of each saga this process started and drives, for its
    /// PlaceOrder to follow without reading the database.
    local: std::sync::Mutex<HashMap<String, watch::Receiver<Saga>>>,
    /// One permit per saga being driven here ([`MAX_DRIVERS`]).
    drivers: Arc<tokio::sync::Semaphore>,
    /// Chance of SIGKILLing this process at each step boundary; only the
    /// chaos test sets it (`AGORA_CHAOS_KILL_PROBABILITY`).
    chaos: f64,
}

impl std::fmt::Debug for Checkout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkout")
            .field("owner", &self.inner.owner)
            .finish_non_exhaustive()
    }
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

impl Checkout {
    /// The orchestrator over `orders`, calling `backends`.
    pub fn new(orders: SqlOrderStore, backends: Backends, config: &CheckoutConfig) -> Self {
        let chaos = std::env::var("AGORA_CHAOS_KILL_PROBABILITY")
            .ok()
            .and_then(|p| p.parse::<f64>().ok())
            .filter(|p| *p > 0.0)
            .unwrap_or(0.0);
        if chaos > 0.0 {
            tracing::warn!(
                probability = chaos,
                "chaos testing: this process kills itself at random saga step boundaries"
            );
        }
        let timing = Timing {
            step: Duration::from_millis(config.step_timeout_ms.max(1)),
            saga: Duration::from_millis(config.saga_timeout_ms.max(1)),
            wait: Duration::from_millis(config.place_order_wait_ms),
            // A lease shorter than a step would run out mid-call.
            lease: Duration::from_millis(
                config
                    .lease_ms
                    .max(config.step_timeout_ms.saturating_mul(2)),
            ),
        };
        Self {
            inner: Arc::new(Inner {
                sagas: SagaStore::new(orders.clone()),
                orders,
                backends,
                timing,
                owner: format!("orders-{}", uuid::Uuid::now_v7().simple()),
                drivers: Arc::new(tokio::sync::Semaphore::new(MAX_DRIVERS)),
                local: std::sync::Mutex::new(HashMap::new()),
                chaos,
            }),
        }
    }

    /// A permit to drive one more saga, or RESOURCE_EXHAUSTED.
    fn driver_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.inner.drivers)
            .try_acquire_owned()
            .map_err(|_| {
                Error::new(
                    ErrorKind::ResourceExhausted,
                    "too many checkouts in progress: try again in a moment",
                )
                .with_reason(reason::CHECKOUT_BUSY)
            })
    }

    /// How often the resumer should look for sagas to take over: a quarter
    /// of the lease in effect.
    pub fn resume_interval(&self) -> Duration {
        (self.inner.timing.lease / 4).max(Duration::from_millis(100))
    }

    /// The sagas this orchestrator keeps.
    pub fn sagas(&self) -> &SagaStore {
        &self.inner.sagas
    }

    /// The circuit breakers of the services it calls: `(service, endpoint,
    /// state)`.
    pub fn breaker_states(&self) -> Vec<(&'static str, String, BreakerState)> {
        let backends = &self.inner.backends;
        let mut states = Vec::new();
        for (service, channel) in [
            ("inventory", &backends.inventory),
            ("payments", &backends.payments),
            ("catalog", &backends.catalog),
        ] {
            states.extend(
                channel
                    .breaker_states()
                    .into_iter()
                    .map(|(endpoint, state)| (service, endpoint, state)),
            );
        }
        states
    }

    /// Places an order for `user_id`: creates it with its saga (or finds the
    /// one made with the same request id), drives the saga and waits for
    /// its outcome (see the module docs).
    pub async fn place(&self, user_id: &str, request: PlaceOrder) -> Result<Order> {
        let inner = &self.inner;
        if let Some(existing) = inner
            .orders
            .find_by_request(user_id, &request.request_id)
            .await?
        {
            return self.replay(existing, &request).await;
        }
        let (items, currency) = self.price(&request.lines).await?;
        let permit = self.driver_permit()?;
        let now = now_micros();
        let start = SagaStart {
            lease_owner: inner.owner.clone(),
            lease_until: now.saturating_add(micros(inner.timing.lease)),
            deadline_at: now.saturating_add(micros(inner.timing.saga)),
        };
        let new = NewOrder {
            user_id: user_id.to_owned(),
            request_id: request.request_id.clone(),
            items,
            currency,
        };
        let (order, created) = inner.orders.create_order(new, Some(&start)).await?;
        if !created {
            drop(permit);
            return self.replay(order, &request).await;
        }
        // The saga as just written with the order (same time, version 1).
        let saga = Saga {
            id: order.id.clone(),
            step: SagaStep::Reserving,
            failure: Failure::default(),
            version: 1,
            lease_owner: start.lease_owner,
            lease_until: start.lease_until,
            deadline_at: start.deadline_at,
            created_at: order.created_at,
            updated_at: order.created_at,
        };
        tracing::info!(order_id = %order.id, total = order.total.amount_minor, "checkout started");
        // Its own task: the saga goes on when the caller hangs up.
        let (progress, following) = watch::channel(saga.clone());
        self.inner
            .local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(order.id.clone(), following);
        let driver = self.clone();
        let card = request.card_number;
        let id = order.id.clone();
        tokio::spawn(
            async move {
                driver.drive(saga, Some(card), Some(progress)).await;
                driver
                    .inner
                    .local
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&id);
                drop(permit);
            }
            .instrument(tracing::info_span!("checkout saga", order_id = %order.id)),
        );
        self.outcome(&order.id).await
    }

    /// A `PlaceOrder` whose request id made `existing`: the same items get
    /// the same order (waiting for its saga like the first call), other
    /// items are ALREADY_EXISTS. The card is never charged again: only the
    /// saga that made the order charges, once.
    async fn replay(&self, existing: Order, request: &PlaceOrder) -> Result<Order> {
        // The same cart whatever the order of its lines (as inventory and
        // payments compare their retries).
        let same = cart(
            existing
                .items
                .iter()
                .map(|item| (item.product_id.as_str(), item.quantity)),
        ) == cart(
            request
                .lines
                .iter()
                .map(|(product, quantity)| (product.as_str(), *quantity)),
        );
        if !same {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "request_id {} was used for order {} with other items",
                    request.request_id, existing.id
                ),
            )
            .with_reason(reason::REQUEST_ID_REUSED)
            .with_metadata("order_id", existing.id));
        }
        self.outcome(&existing.id).await
    }

    /// Prices `lines` in the catalog: the order's items and its currency.
    async fn price(&self, lines: &[(String, i64)]) -> Result<(Vec<OrderItem>, String)> {
        let mut distinct: Vec<&str> = lines.iter().map(|(p, _)| p.as_str()).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let lookups: Vec<_> = distinct
            .iter()
            .map(|product_id| {
                let mut catalog = CatalogServiceClient::new(self.inner.backends.catalog.clone());
                let product_id = (*product_id).to_owned();
                let mut request = tonic::Request::new(catalog::GetProductRequest {
                    id: product_id.clone(),
                });
                request.set_timeout(self.inner.timing.step);
                async move { (product_id, catalog.get_product(request).await) }
            })
            .collect();
        // A few lookups at a time: an order of 100 products must not become
        // a burst of 100 concurrent calls on the catalog.
        let mut answers = futures::stream::iter(lookups).buffer_unordered(PRICE_LOOKUPS_AT_ONCE);
        let mut prices: HashMap<String, Money> = HashMap::new();
        // The first failure ends the pricing (dropping the lookups still
        // running): there is no order to make without every price.
        while let Some((product_id, answer)) = answers.next().await {
            let product = match answer {
                Ok(response) => response.into_inner().product,
                Err(status) if status.code() == tonic::Code::NotFound => None,
                Err(status) if status.code() == tonic::Code::InvalidArgument => {
                    return Err(unknown_product(&product_id));
                }
                Err(status) => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        "the catalog is unavailable: try again",
                    )
                    .with_reason(reason::CATALOG_UNAVAILABLE)
                    .with_source(status));
                }
            };
            let price = product
                .and_then(|p| p.price)
                .ok_or_else(|| unknown_product(&product_id))?;
            let price = Money::parse_positive(Some(&price)).map_err(|err| {
                Error::new(
                    ErrorKind::Internal,
                    format!("the catalog priced {product_id} badly: {err}"),
                )
            })?;
            prices.insert(product_id, price);
        }
        let mut items = Vec::with_capacity(lines.len());
        for (product_id, quantity) in lines {
            let unit_price = prices
                .get(product_id.as_str())
                .cloned()
                .ok_or_else(|| unknown_product(product_id))?;
            items.push(OrderItem {
                product_id: product_id.clone(),
                quantity: *quantity,
                unit_price,
            });
        }
        let currency = items
            .first()
            .map(|item| item.unit_price.currency_code.clone())
            .unwrap_or_default();
        if items
            .iter()
            .any(|item| item.unit_price.currency_code != currency)
        {
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                "the products are priced in different currencies: order them separately",
            )
            .with_reason(reason::MIXED_CURRENCIES));
        }
        Ok((items, currency))
    }

    /// Waits for the saga of order `id` to finish, up to the configured
    /// wait (and the caller's deadline), and answers as PlaceOrder does: the
    /// COMPLETED order once its stock is committed, the failure as an error
    /// with its reason as soon as the saga decided to fail (compensation goes
    /// on in the background), or the order PENDING when the wait ends first.
    async fn outcome(&self, id: &str) -> Result<Order> {
        match self.local_progress(id) {
            Some(progress) => self.outcome_from(id, progress).await,
            None => self.outcome_polled(id).await,
        }
    }

    /// [`Self::outcome`] of a saga driven elsewhere: follows the database.
    async fn outcome_polled(&self, id: &str) -> Result<Order> {
        self.wait_for(id, |saga, order| match saga.map(verdict) {
            Some(Verdict::Failed(failure)) => Some(Err(checkout_failed(&order.id, &failure))),
            Some(Verdict::Running) => None,
            _ if order.status == OrderStatus::Failed => Some(Err(checkout_failed(
                &order.id,
                &Failure::new(&order.failure_code, &order.failure_reason),
            ))),
            _ if order.status.is_terminal() => Some(Ok(order.clone())),
            _ => None,
        })
        .await
    }

    /// [`Self::outcome`] of a saga driven in this process: follows its
    /// progress in memory, and reads the database once, at the end.
    async fn outcome_from(&self, id: &str, mut progress: watch::Receiver<Saga>) -> Result<Order> {
        let until = self.wait_until();
        loop {
            let saga = progress.borrow_and_update().clone();
            match verdict(&saga) {
                Verdict::Failed(failure) => return Err(checkout_failed(id, &failure)),
                Verdict::Settled => break,
                Verdict::Running => {}
            }
            tokio::select! {
                changed = progress.changed() => {
                    // The driver stopped here (taken over, or its task
                    // ended): follow the saga in the database.
                    if changed.is_err() {
                        return self.outcome_polled(id).await;
                    }
                }
                () = tokio::time::sleep_until(until) => break,
            }
        }
        self.outcome_stored(id).await
    }

    /// The order as stored, answered as PlaceOrder does once its saga is
    /// settled (or the wait is over).
    async fn outcome_stored(&self, id: &str) -> Result<Order> {
        let saga = self.inner.sagas.get(id).await?;
        let order = self
            .inner
            .orders
            .get(id)
            .await?
            .ok_or_else(|| Error::not_found(format_args!("order {id}")))?;
        match saga.as_ref().map(verdict) {
            Some(Verdict::Failed(failure)) => Err(checkout_failed(id, &failure)),
            _ if order.status == OrderStatus::Failed => Err(checkout_failed(
                id,
                &Failure::new(&order.failure_code, &order.failure_reason),
            )),
            _ => Ok(order),
        }
    }

    /// The progress of saga `id`, when this process drives it.
    fn local_progress(&self, id: &str) -> Option<watch::Receiver<Saga>> {
        self.inner
            .local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// When a wait for a saga ends: after the configured wait, or a little
    /// before the caller's deadline, to answer with what is known.
    fn wait_until(&self) -> tokio::time::Instant {
        let wait = self.inner.timing.wait;
        let wait = match agora_platform::deadline::remaining() {
            Some(left) => wait.min(left.saturating_sub(Duration::from_millis(50))),
            None => wait,
        };
        tokio::time::Instant::now() + wait
    }

    /// Re-reads order `id` and its saga whenever they change (and every
    /// [`WAIT_RECHECK`], for changes made by another replica) until `decide`
    /// answers, or returns the order as it is when the configured wait, or
    /// the caller's deadline (less a margin to answer in), runs out.
    async fn wait_for<F>(&self, id: &str, decide: F) -> Result<Order>
    where
        F: Fn(Option<&Saga>, &Order) -> Option<Result<Order>>,
    {
        use tokio::sync::broadcast::error::RecvError;
        let inner = &self.inner;
        let until = self.wait_until();
        // Subscribed before the first read, so no change is missed.
        let mut notices = inner.orders.changes().subscribe();
        loop {
            let saga = inner.sagas.get(id).await?;
            let order = inner
                .orders
                .get(id)
                .await?
                .ok_or_else(|| Error::not_found(format_args!("order {id}")))?;
            if let Some(answer) = decide(saga.as_ref(), &order) {
                return answer;
            }
            let notice = async {
                loop {
                    match notices.recv().await {
                        Ok(changed) if &*changed == id => return,
                        Ok(_) => {}
                        Err(RecvError::Lagged(_)) => return,
                        // No notices any more: the recheck still runs.
                        Err(RecvError::Closed) => std::future::pending::<()>().await,
                    }
                }
            };
            tokio::select! {
                () = notice => {}
                () = tokio::time::sleep(WAIT_RECHECK) => {}
                () = tokio::time::sleep_until(until) => return Ok(order),
            }
        }
    }

    /// Cancels a COMPLETED order of `caller`'s: refund, restock, CANCELLED.
    pub async fn cancel(&self, caller: &Caller, id: &str) -> Result<Order> {
        let inner = &self.inner;
        let order = inner
            .orders
            .get(id)
            .await?
            .filter(|order| caller.is_user(&order.user_id))
            .ok_or_else(|| Error::not_found(format_args!("order {id}")))?;
        let saga = inner.sagas.get(id).await?;
        match (order.status, saga) {
            (OrderStatus::Cancelled, _) => Ok(order),
            (OrderStatus::Completed, Some(saga)) if saga.step == SagaStep::Completed => {
                let permit = self.driver_permit()?;
                let now = now_micros();
                let mine = Saga {
                    lease_owner: inner.owner.clone(),
                    ..saga.clone()
                };
                let advance = Advance {
                    to: SagaStep::CancelRefunding,
                    outcome: "ok".to_owned(),
                    detail: "cancelled by the customer".to_owned(),
                    failure: Some(Failure::new(
                        reason::CANCELLED_BY_CUSTOMER,
                        "cancelled by the customer",
                    )),
                    order: None,
                };
                let lease_until = now.saturating_add(micros(inner.timing.lease));
                if let Some(cancelling) = inner.sagas.advance(&mine, &advance, lease_until).await? {
                    let driver = self.clone();
                    tokio::spawn(
                        async move {
                            driver.drive(cancelling, None, None).await;
                            drop(permit);
                        }
                        .instrument(tracing::info_span!("cancel saga", order_id = %id)),
                    );
                }
                self.settled(id).await
            }
            // Being cancelled already (another call started it).
            (OrderStatus::Completed, Some(saga)) if saga.step.is_cancelling() => {
                self.settled(id).await
            }
            // Paid and confirmed, but the stock is still being committed.
            (OrderStatus::Completed, _) => Err(Error::new(
                ErrorKind::Conflict,
                format!("order {id} is still being completed: cancel it again in a moment"),
            )),
            (status, _) => Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!("order {id} is {status}: only a completed order can be cancelled"),
            )),
        }
    }

    /// Waits (up to the configured wait) for a cancellation of order `id` to
    /// finish and returns the order as it is then.
    async fn settled(&self, id: &str) -> Result<Order> {
        self.wait_for(id, |_, order| {
            (order.status == OrderStatus::Cancelled).then(|| Ok(order.clone()))
        })
        .await
    }

    /// Takes over running sagas whose lease ran out (their replica died or
    /// stalled) and drives them on in the background. Returns how many it
    /// took.
    pub async fn resume_expired(&self) -> Result<usize> {
        let inner = &self.inner;
        let now = now_micros();
        let mut taken = 0;
        for saga in inner.sagas.expired(now, RESUME_BATCH).await? {
            let Ok(permit) = Arc::clone(&inner.drivers).try_acquire_owned() else {
                break;
            };
            let lease_until = now.saturating_add(micros(inner.timing.lease));
            let Some(claimed) = inner
                .sagas
                .claim_if(&saga, &inner.owner, lease_until, now)
                .await?
            else {
                continue;
            };
            tracing::info!(order_id = %claimed.id, step = %claimed.step, "resuming checkout saga");
            taken += 1;
            let driver = self.clone();
            let span = tracing::info_span!("resumed saga", order_id = %claimed.id);
            tokio::spawn(
                async move {
                    driver.drive(claimed, None, None).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
        Ok(taken)
    }

    /// Drives `saga` until it is terminal or another replica takes it over.
    /// `card` is known only to the replica that started the checkout;
    /// `progress`, when given, gets every new state of the saga.
    async fn drive(
        &self,
        mut saga: Saga,
        card: Option<Secret<String>>,
        progress: Option<watch::Sender<Saga>>,
    ) {
        let inner = &self.inner;
        let mut attempt: u32 = 0;
        // Read again on a passing error rather than give up: giving up would
        // lose the card, and with it the checkout.
        let order = loop {
            match inner.orders.get(&saga.id).await {
                Ok(Some(order)) => break order,
                Ok(None) => {
                    tracing::error!(order_id = %saga.id, "a saga without its order");
                    return;
                }
                Err(err) => {
                    tracing::warn!(order_id = %saga.id, error = %err, "cannot read the order of a saga");
                    attempt = attempt.saturating_add(1);
                    tokio::time::sleep(retry_pause(attempt)).await;
                    match self.keep_lease(&saga).await {
                        Ok(Some(renewed)) => saga = renewed,
                        // Taken over: the replica that holds it goes on.
                        Ok(None) => return,
                        // The database is still away: keep trying.
                        Err(_) => {}
                    }
                }
            }
        };
        attempt = 0;
        let mut released_early = false;
        while !saga.step.is_terminal() {
            match self.keep_lease(&saga).await {
                Ok(Some(renewed)) => saga = renewed,
                Ok(None) => return,
                Err(err) => {
                    tracing::warn!(order_id = %saga.id, error = %err, "cannot renew the saga lease");
                    attempt = attempt.saturating_add(1);
                    tokio::time::sleep(retry_pause(attempt)).await;
                    continue;
                }
            }
            self.chaos_point();
            let started = tokio::time::Instant::now();
            let step = saga.step;
            let next = self.run_step(&saga, &order, card.as_ref()).await;
            self.chaos_point();
            let advance = match next {
                Ok(advance) => advance,
                Err(detail) => {
                    if step == SagaStep::Refunding && !released_early {
                        // Payments does not answer, perhaps for long: the
                        // stock need not wait for it. Once per driver, on a
                        // renewed lease; RELEASING releases again (a no-op)
                        // once the refund is through.
                        match self.keep_lease(&saga).await {
                            Ok(Some(renewed)) => saga = renewed,
                            Ok(None) => return,
                            Err(_) => {}
                        }
                        released_early = matches!(
                            self.release(&order).await,
                            CallOutcome::Done | CallOutcome::Refused { .. }
                        );
                    }
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(
                        order_id = %saga.id, step = %step, attempt, error = %detail,
                        "saga step failed, retrying"
                    );
                    tokio::time::sleep(retry_pause(attempt)).await;
                    continue;
                }
            };
            let lease_until = now_micros().saturating_add(micros(inner.timing.lease));
            match inner.sagas.advance(&saga, &advance, lease_until).await {
                Ok(Some(next)) => {
                    attempt = 0;
                    tracing::info!(
                        order_id = %saga.id, from = %step, to = %next.step,
                        outcome = %advance.outcome,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "saga step done"
                    );
                    if let Some(progress) = &progress {
                        progress.send_replace(next.clone());
                    }
                    saga = next;
                }
                Ok(None) => {
                    tracing::info!(order_id = %saga.id, "saga taken over by another replica");
                    return;
                }
                Err(err) => {
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(order_id = %saga.id, error = %err, "cannot record a saga step");
                    tokio::time::sleep(retry_pause(attempt)).await;
                    // Re-read: the step may have been recorded after all.
                    match inner.sagas.get(&saga.id).await {
                        Ok(Some(fresh)) if fresh.lease_owner == inner.owner => saga = fresh,
                        Ok(_) => return,
                        Err(_) => {}
                    }
                }
            }
        }
    }

    /// Renews the lease when less than a step and a margin is left, so it
    /// cannot run out during the next call. `None` when the saga was taken.
    async fn keep_lease(&self, saga: &Saga) -> Result<Option<Saga>> {
        let timing = self.inner.timing;
        let now = now_micros();
        let needed = micros(timing.step).saturating_add(micros(timing.lease) / 4);
        if saga.lease_until.saturating_sub(now) > needed {
            return Ok(Some(saga.clone()));
        }
        self.inner
            .sagas
            .renew(saga, now.saturating_add(micros(timing.lease)))
            .await
    }

    /// Runs the saga's current step once: the move it leads to, or why it
    /// must be tried again.
    async fn run_step(
        &self,
        saga: &Saga,
        order: &Order,
        card: Option<&Secret<String>>,
    ) -> std::result::Result<Advance, String> {
        let past_deadline = now_micros() > saga.deadline_at;
        let timeout = Failure::new(
            reason::CHECKOUT_TIMEOUT,
            "the checkout took too long and was undone",
        );
        let interrupted = Failure::new(
            reason::CHECKOUT_INTERRUPTED,
            "the checkout was interrupted before payment: please order again",
        );
        Ok(match saga.step {
            // Taken over before the charge: without the card (never stored)
            // it cannot go on, so nothing more is reserved or charged.
            SagaStep::Reserving if card.is_none() => compensate(SagaStep::Releasing, interrupted),
            SagaStep::Reserving if past_deadline => compensate(SagaStep::Releasing, timeout),
            SagaStep::Reserving => match self.reserve(order).await {
                CallOutcome::Done => forward(SagaStep::Charging),
                CallOutcome::Refused { code, message } => {
                    compensate(SagaStep::Releasing, Failure::new(code, message))
                }
                CallOutcome::Unknown { message } => Advance {
                    detail: message,
                    ..compensate(
                        SagaStep::Releasing,
                        Failure::new(reason::INVENTORY_UNAVAILABLE, "inventory is unavailable"),
                    )
                },
            },
            // A charge may have been sent before the interruption: the
            // refund voids it (or refunds it) before the stock goes back.
            SagaStep::Charging if card.is_none() => compensate(SagaStep::Refunding, interrupted),
            SagaStep::Charging if past_deadline => compensate(SagaStep::Refunding, timeout),
            SagaStep::Charging => match card {
                None => compensate(SagaStep::Refunding, interrupted),
                Some(card) => match self.charge(order, card).await {
                    CallOutcome::Done => forward(SagaStep::Confirming),
                    // Refused: nothing was charged, only stock to release.
                    CallOutcome::Refused { code, message } => {
                        compensate(SagaStep::Releasing, Failure::new(code, message))
                    }
                    CallOutcome::Unknown { message } => Advance {
                        detail: message,
                        ..compensate(
                            SagaStep::Refunding,
                            Failure::new(reason::PAYMENT_UNAVAILABLE, "payments is unavailable"),
                        )
                    },
                },
            },
            // Paid and reserved: confirming is local, so the deadline (which
            // guards the calls before the charge) no longer applies.
            SagaStep::Confirming => Advance {
                order: Some(OrderStatus::Completed),
                ..forward(SagaStep::Committing)
            },
            SagaStep::Committing => match self.commit(order).await {
                CallOutcome::Done => forward(SagaStep::Completed),
                // The reservation expired and its stock is gone: the
                // order cannot be delivered, so it is refunded and cancelled.
                CallOutcome::Refused { code, message } => {
                    compensate(SagaStep::CancelRefunding, Failure::new(code, message))
                }
                CallOutcome::Unknown { message } => return Err(message),
            },
            SagaStep::Refunding | SagaStep::CancelRefunding => match self.refund(order).await {
                // Refused: there is nothing to refund.
                CallOutcome::Done | CallOutcome::Refused { .. } => forward(match saga.step {
                    SagaStep::Refunding => SagaStep::Releasing,
                    _ => SagaStep::CancelRestocking,
                }),
                CallOutcome::Unknown { message } => return Err(message),
            },
            SagaStep::Releasing | SagaStep::CancelRestocking => match self.release(order).await {
                CallOutcome::Done | CallOutcome::Refused { .. } => {
                    let (to, status) = match saga.step {
                        SagaStep::Releasing => (SagaStep::Failed, OrderStatus::Failed),
                        _ => (SagaStep::Cancelled, OrderStatus::Cancelled),
                    };
                    Advance {
                        order: Some(status),
                        ..forward(to)
                    }
                }
                CallOutcome::Unknown { message } => return Err(message),
            },
            SagaStep::Completed | SagaStep::Failed | SagaStep::Cancelled => {
                return Err(format!("saga {} is already {}", saga.id, saga.step));
            }
        })
    }

    async fn reserve(&self, order: &Order) -> CallOutcome {
        let mut client = InventoryServiceClient::new(self.inner.backends.inventory.clone());
        let request = self.call(inventory::ReserveStockRequest {
            reservation_id: reservation_id(&order.id),
            items: order
                .items
                .iter()
                .map(|item| inventory::ReservationItem {
                    product_id: item.product_id.clone(),
                    quantity: item.quantity,
                })
                .collect(),
        });
        outcome_of(
            client.reserve_stock(request).await,
            reason::INSUFFICIENT_STOCK,
        )
    }

    async fn charge(&self, order: &Order, card: &Secret<String>) -> CallOutcome {
        let mut client = PaymentServiceClient::new(self.inner.backends.payments.clone());
        let request = self.call(payments::ChargeRequest {
            payment_id: payment_id(&order.id),
            user_id: order.user_id.clone(),
            amount: Some(order.total.to_proto()),
            card_number: card.expose().clone(),
        });
        match client.charge(request).await {
            // Only a captured payment pays; an OK answer for a payment in
            // another state (refunded, voided) is not a charge.
            Ok(response)
                if response.get_ref().payment.as_ref().map(|p| p.status())
                    != Some(payments::PaymentStatus::Succeeded) =>
            {
                CallOutcome::Refused {
                    code: reason::PAYMENT_VOIDED.to_owned(),
                    message: "the payment was cancelled before it was charged".to_owned(),
                }
            }
            Err(status) if status.code() == tonic::Code::InvalidArgument => CallOutcome::Refused {
                code: reason::INVALID_CARD.to_owned(),
                message: status.message().to_owned(),
            },
            answer => outcome_of(answer, reason::CARD_DECLINED),
        }
    }

    async fn commit(&self, order: &Order) -> CallOutcome {
        let mut client = InventoryServiceClient::new(self.inner.backends.inventory.clone());
        let request = self.call(inventory::CommitReservationRequest {
            reservation_id: reservation_id(&order.id),
        });
        outcome_of(
            client.commit_reservation(request).await,
            reason::RESERVATION_EXPIRED,
        )
    }

    async fn refund(&self, order: &Order) -> CallOutcome {
        let mut client = PaymentServiceClient::new(self.inner.backends.payments.clone());
        let request = self.call(payments::RefundRequest {
            payment_id: payment_id(&order.id),
        });
        outcome_of(client.refund(request).await, "")
    }

    async fn release(&self, order: &Order) -> CallOutcome {
        let mut client = InventoryServiceClient::new(self.inner.backends.inventory.clone());
        let request = self.call(inventory::ReleaseReservationRequest {
            reservation_id: reservation_id(&order.id),
        });
        outcome_of(client.release_reservation(request).await, "")
    }

    /// A request with the step deadline.
    fn call<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.inner.timing.step);
        request
    }

    /// With the chaos test's probability, SIGKILLs this process right here
    /// (between two steps, or between a call and its record).
    fn chaos_point(&self) {
        if self.inner.chaos > 0.0 && rand::random::<f64>() < self.inner.chaos {
            tracing::warn!("chaos: killing this process");
            let _ = std::process::Command::new("kill")
                .args(["-9", &std::process::id().to_string()])
                .status();
            // `kill` returns once the signal is sent; never go on.
            std::process::abort();
        }
    }
}

/// What a saga's state says about its checkout.
enum Verdict {
    /// The checkout failed (compensation may still run), or a paid order
    /// was cancelled because its reservation had expired.
    Failed(Failure),
    /// Done: completed, failed before this was asked, or cancelled.
    Settled,
    /// Still going.
    Running,
}

fn verdict(saga: &Saga) -> Verdict {
    // Cancelled for any reason but its customer's (an expired reservation
    // whose stock was gone): the checkout failed after the charge.
    let failed = !saga.failure.code.is_empty()
        && (saga.step.is_compensating()
            || (saga.step.is_cancelling() && saga.failure.code != reason::CANCELLED_BY_CUSTOMER));
    if failed {
        Verdict::Failed(saga.failure.clone())
    } else if saga.step.is_terminal() {
        Verdict::Settled
    } else {
        Verdict::Running
    }
}

fn forward(to: SagaStep) -> Advance {
    Advance {
        to,
        outcome: "ok".to_owned(),
        detail: String::new(),
        failure: None,
        order: None,
    }
}

fn compensate(to: SagaStep, failure: Failure) -> Advance {
    Advance {
        to,
        outcome: failure.code.clone(),
        detail: failure.message.clone(),
        failure: Some(failure),
        order: None,
    }
}

fn outcome_of<T>(answer: std::result::Result<T, tonic::Status>, refused: &str) -> CallOutcome {
    match answer {
        Ok(_) => CallOutcome::Done,
        Err(status) => CallOutcome::from_status(&status, refused),
    }
}

/// Jittered exponential pause before attempt `attempt` (1-based) of a step
/// that must happen: between half and all of 200 ms, 400 ms ... up to
/// [`MAX_RETRY_PAUSE`].
fn retry_pause(attempt: u32) -> Duration {
    jittered(exponential(
        attempt,
        Duration::from_millis(100),
        MAX_RETRY_PAUSE,
    ))
}

/// Lines merged per product, in product order.
fn cart<'a>(
    lines: impl Iterator<Item = (&'a str, i64)>,
) -> std::collections::BTreeMap<&'a str, i64> {
    let mut merged = std::collections::BTreeMap::new();
    for (product, quantity) in lines {
        *merged.entry(product).or_default() += quantity;
    }
    merged
}

fn unknown_product(product_id: &str) -> Error {
    Error::new(
        ErrorKind::FailedPrecondition,
        format!("product {product_id} does not exist"),
    )
    .with_reason(reason::UNKNOWN_PRODUCT)
    .with_metadata("product_id", product_id)
}

/// The error a failed checkout answers with: the kind its reason calls for,
/// the reason, and the order's id.
fn checkout_failed(order_id: &str, failure: &Failure) -> Error {
    let kind = match failure.code.as_str() {
        reason::INVALID_CARD => ErrorKind::InvalidArgument,
        reason::PAYMENT_UNAVAILABLE | reason::INVENTORY_UNAVAILABLE | reason::CHECKOUT_TIMEOUT => {
            ErrorKind::Unavailable
        }
        // Placing the order again (with a new request id) may well work.
        reason::CHECKOUT_INTERRUPTED => ErrorKind::Conflict,
        // Declined, out of stock, unknown product, and reasons other
        // services add later: the order cannot go through as it is.
        _ => ErrorKind::FailedPrecondition,
    };
    let message = if failure.message.is_empty() {
        "the checkout failed".to_owned()
    } else {
        failure.message.clone()
    };
    let code = if failure.code.is_empty() {
        "CHECKOUT_FAILED".to_owned()
    } else {
        failure.code.clone()
    };
    Error::new(kind, message)
        .with_reason(code)
        .with_metadata("order_id", order_id)
}
