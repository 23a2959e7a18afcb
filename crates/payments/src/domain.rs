//! Validated values and records of the payments domain. Each `parse` returns
//! the reason a value is rejected, phrased for the `BadRequest` field
//! violation; no reason ever repeats a card number.

use std::fmt;

use agora_platform::money::Money;

/// The `google.rpc.ErrorInfo` reasons the payments service answers with, so
/// that callers (the checkout saga) branch on them rather than on messages.
pub mod reason {
    /// FAILED_PRECONDITION: the card was declined (first attempt and
    /// retries alike); the message says why.
    pub const CARD_DECLINED: &str = "CARD_DECLINED";
    /// FAILED_PRECONDITION: the payment was voided (refunded before it was
    /// charged) and can never be charged.
    pub const PAYMENT_VOIDED: &str = "PAYMENT_VOIDED";
    /// ALREADY_EXISTS: the payment id was used for a charge with another
    /// user, amount or card.
    pub const PAYMENT_ID_REUSED: &str = "PAYMENT_ID_REUSED";
}

/// The longest payment id accepted, in characters.
pub const MAX_PAYMENT_ID_CHARS: usize = 128;

/// A caller-chosen payment id (the orders service derives it from its saga
/// id): 1 to 128 characters of `[A-Za-z0-9._:-]`, kept exactly as sent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PaymentId(String);

impl PaymentId {
    /// Validates an id. Nothing is trimmed: ids are compared byte for byte,
    /// so a stray space is an error rather than silently another id.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        if raw.is_empty() {
            return Err("must not be empty");
        }
        if raw.chars().count() > MAX_PAYMENT_ID_CHARS {
            return Err("must be at most 128 characters");
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
        if !raw.chars().all(allowed) {
            return Err("may contain only letters, digits and . _ : -");
        }
        Ok(Self(raw.to_owned()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PaymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub use agora_platform::ids::UserId;

/// The card number rule is the platform's, so that orders (refusing a
/// mistyped card before an order exists) and payments agree on it. A number
/// lives only for the duration of one `Charge`: it is handed to the
/// [`crate::processor::CardProvider`] and never stored, logged or shown.
pub use agora_platform::card::CardNumber;

/// Where a payment is in its lifecycle.
///
/// PROCESSING is the only state entered before the provider answers: the
/// payment id is claimed (committed) and the provider is being asked, or was
/// when the process died. Whoever finds it next (a retried charge, a refund,
/// the sweeper) asks the provider again under the same key and settles it
/// as the provider's books say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaymentStatus {
    /// Claimed; the provider's outcome is not recorded yet.
    Processing,
    /// The card was charged.
    Succeeded,
    /// The card was declined; nothing was charged.
    Declined,
    /// A successful charge was refunded in full.
    Refunded,
    /// Never charged and never will be: refunded (a saga compensating)
    /// before any charge reached the provider, or found unsettled with
    /// nothing at the provider and voided there.
    Voided,
}

impl PaymentStatus {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Processing => "processing",
            Self::Succeeded => "succeeded",
            Self::Declined => "declined",
            Self::Refunded => "refunded",
            Self::Voided => "voided",
        }
    }

    /// Reads the stored form.
    pub fn parse(stored: &str) -> Option<Self> {
        match stored {
            "processing" => Some(Self::Processing),
            "succeeded" => Some(Self::Succeeded),
            "declined" => Some(Self::Declined),
            "refunded" => Some(Self::Refunded),
            "voided" => Some(Self::Voided),
            _ => None,
        }
    }
}

/// A charge as asked for, with the card reduced to what may be kept: its
/// last four digits. Nothing else derived from the number is stored: with
/// the last four known and the first six guessable from issuer prefixes,
/// even a salted hash of the rest could be reversed by brute force. Two
/// requests with the same payment id are the same charge when user, amount
/// and last four digits agree; a different card that shares the last four is
/// then answered as a retry, which can never charge twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeAttempt {
    /// The caller's payment id: the idempotency key.
    pub payment_id: PaymentId,
    /// Who pays.
    pub user_id: UserId,
    /// How much.
    pub amount: Money,
    /// The card's last four digits.
    pub card_last4: String,
}

impl ChargeAttempt {
    /// The attempt to charge `card`; the number itself stays with the caller.
    pub fn new(payment_id: PaymentId, user_id: UserId, amount: Money, card: &CardNumber) -> Self {
        Self {
            card_last4: card.last4().to_owned(),
            payment_id,
            user_id,
            amount,
        }
    }
}

/// A payment as stored.
///
/// A tombstone (a refund of an id never charged: VOIDED, recorded so that a
/// late charge with that id is refused) knows nothing of the charge: its
/// user, currency and last four digits are empty and its amount is 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    /// The caller's payment id.
    pub id: String,
    /// The paying user; empty for a tombstone.
    pub user_id: String,
    /// The amount charged (or attempted, when declined or voided).
    pub amount: Money,
    /// Where the payment is.
    pub status: PaymentStatus,
    /// The card's last four digits.
    pub card_last4: String,
    /// Why the card was declined; empty otherwise.
    pub decline_reason: String,
    /// When the payment was first recorded, microseconds since the epoch.
    pub created_at: i64,
    /// When its status last changed, microseconds since the epoch.
    pub updated_at: i64,
}

impl Payment {
    /// Whether this is a tombstone: voided before any charge was asked for.
    pub fn is_tombstone(&self) -> bool {
        self.status == PaymentStatus::Voided && self.user_id.is_empty()
    }

    /// The fields of `attempt` that differ from this payment (proto field
    /// names), empty when `attempt` is a retry of the charge that made it.
    pub fn differences(&self, attempt: &ChargeAttempt) -> Vec<&'static str> {
        let mut differ = Vec::new();
        if self.user_id != attempt.user_id.as_str() {
            differ.push("user_id");
        }
        if self.amount != attempt.amount {
            differ.push("amount");
        }
        if self.card_last4 != attempt.card_last4 {
            differ.push("card_number");
        }
        differ
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payment_ids_are_short_and_plain() {
        for good in ["p1", "saga:0190-abc.charge_1", &"x".repeat(128)] {
            assert!(
                PaymentId::parse(good).is_ok(),
                "{good:?} should be accepted"
            );
        }
        for bad in ["", " p1", "p 1", "p/1", "p\u{0}", "pé", &"x".repeat(129)] {
            assert!(PaymentId::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn user_ids_are_canonical_uuids() {
        let id = uuid::Uuid::now_v7();
        let upper = id.to_string().to_uppercase();
        assert_eq!(
            UserId::parse(&upper).map(|u| u.as_str().to_owned()),
            Ok(id.to_string()),
            "any spelling maps to the token form"
        );
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("not-a-uuid").is_err());
        assert!(UserId::parse(&uuid::Uuid::nil().to_string()).is_err());
    }

    #[test]
    fn charge_attempts_keep_only_the_last_four_digits() {
        let card = CardNumber::parse("4000 0000 0000 0002").expect("valid");
        let attempt = ChargeAttempt::new(
            PaymentId::parse("p1").expect("id"),
            UserId::parse(&uuid::Uuid::now_v7().to_string()).expect("user"),
            Money {
                currency_code: "EUR".into(),
                amount_minor: 100,
            },
            &card,
        );
        assert_eq!(attempt.card_last4, "0002");
        assert!(!format!("{attempt:?}").contains("4000000000000002"));
    }

    #[test]
    fn retries_differ_only_in_what_changed() {
        let card = CardNumber::parse("4242424242424242").expect("valid");
        let user = UserId::parse(&uuid::Uuid::now_v7().to_string()).expect("user");
        let eur = |amount_minor| Money {
            currency_code: "EUR".into(),
            amount_minor,
        };
        let attempt = ChargeAttempt::new(
            PaymentId::parse("p1").expect("id"),
            user.clone(),
            eur(100),
            &card,
        );
        let payment = Payment {
            id: "p1".into(),
            user_id: user.as_str().into(),
            amount: eur(100),
            status: PaymentStatus::Succeeded,
            card_last4: attempt.card_last4.clone(),
            decline_reason: String::new(),
            created_at: 1,
            updated_at: 1,
        };
        assert!(payment.differences(&attempt).is_empty());
        let other_card = CardNumber::parse("5555555555554444").expect("valid");
        let changed = ChargeAttempt::new(
            PaymentId::parse("p1").expect("id"),
            UserId::parse(&uuid::Uuid::now_v7().to_string()).expect("user"),
            eur(101),
            &other_card,
        );
        assert_eq!(
            payment.differences(&changed),
            ["user_id", "amount", "card_number"]
        );
    }

    #[test]
    fn statuses_round_trip() {
        for status in [
            PaymentStatus::Processing,
            PaymentStatus::Succeeded,
            PaymentStatus::Declined,
            PaymentStatus::Refunded,
            PaymentStatus::Voided,
        ] {
            assert_eq!(PaymentStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(PaymentStatus::parse("pending"), None);
    }
}
