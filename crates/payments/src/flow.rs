//! The steps of a charge and of a refund around the card provider, and the
//! sweeper that finishes what a crash interrupted.
//!
//! A charge: claim the payment id (committed as PROCESSING), ask the provider
//! under the payment id as idempotency key, with no database transaction
//! open, then settle. Whoever finds the payment PROCESSING (a retry, a
//! concurrent copy) asks the provider again under the same key: it answers
//! what it answered before and charges nothing more. So a crash between the
//! provider's charge and the settling costs a retry, never a second charge.
//!
//! A refund must be safe for a saga compensating without the card (it never
//! keeps it): an unknown payment id becomes a VOIDED tombstone, so a charge
//! still on its way is refused; a PROCESSING payment is resolved first from
//! the provider's books (its outcome, or, when the provider has none, a void
//! there, so that a charge still in flight cannot succeed afterwards).

use std::sync::Arc;
use std::time::Duration;

use agora_platform::error::{Error, ErrorKind, Result};
use agora_platform::shutdown::CancellationToken;
use agora_platform::time::now_micros;

use crate::domain::{CardNumber, ChargeAttempt, Payment, PaymentId, PaymentStatus};
use crate::processor::{CardProvider, ChargeOutcome};
use crate::store::PaymentStore;

/// How many times a refund re-reads a payment that others keep changing
/// under it (a charge claiming the id, a settler) before answering ABORTED.
/// Each round moves the payment forward, so two or three always suffice.
const REFUND_ROUNDS: usize = 4;

/// The charge and refund flows over a store and a provider. Cheap to clone.
pub struct PaymentFlow<S, P> {
    store: Arc<S>,
    provider: Arc<P>,
}

impl<S, P> Clone for PaymentFlow<S, P> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            provider: Arc::clone(&self.provider),
        }
    }
}

impl<S: PaymentStore, P: CardProvider> PaymentFlow<S, P> {
    /// The flows over `store`, charging through `provider`.
    pub fn new(store: S, provider: P) -> Self {
        Self {
            store: Arc::new(store),
            provider: Arc::new(provider),
        }
    }

    /// Charges `card` for `attempt`, at most once per payment id, and
    /// returns the payment: SUCCEEDED, DECLINED or VOIDED for a new or
    /// interrupted charge, or whatever the payment is now for a retry of a
    /// settled one. UNAVAILABLE when the provider did not answer (the
    /// payment stays PROCESSING: retry).
    pub async fn charge(&self, attempt: &ChargeAttempt, card: &CardNumber) -> Result<Payment> {
        let payment = self.store.claim(attempt).await?;
        if payment.status != PaymentStatus::Processing {
            return Ok(payment);
        }
        // Ours, a concurrent copy's, or one a crash interrupted: asking again
        // under the same key is safe either way.
        let outcome = self
            .provider
            .charge(&payment.id, card, &attempt.amount)
            .await?;
        self.store.settle(&payment.id, &outcome).await
    }

    /// Refunds a payment in full, idempotently, and returns it: REFUNDED
    /// when it was charged (now or before), DECLINED or VOIDED unchanged
    /// when nothing was charged; an unknown id becomes a VOIDED tombstone.
    pub async fn refund(&self, payment_id: &PaymentId) -> Result<Payment> {
        let id = payment_id.as_str();
        for _ in 0..REFUND_ROUNDS {
            let payment = match self.store.get(id).await? {
                Some(payment) => payment,
                None => self.store.void_unknown(id).await?,
            };
            match payment.status {
                PaymentStatus::Processing => {
                    self.resolve(id).await?;
                }
                PaymentStatus::Succeeded => {
                    // Refunded at most once at the provider, whoever asks;
                    // a crash before the update below is finished by the
                    // saga's retry of the refund.
                    self.provider.refund(id).await?;
                    let refunded = self.store.mark_refunded(id).await?;
                    if refunded.status == PaymentStatus::Refunded {
                        return Ok(refunded);
                    }
                }
                PaymentStatus::Declined | PaymentStatus::Refunded | PaymentStatus::Voided => {
                    return Ok(payment);
                }
            }
        }
        Err(Error::new(
            ErrorKind::Conflict,
            format!("payment {id} changed concurrently: retry"),
        ))
    }

    /// The payment with this id.
    pub async fn get(&self, payment_id: &PaymentId) -> Result<Option<Payment>> {
        self.store.get(payment_id.as_str()).await
    }

    /// Settles a PROCESSING payment from the provider's books: as its
    /// outcome, or VOIDED (after voiding the key there) when it has none.
    async fn resolve(&self, id: &str) -> Result<Payment> {
        let outcome = match self.provider.lookup(id).await? {
            Some(outcome) => outcome,
            // The void is atomic at the provider: a charge landing between
            // the lookup and it is returned instead, and stands.
            None => self.provider.void(id).await?,
        };
        if outcome == ChargeOutcome::Voided {
            tracing::info!(payment_id = %id, "unsettled payment voided at the provider");
        }
        self.store.settle(id, &outcome).await
    }

    /// One sweep: settles up to `batch_size` payments PROCESSING for longer
    /// than `settle_after`; returns how many it settled. A payment that
    /// fails is logged and left for the next sweep.
    pub async fn settle_stale(&self, settle_after: Duration, batch_size: i64) -> Result<usize> {
        let age = i64::try_from(settle_after.as_micros()).unwrap_or(i64::MAX);
        let stale = self
            .store
            .stale_processing(now_micros().saturating_sub(age), batch_size)
            .await?;
        let mut settled = 0;
        for id in &stale {
            match self.resolve(id).await {
                Ok(payment) => {
                    settled += 1;
                    tracing::info!(
                        payment_id = %id,
                        status = payment.status.as_str(),
                        "stale payment settled"
                    );
                }
                Err(err) => tracing::warn!(
                    payment_id = %id,
                    error = %err,
                    "stale payment not settled; next sweep retries"
                ),
            }
        }
        Ok(settled)
    }

    /// Runs [`PaymentFlow::settle_stale`] every `settings.interval` until
    /// `stop`, at once again after a fully settled batch (more are probably
    /// waiting; a batch with failures waits for the next tick, so a provider
    /// outage is not hammered). Safe with several replicas:
    /// each settles through the same conditional update, and the provider
    /// answers each the same.
    pub async fn run_sweeper(self, settings: SweepSettings, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(settings.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            loop {
                match self
                    .settle_stale(settings.settle_after, settings.batch_size)
                    .await
                {
                    Ok(settled)
                        if usize::try_from(settings.batch_size).is_ok_and(|b| settled >= b) =>
                    {
                        if stop.is_cancelled() {
                            return;
                        }
                    }
                    Ok(_) => break,
                    Err(err) => {
                        tracing::warn!(error = %err, "payment sweep failed; retrying later");
                        break;
                    }
                }
            }
        }
    }
}

/// How the sweeper paces itself.
#[derive(Clone, Copy, Debug)]
pub struct SweepSettings {
    /// How often it looks for unsettled payments.
    pub interval: Duration,
    /// How long a payment must have been PROCESSING to be settled by the
    /// sweeper: well above the longest a charge's provider call may take,
    /// or a charge merely slow would be voided (safe, but a failed payment).
    pub settle_after: Duration,
    /// Payments per sweep.
    pub batch_size: i64,
}
