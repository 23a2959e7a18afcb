//! The card provider: the [`CardProvider`] trait the service charges
//! through, and [`SimulatedProvider`], its test-card implementation.
//!
//! Every call names an idempotency key (the service uses the payment id):
//! the same key always gets the same outcome, and nothing is charged twice
//! under one key, however often and however concurrently it is asked. That
//! is what lets the service call the provider outside any database
//! transaction, and simply ask again after a timeout or a crash.
//!
//! Real payment providers publish test cards whose outcome is fixed; the
//! simulated one behaves the same way, so that the whole checkout can run
//! without a network or an account:
//!
//! | card number                 | outcome                                       |
//! |-----------------------------|-----------------------------------------------|
//! | `4242424242424242`          | approved                                      |
//! | `4000000000000002`          | declined: `card declined: insufficient funds` |
//! | any other Luhn-valid number | approved                                      |
//!
//! The simulated provider keeps its books in the payments database
//! (`provider_ledger`), one row per operation it performed, each written in
//! a statement of its own: like a real provider's books, which are
//! elsewhere, they are never part of the service's transactions. Tests count
//! those rows to prove that a card was charged at most once.

use std::fmt;
use std::future::Future;

use agora_platform::db::Db;
use agora_platform::error::{Error, ErrorKind, Result};
use agora_platform::money::Money;
use agora_platform::time::now_micros;
use sqlx::Row;

use crate::domain::CardNumber;

/// The test card that is always approved.
pub const SUCCEEDING_CARD: &str = "4242424242424242";

/// The test card that is always declined.
pub const DECLINED_CARD: &str = "4000000000000002";

/// Why [`DECLINED_CARD`] is declined.
pub const INSUFFICIENT_FUNDS: &str = "card declined: insufficient funds";

/// What happened under an idempotency key, as the provider remembers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// The card was charged.
    Approved {
        /// The provider's id of the charge.
        reference: String,
    },
    /// The card was declined; nothing was charged.
    Declined {
        /// The provider's id of the declined attempt.
        reference: String,
        /// Why, as shown to the payer.
        reason: String,
    },
    /// The key was voided before any charge reached the provider: nothing
    /// was charged under it and nothing ever will be.
    Voided,
}

/// Why the provider did not give an outcome.
#[derive(Debug)]
pub enum ProviderError {
    /// A refund was asked for a key under which no charge was approved.
    NotCharged,
    /// The provider did not answer (network, outage, timeout, its own
    /// storage): whether the operation happened is unknown. Asking again
    /// with the same key finds out, and never does it twice.
    Unavailable(Error),
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotCharged => f.write_str("no approved charge under this key"),
            Self::Unavailable(cause) => write!(f, "card provider unavailable: {cause}"),
        }
    }
}

impl std::error::Error for ProviderError {}

impl From<ProviderError> for Error {
    fn from(err: ProviderError) -> Self {
        match err {
            // Only asked after a charge settled as approved: the books
            // disagreeing with the payment is a bug, not the caller's doing.
            ProviderError::NotCharged => Error::new(
                ErrorKind::Internal,
                "the card provider has no charge to refund",
            ),
            ProviderError::Unavailable(cause) => Error::new(
                ErrorKind::Unavailable,
                "the card provider did not answer: retry with the same payment id",
            )
            .with_source(cause),
        }
    }
}

/// A card provider (a payment network, an acquirer). Each operation is
/// idempotent on its key; see the module documentation.
pub trait CardProvider: Send + Sync + 'static {
    /// Charges `amount` to `card` under `key`; when `key` was seen before,
    /// returns what happened then instead (nothing is charged again,
    /// whatever card or amount this call names), and [`ChargeOutcome::Voided`]
    /// when the key was voided.
    fn charge(
        &self,
        key: &str,
        card: &CardNumber,
        amount: &Money,
    ) -> impl Future<Output = Result<ChargeOutcome, ProviderError>> + Send;

    /// What happened under `key`, without charging anything; `None` when the
    /// provider never saw it.
    fn lookup(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<ChargeOutcome>, ProviderError>> + Send;

    /// Makes sure nothing is ever charged under `key`. Returns
    /// [`ChargeOutcome::Voided`] when nothing was (a charge still in flight
    /// under the key then answers `Voided` too), or the outcome that had
    /// already happened (approved or declined), which stands.
    fn void(&self, key: &str) -> impl Future<Output = Result<ChargeOutcome, ProviderError>> + Send;

    /// Refunds in full the charge approved under `key`, at most once: a
    /// repeated call returns the first refund's reference.
    /// [`ProviderError::NotCharged`] when no charge was approved under it.
    fn refund(&self, key: &str) -> impl Future<Output = Result<String, ProviderError>> + Send;
}

/// An operation the provider performed, as recorded in its ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedgerOperation {
    /// Money was taken from the card.
    Charge,
    /// The provider was asked to charge and declined; nothing was taken.
    Decline,
    /// The key was voided before any charge; nothing was or will be taken.
    Void,
    /// Money was given back.
    Refund,
}

impl LedgerOperation {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Charge => "charge",
            Self::Decline => "decline",
            Self::Void => "void",
            Self::Refund => "refund",
        }
    }
}

/// The simulated provider, with its books in the payments database.
#[derive(Clone, Debug)]
pub struct SimulatedProvider {
    db: Db,
}

impl SimulatedProvider {
    /// The provider keeping its books in `db` (migrated with the payments
    /// migrations).
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// How many `operation`s the provider performed under `key`: at most
    /// one each, which is what tests check to prove "charged once".
    pub async fn ledger_entries(&self, key: &str, operation: LedgerOperation) -> Result<i64> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS entries FROM provider_ledger \
             WHERE idempotency_key = $1 AND operation = $2",
        )
        .bind(key)
        .bind(operation.as_str())
        .fetch_one(self.db.pool())
        .await?;
        Ok(row.try_get("entries")?)
    }

    /// Records `outcome` under `key` unless the key already has an outcome
    /// (the unique `provider_ledger_one_outcome` index: one charge, decline
    /// or void per key, whichever came first), then returns the outcome
    /// that stands. One statement each: two concurrent calls both end up
    /// reading the one row that won.
    async fn decide(
        &self,
        key: &str,
        outcome: &ChargeOutcome,
        amount: Option<&Money>,
    ) -> Result<ChargeOutcome> {
        let (operation, reference, reason) = match outcome {
            ChargeOutcome::Approved { reference } => {
                (LedgerOperation::Charge, reference.as_str(), "")
            }
            ChargeOutcome::Declined { reference, reason } => (
                LedgerOperation::Decline,
                reference.as_str(),
                reason.as_str(),
            ),
            // A void moves no money: it keeps neither amount nor reference.
            ChargeOutcome::Voided => (LedgerOperation::Void, "", ""),
        };
        sqlx::query(
            "INSERT INTO provider_ledger (id, idempotency_key, operation, currency_code, \
             amount_minor, provider_reference, decline_reason, occurred_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(key)
        .bind(operation.as_str())
        .bind(amount.map_or("", |a| a.currency_code.as_str()))
        .bind(amount.map_or(0, |a| a.amount_minor))
        .bind(reference)
        .bind(reason)
        .bind(now_micros())
        .execute(self.db.pool())
        .await?;
        self.recorded_outcome(key).await?.ok_or_else(|| {
            Error::new(
                ErrorKind::Internal,
                format!("the provider's outcome for {key} vanished"),
            )
        })
    }

    /// The outcome recorded under `key`, if any.
    async fn recorded_outcome(&self, key: &str) -> Result<Option<ChargeOutcome>> {
        let Some(row) = sqlx::query(
            "SELECT operation, provider_reference, decline_reason FROM provider_ledger \
             WHERE idempotency_key = $1 AND operation IN ('charge', 'decline', 'void')",
        )
        .bind(key)
        .fetch_optional(self.db.pool())
        .await?
        else {
            return Ok(None);
        };
        let operation: String = row.try_get("operation")?;
        let reference: String = row.try_get("provider_reference")?;
        match operation.as_str() {
            "charge" => Ok(Some(ChargeOutcome::Approved { reference })),
            "decline" => Ok(Some(ChargeOutcome::Declined {
                reference,
                reason: row.try_get("decline_reason")?,
            })),
            "void" => Ok(Some(ChargeOutcome::Voided)),
            other => Err(Error::new(
                ErrorKind::Internal,
                format!("unknown ledger operation {other:?}"),
            )),
        }
    }
}

/// The simulated provider's own failures (its database) are what a real
/// provider's outage looks like to the service: the outcome is unknown.
fn unavailable(err: Error) -> ProviderError {
    ProviderError::Unavailable(err)
}

impl CardProvider for SimulatedProvider {
    async fn charge(
        &self,
        key: &str,
        card: &CardNumber,
        amount: &Money,
    ) -> Result<ChargeOutcome, ProviderError> {
        let outcome = if card.is(DECLINED_CARD) {
            ChargeOutcome::Declined {
                reference: provider_reference("dc"),
                reason: INSUFFICIENT_FUNDS.to_owned(),
            }
        } else {
            ChargeOutcome::Approved {
                reference: provider_reference("ch"),
            }
        };
        self.decide(key, &outcome, Some(amount))
            .await
            .map_err(unavailable)
    }

    async fn lookup(&self, key: &str) -> Result<Option<ChargeOutcome>, ProviderError> {
        self.recorded_outcome(key).await.map_err(unavailable)
    }

    async fn void(&self, key: &str) -> Result<ChargeOutcome, ProviderError> {
        self.decide(key, &ChargeOutcome::Voided, None)
            .await
            .map_err(unavailable)
    }

    async fn refund(&self, key: &str) -> Result<String, ProviderError> {
        // Copies the amount from the charge, and only when there is one; the
        // unique (key, operation) constraint makes a repeat do nothing.
        sqlx::query(
            "INSERT INTO provider_ledger (id, idempotency_key, operation, currency_code, \
             amount_minor, provider_reference, decline_reason, occurred_at) \
             SELECT $1, idempotency_key, 'refund', currency_code, amount_minor, $2, '', $3 \
             FROM provider_ledger WHERE idempotency_key = $4 AND operation = 'charge' \
             ON CONFLICT DO NOTHING",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(provider_reference("re"))
        .bind(now_micros())
        .bind(key)
        .execute(self.db.pool())
        .await
        .map_err(|err| unavailable(err.into()))?;
        let refund = sqlx::query(
            "SELECT provider_reference FROM provider_ledger \
             WHERE idempotency_key = $1 AND operation = 'refund'",
        )
        .bind(key)
        .fetch_optional(self.db.pool())
        .await
        .map_err(|err| unavailable(err.into()))?;
        match refund {
            Some(row) => row
                .try_get("provider_reference")
                .map_err(|err| unavailable(err.into())),
            None => Err(ProviderError::NotCharged),
        }
    }
}

/// A provider-style id such as `ch_0190...`, unique per operation.
fn provider_reference(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}
