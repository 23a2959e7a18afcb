//! Validated money amounts (`agora.common.v1.Money`).

use agora_proto::common::v1 as pb;

use crate::error::Violations;

/// An amount in a currency's minor unit, with a validated ISO 4217 code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Money {
    /// Three upper-case ASCII letters, for example `EUR`.
    pub currency_code: String,
    /// Minor units (cents).
    pub amount_minor: i64,
}

impl Money {
    /// Validates a strictly positive amount (prices, charges): the message is
    /// the reason, for a `BadRequest` field violation.
    pub fn parse_positive(money: Option<&pb::Money>) -> Result<Self, &'static str> {
        let money = money.ok_or("is required")?;
        currency_code(&money.currency_code)
            .map_err(|_| "currency_code must be three upper-case letters (ISO 4217), e.g. EUR")?;
        if money.amount_minor <= 0 {
            return Err("amount_minor must be greater than 0");
        }
        Ok(Self {
            currency_code: money.currency_code.clone(),
            amount_minor: money.amount_minor,
        })
    }

    /// Validates a strictly positive amount like [`Money::parse_positive`],
    /// recording what is wrong in `violations` under `field` when the amount
    /// is missing, or under `field.currency_code` / `field.amount_minor` so
    /// that a client can point at the exact part.
    pub fn check_positive(
        violations: &mut Violations,
        field: &str,
        money: Option<&pb::Money>,
    ) -> Option<Self> {
        let Some(money) = money else {
            violations.add(field, "is required");
            return None;
        };
        let mut valid = true;
        if let Err(reason) = currency_code(&money.currency_code) {
            violations.add(format!("{field}.currency_code"), reason);
            valid = false;
        }
        if money.amount_minor <= 0 {
            violations.add(format!("{field}.amount_minor"), "must be greater than 0");
            valid = false;
        }
        valid.then(|| Self {
            currency_code: money.currency_code.clone(),
            amount_minor: money.amount_minor,
        })
    }

    /// The protobuf form.
    pub fn to_proto(&self) -> pb::Money {
        pb::Money {
            currency_code: self.currency_code.clone(),
            amount_minor: self.amount_minor,
        }
    }
}

/// Validates an ISO 4217 alphabetic code.
fn currency_code(code: &str) -> Result<(), &'static str> {
    if code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err("must be three upper-case letters (ISO 4217), e.g. EUR")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn money(code: &str, amount: i64) -> pb::Money {
        pb::Money {
            currency_code: code.into(),
            amount_minor: amount,
        }
    }

    #[test]
    fn accepts_positive_amounts_in_iso_codes() {
        assert_eq!(
            Money::parse_positive(Some(&money("EUR", 1999))),
            Ok(Money {
                currency_code: "EUR".into(),
                amount_minor: 1999
            })
        );
    }

    #[test]
    fn check_positive_names_the_wrong_part() {
        let fields = |money: Option<&pb::Money>| {
            let mut violations = Violations::default();
            let parsed = Money::check_positive(&mut violations, "price", money);
            let fields = violations
                .finish()
                .err()
                .map(|err| {
                    err.violations()
                        .iter()
                        .map(|(f, _)| f.clone())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            (parsed.is_some(), fields)
        };
        assert_eq!(fields(Some(&money("EUR", 5))), (true, vec![]));
        assert_eq!(fields(None), (false, vec!["price".to_owned()]));
        assert_eq!(
            fields(Some(&money("eur", 0))),
            (
                false,
                vec![
                    "price.currency_code".to_owned(),
                    "price.amount_minor".to_owned()
                ]
            )
        );
        assert_eq!(
            fields(Some(&money("EUR", -1))),
            (false, vec!["price.amount_minor".to_owned()])
        );
    }

    #[test]
    fn rejects_missing_bad_codes_and_non_positive_amounts() {
        assert!(Money::parse_positive(None).is_err());
        assert!(Money::parse_positive(Some(&money("eur", 1))).is_err());
        assert!(Money::parse_positive(Some(&money("EURO", 1))).is_err());
        assert!(Money::parse_positive(Some(&money("EUR", 0))).is_err());
        assert!(Money::parse_positive(Some(&money("EUR", -5))).is_err());
    }
}
