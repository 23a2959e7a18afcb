//! Debug output for the messages that carry secrets (listed in `build.rs`):
//! passwords, card numbers and access tokens print as `[redacted]`, so a
//! stray `?request` in a log line cannot leak them.

use std::fmt;

const REDACTED: &str = "[redacted]";

impl fmt::Debug for crate::users::v1::CreateUserRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateUserRequest")
            .field("email", &self.email)
            .field("name", &self.name)
            .field("password", &REDACTED)
            .finish()
    }
}

impl fmt::Debug for crate::users::v1::AuthenticateRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthenticateRequest")
            .field("email", &self.email)
            .field("password", &REDACTED)
            .finish()
    }
}

impl fmt::Debug for crate::users::v1::AuthenticateResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthenticateResponse")
            .field("access_token", &REDACTED)
            .field("expires_at", &self.expires_at)
            .field("user", &self.user)
            .finish()
    }
}

impl fmt::Debug for crate::payments::v1::ChargeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChargeRequest")
            .field("payment_id", &self.payment_id)
            .field("user_id", &self.user_id)
            .field("amount", &self.amount)
            .field("card_number", &REDACTED)
            .finish()
    }
}

impl fmt::Debug for crate::orders::v1::PlaceOrderRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlaceOrderRequest")
            .field("request_id", &self.request_id)
            .field("items", &self.items)
            .field("card_number", &REDACTED)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_do_not_appear_in_debug_output() {
        let printed = [
            format!(
                "{:?}",
                crate::users::v1::CreateUserRequest {
                    email: "a@x.io".into(),
                    name: "Ada".into(),
                    password: "hunter2-secret".into(),
                }
            ),
            format!(
                "{:?}",
                crate::users::v1::AuthenticateRequest {
                    email: "a@x.io".into(),
                    password: "hunter2-secret".into(),
                }
            ),
            format!(
                "{:?}",
                crate::users::v1::AuthenticateResponse {
                    access_token: "hunter2-secret".into(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                crate::payments::v1::ChargeRequest {
                    card_number: "hunter2-secret".into(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                crate::orders::v1::PlaceOrderRequest {
                    card_number: "hunter2-secret".into(),
                    ..Default::default()
                }
            ),
        ];
        for text in printed {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains("[redacted]"), "{text}");
        }
    }
}
