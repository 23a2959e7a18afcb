//! A circuit breaker per instance: one that keeps failing is left alone for
//! a while instead of making every caller wait for it.
//!
//! CLOSED counts consecutive failures; at `clients.breaker_failure_threshold`
//! it turns OPEN, and calls fail at once with UNAVAILABLE (`circuit open for
//! <service> at <address>`) without touching the network. After
//! `clients.breaker_recovery_ms` it is HALF_OPEN: one probe call goes
//! through; its success closes the breaker, its failure opens it again. Only
//! failures saying the instance does not work count (UNAVAILABLE,
//! DEADLINE_EXCEEDED, no connection): FAILED_PRECONDITION, INVALID_ARGUMENT
//! and the like are answers, which only a working instance gives. Running
//! out of time counts only for a call that had the full configured budget
//! ([`crate::call::CallDeadline::full_budget`]): the deadline may come from
//! the caller or from the request it serves, and a caller with 1 ms left
//! must not be able to cut an instance off for everybody.
//!
//! Every change of state is logged and exported as the OpenTelemetry gauge
//! `agora.client.circuit_breaker.state` (0 closed, 1 open, 2 half-open) with
//! the attributes `service` and `endpoint`.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;

use crate::call::{CallDeadline, outcome_code};
use crate::{CallService, ResponseFuture};

/// Where a breaker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; consecutive failures are counted.
    Closed,
    /// Calls fail at once until the recovery time has passed.
    Open,
    /// One probe call may go through to decide between the other two.
    HalfOpen,
}

impl BreakerState {
    /// The value of the state gauge: 0 closed, 1 open, 2 half-open.
    pub fn gauge_value(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }

    /// `closed`, `open` or `half-open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When a breaker opens and how long it stays open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that open the breaker (at least 1).
    pub failure_threshold: u32,
    /// How long it stays open before letting a probe through.
    pub recovery: Duration,
}

/// How a call through the breaker went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The instance answered (whatever the answer).
    Success,
    /// The instance did not answer properly: UNAVAILABLE, DEADLINE_EXCEEDED
    /// within the full budget, no connection.
    Failure,
    /// The call ran out of a budget shorter than the configured one: too
    /// little time says nothing about the instance. It counts for nothing,
    /// and a probe's turn passes to the next call.
    Inconclusive,
}

impl Outcome {
    /// The outcome of a call that ended with `code` (`None`: the response
    /// started normally, its status is still to come), sent with the full
    /// configured budget or not.
    pub fn of(code: Option<Code>, full_budget: bool) -> Self {
        match code {
            Some(Code::Unavailable) => Self::Failure,
            Some(Code::DeadlineExceeded) if full_budget => Self::Failure,
            Some(Code::DeadlineExceeded) => Self::Inconclusive,
            _ => Self::Success,
        }
    }
}

/// The breaker of one instance of one service.
pub struct CircuitBreaker {
    service: Arc<str>,
    endpoint: Arc<str>,
    settings: BreakerSettings,
    machine: Mutex<Machine>,
}

struct Machine {
    state: BreakerState,
    consecutive_failures: u32,
    /// When the breaker last opened (meaningful while open).
    opened_at: Instant,
    /// Half-open only: the one probe is out.
    probe_in_flight: bool,
    /// Bumped at every change of state, so that a call that started in an
    /// earlier state cannot decide the current one.
    epoch: u64,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("service", &self.service)
            .field("endpoint", &self.endpoint)
            .field("state", &self.state())
            .finish()
    }
}

impl CircuitBreaker {
    /// A closed breaker for instance `endpoint` of `service`, exported on
    /// the state gauge for as long as it lives.
    pub fn new(service: &str, endpoint: &str, settings: BreakerSettings) -> Arc<Self> {
        let breaker = Arc::new(Self {
            service: Arc::from(service),
            endpoint: Arc::from(endpoint),
            settings: BreakerSettings {
                failure_threshold: settings.failure_threshold.max(1),
                ..settings
            },
            machine: Mutex::new(Machine {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                opened_at: Instant::now(),
                probe_in_flight: false,
                epoch: 0,
            }),
        });
        gauge::watch(&breaker);
        breaker
    }

    /// The instance's address.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The current state (an open breaker whose recovery time has passed is
    /// half-open).
    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// Whether a call would be let through now.
    pub fn admits_calls(&self) -> bool {
        let machine = self.lock();
        match machine.state {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => !machine.probe_in_flight,
        }
    }

    /// Lets a call through, or not (open, or half-open with its probe out).
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut machine = self.lock();
        let probe = match machine.state {
            BreakerState::Closed => false,
            BreakerState::Open => return None,
            BreakerState::HalfOpen if machine.probe_in_flight => return None,
            BreakerState::HalfOpen => {
                machine.probe_in_flight = true;
                true
            }
        };
        Some(Permit {
            breaker: Arc::clone(self),
            epoch: machine.epoch,
            probe,
            settled: false,
        })
    }

    /// The machine, with a due OPEN -> HALF_OPEN change applied.
    fn lock(&self) -> MutexGuard<'_, Machine> {
        let mut machine = self.machine.lock().unwrap_or_else(PoisonError::into_inner);
        if machine.state == BreakerState::Open
            && machine.opened_at.elapsed() >= self.settings.recovery
        {
            self.change(&mut machine, BreakerState::HalfOpen);
        }
        machine
    }

    fn settle(&self, epoch: u64, probe: bool, outcome: Option<Outcome>) {
        let mut machine = self.lock();
        if machine.epoch != epoch {
            // Started under an earlier state: its news is stale.
            return;
        }
        match (machine.state, outcome) {
            (BreakerState::Closed, Some(Outcome::Success)) => machine.consecutive_failures = 0,
            (BreakerState::Closed, Some(Outcome::Failure)) => {
                machine.consecutive_failures += 1;
                if machine.consecutive_failures >= self.settings.failure_threshold {
                    self.change(&mut machine, BreakerState::Open);
                }
            }
            (BreakerState::HalfOpen, Some(Outcome::Success)) if probe => {
                self.change(&mut machine, BreakerState::Closed);
            }
            (BreakerState::HalfOpen, Some(Outcome::Failure)) if probe => {
                self.change(&mut machine, BreakerState::Open);
            }
            // The probe was abandoned (its caller went away) or proved
            // nothing (its caller's budget was short): the next call probes
            // instead.
            (BreakerState::HalfOpen, None | Some(Outcome::Inconclusive)) if probe => {
                machine.probe_in_flight = false;
            }
            _ => {}
        }
    }

    fn change(&self, machine: &mut Machine, to: BreakerState) {
        let from = machine.state;
        machine.state = to;
        machine.epoch += 1;
        machine.probe_in_flight = false;
        machine.consecutive_failures = 0;
        if to == BreakerState::Open {
            machine.opened_at = Instant::now();
        }
        let (service, endpoint) = (&*self.service, &*self.endpoint);
        match to {
            BreakerState::Open => tracing::warn!(
                service, endpoint, %from, %to,
                recovery_ms = self.settings.recovery.as_millis(),
                "circuit breaker opened: calls to this instance fail fast"
            ),
            BreakerState::HalfOpen => tracing::info!(
                service, endpoint, %from, %to, "circuit breaker half-open: one probe call may pass"
            ),
            BreakerState::Closed => tracing::info!(
                service, endpoint, %from, %to, "circuit breaker closed: instance answers again"
            ),
        }
    }
}

/// A call let through by a breaker; report how it went with
/// [`Permit::settle`]. Dropped unsettled (the caller went away), it counts
/// for nothing, and a probe's turn passes to the next call.
#[must_use = "a permit reports how the call went"]
pub struct Permit {
    breaker: Arc<CircuitBreaker>,
    epoch: u64,
    probe: bool,
    settled: bool,
}

impl Permit {
    /// Reports the call's outcome to the breaker.
    pub fn settle(mut self, outcome: Outcome) {
        self.settled = true;
        self.breaker.settle(self.epoch, self.probe, Some(outcome));
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.settle(self.epoch, self.probe, None);
        }
    }
}

/// An instance's channel behind its breaker.
#[derive(Clone)]
pub struct Guarded<S> {
    breaker: Arc<CircuitBreaker>,
    inner: S,
}

impl<S> Guarded<S> {
    /// `inner` behind `breaker`.
    pub fn new(breaker: Arc<CircuitBreaker>, inner: S) -> Self {
        Self { breaker, inner }
    }

    /// The breaker.
    pub fn breaker(&self) -> &Arc<CircuitBreaker> {
        &self.breaker
    }
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for Guarded<S>
where
    S: CallService,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::Status;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // An open breaker is not "not ready": it answers at once.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let Some(permit) = self.breaker.try_acquire() else {
            let status = tonic::Status::unavailable(format!(
                "circuit open for {} at {}",
                self.breaker.service, self.breaker.endpoint
            ));
            return Box::pin(std::future::ready(Err(status)));
        };
        // A call sent without a deadline of ours can only time out by the
        // callee's doing: that counts.
        let full_budget = request
            .extensions()
            .get::<CallDeadline>()
            .is_none_or(|deadline| deadline.full_budget);
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            permit.settle(Outcome::of(outcome_code(&result), full_budget));
            result
        })
    }
}

/// The state gauge: one observable instrument for the process, reading
/// every live breaker when metrics are collected.
mod gauge {
    use super::*;

    static BREAKERS: Mutex<Vec<Weak<CircuitBreaker>>> = Mutex::new(Vec::new());
    static GAUGE: OnceLock<opentelemetry::metrics::ObservableGauge<i64>> = OnceLock::new();

    pub(super) fn watch(breaker: &Arc<CircuitBreaker>) {
        {
            let mut breakers = BREAKERS.lock().unwrap_or_else(PoisonError::into_inner);
            breakers.retain(|weak| weak.strong_count() > 0);
            breakers.push(Arc::downgrade(breaker));
        }
        // Registered with the first breaker, once telemetry is set up (the
        // global meter provider must exist by then to export anything).
        GAUGE.get_or_init(|| {
            opentelemetry::global::meter("agora.client")
                .i64_observable_gauge("agora.client.circuit_breaker.state")
                .with_description(
                    "circuit breaker of one instance of a called service: 0 closed, 1 open, 2 half-open",
                )
                .with_callback(|observer| {
                    let breakers: Vec<Arc<CircuitBreaker>> = BREAKERS
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .iter()
                        .filter_map(Weak::upgrade)
                        .collect();
                    for breaker in breakers {
                        observer.observe(
                            breaker.state().gauge_value(),
                            &[
                                opentelemetry::KeyValue::new(
                                    "service",
                                    breaker.service.to_string(),
                                ),
                                opentelemetry::KeyValue::new(
                                    "endpoint",
                                    breaker.endpoint.to_string(),
                                ),
                            ],
                        );
                    }
                })
                .build()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32) -> Arc<CircuitBreaker> {
        CircuitBreaker::new(
            "payments",
            "http://127.0.0.1:1",
            BreakerSettings {
                failure_threshold: threshold,
                recovery: Duration::from_secs(5),
            },
        )
    }

    fn call(breaker: &Arc<CircuitBreaker>, outcome: Outcome) -> bool {
        match breaker.try_acquire() {
            Some(permit) => {
                permit.settle(outcome);
                true
            }
            None => false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_only() {
        let breaker = breaker(3);
        assert!(call(&breaker, Outcome::Failure));
        assert!(call(&breaker, Outcome::Failure));
        // A success in between starts the count again.
        assert!(call(&breaker, Outcome::Success));
        assert!(call(&breaker, Outcome::Failure));
        assert!(call(&breaker, Outcome::Failure));
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(call(&breaker, Outcome::Failure));
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(!breaker.admits_calls());
        assert!(breaker.try_acquire().is_none(), "open breakers fail fast");
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_after_recovery_lets_one_probe_decide() {
        let breaker = breaker(1);
        assert!(call(&breaker, Outcome::Failure));
        assert_eq!(breaker.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(4_999)).await;
        assert_eq!(breaker.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(breaker.state(), BreakerState::HalfOpen);

        // One probe at a time.
        let probe = breaker.try_acquire().expect("the probe passes");
        assert!(breaker.try_acquire().is_none());
        assert!(!breaker.admits_calls());
        // The probe fails: open again, for a full recovery time.
        probe.settle(Outcome::Failure);
        assert_eq!(breaker.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(4_999)).await;
        assert_eq!(breaker.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(breaker.state(), BreakerState::HalfOpen);

        // The probe succeeds: closed, every call passes.
        assert!(call(&breaker, Outcome::Success));
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(call(&breaker, Outcome::Success));
        assert!(call(&breaker, Outcome::Success));
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_hands_its_turn_to_the_next_call() {
        let breaker = breaker(1);
        assert!(call(&breaker, Outcome::Failure));
        tokio::time::advance(Duration::from_secs(5)).await;
        let probe = breaker.try_acquire().expect("the probe passes");
        drop(probe);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(call(&breaker, Outcome::Success));
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_that_started_before_a_change_do_not_decide_the_next_state() {
        let breaker = breaker(2);
        let slow = breaker.try_acquire().expect("closed");
        assert!(call(&breaker, Outcome::Failure));
        assert!(call(&breaker, Outcome::Failure));
        assert_eq!(breaker.state(), BreakerState::Open);
        // A success from before the breaker opened does not close it.
        slow.settle(Outcome::Success);
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[test]
    fn business_errors_are_answers_not_failures() {
        assert_eq!(Outcome::of(None, true), Outcome::Success);
        assert_eq!(Outcome::of(Some(Code::Ok), true), Outcome::Success);
        assert_eq!(
            Outcome::of(Some(Code::FailedPrecondition), true),
            Outcome::Success
        );
        assert_eq!(
            Outcome::of(Some(Code::InvalidArgument), true),
            Outcome::Success
        );
        assert_eq!(Outcome::of(Some(Code::Unavailable), true), Outcome::Failure);
        assert_eq!(
            Outcome::of(Some(Code::DeadlineExceeded), true),
            Outcome::Failure
        );
    }

    #[test]
    fn running_out_of_a_short_budget_proves_nothing() {
        assert_eq!(
            Outcome::of(Some(Code::DeadlineExceeded), false),
            Outcome::Inconclusive
        );
        // No connection is a failure whatever the budget.
        assert_eq!(
            Outcome::of(Some(Code::Unavailable), false),
            Outcome::Failure
        );
        assert_eq!(Outcome::of(None, false), Outcome::Success);
    }

    #[tokio::test(start_paused = true)]
    async fn inconclusive_calls_neither_count_nor_reset_nor_decide_a_probe() {
        let breaker = breaker(2);
        assert!(call(&breaker, Outcome::Failure));
        for _ in 0..10 {
            assert!(call(&breaker, Outcome::Inconclusive));
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        // The failure before them still counts.
        assert!(call(&breaker, Outcome::Failure));
        assert_eq!(breaker.state(), BreakerState::Open);

        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(call(&breaker, Outcome::Inconclusive));
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(breaker.admits_calls(), "the next call probes");
        assert!(call(&breaker, Outcome::Success));
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
}
