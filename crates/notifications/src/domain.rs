//! Validated values of the notifications domain and the stored notification.
//! Each `parse` returns the reason a value is rejected, phrased for the
//! `BadRequest` field violation.

use std::fmt;
use std::str::FromStr;

/// A recipient address: a valid [`agora_platform::email::Email`] (trimmed
/// and lower-cased, as the users service stores emails, so that one address
/// is one recipient whatever its spelling) that the mail library can also
/// address.
///
/// An address says where an email went, not whose it is: addresses are not
/// verified and can change hands, so ownership is the [`UserId`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Email(agora_platform::email::Email);

impl Email {
    /// Validates an address with the shared rules, then with the mail library's.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let email = agora_platform::email::Email::parse(raw)?;
        // Whatever we accept must also be addressable, or the send would fail
        // later with a less helpful reason.
        if lettre::Address::from_str(email.as_str()).is_err() {
            return Err("must look like name@example.com");
        }
        Ok(Self(email))
    }

    /// The normalized address.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub use agora_platform::ids::UserId;

/// The id of the event a notification answers (`ce-id`): the idempotency key.
/// 1 to 200 visible characters; usually a UUIDv7, but not required to be.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SourceEventId(String);

impl SourceEventId {
    /// Validates an event id.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        parse_token(raw).map(Self)
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The type of the event a notification answers (`ce-type`, for example
/// `agora.orders.order_completed`): 1 to 200 visible characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SourceEventType(String);

impl SourceEventType {
    /// Validates an event type.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        parse_token(raw).map(Self)
    }

    /// The type.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn parse_token(raw: &str) -> Result<String, &'static str> {
    let token = raw.trim();
    if token.is_empty() {
        return Err("must not be empty");
    }
    if token.chars().count() > 200 {
        return Err("must be at most 200 characters");
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters");
    }
    Ok(token.to_owned())
}

/// Single-line text shown in a subject or body (a user name, an order id):
/// trimmed, 1 to `max_chars` characters, no control characters (a line break
/// in a subject would be a header injection attempt).
pub fn parse_line(raw: &str, max_chars: usize) -> Result<String, String> {
    let line = raw.trim();
    if line.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if line.chars().count() > max_chars {
        return Err(format!("must be at most {max_chars} characters"));
    }
    if line.chars().any(char::is_control) {
        return Err("must not contain control characters".to_owned());
    }
    Ok(line.to_owned())
}

/// Free text for a body (a cancellation reason): trimmed, at most
/// `max_chars` characters, line breaks and tabs allowed, other control
/// characters not. May be empty.
pub fn parse_paragraph(raw: &str, max_chars: usize) -> Result<String, String> {
    let text = raw.trim();
    if text.chars().count() > max_chars {
        return Err(format!("must be at most {max_chars} characters"));
    }
    if text
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        return Err("must not contain control characters".to_owned());
    }
    Ok(text.to_owned())
}

/// How far delivery of a notification got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotificationStatus {
    /// Claimed by a sender that is delivering it now (or crashed while doing
    /// so; the claim expires, see [`crate::notifier::CLAIM_LEASE_MICROS`]).
    Sending,
    /// Handed to the SMTP server or written to the mail folder.
    Sent,
    /// Delivery failed; the reason is kept. The same event delivered again
    /// retries it.
    Failed,
}

impl NotificationStatus {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sending => "SENDING",
            Self::Sent => "SENT",
            Self::Failed => "FAILED",
        }
    }

    /// The status a stored string names.
    pub fn parse(stored: &str) -> Option<Self> {
        match stored {
            "SENDING" => Some(Self::Sending),
            "SENT" => Some(Self::Sent),
            "FAILED" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// One email caused by one event, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// UUIDv7; also the `.eml` file name and the `Message-ID` local part.
    pub id: String,
    /// The canonical id of the user it belongs to (see [`UserId`]): whose
    /// list it shows up in.
    pub user_id: String,
    /// The normalized address it was sent to.
    pub recipient: String,
    /// The subject line.
    pub subject: String,
    /// The plain-text body (the HTML alternative is rendered from the same
    /// data and not stored).
    pub body_text: String,
    /// How far delivery got.
    pub status: NotificationStatus,
    /// Why delivery failed; empty unless [`NotificationStatus::Failed`].
    pub failure_reason: String,
    /// The `ce-type` of the causing event.
    pub source_event_type: String,
    /// The `ce-id` of the causing event; unique.
    pub source_event_id: String,
    /// When the notification was first claimed, microseconds since the epoch.
    pub created_at: i64,
    /// When its status last changed, microseconds since the epoch.
    pub updated_at: i64,
    /// How many times delivery was started; each claim increments it, and a
    /// sender may only record the outcome of its own attempt.
    pub attempts: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalized_and_validated() {
        assert_eq!(
            Email::parse("  Ada@Example.COM ").map(|e| e.as_str().to_owned()),
            Ok("ada@example.com".to_owned())
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a da@x.io",
            "a@b@c.io",
            "a@x..io",
            "a@-x.io",
            "<script>@x.io",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(Email::parse(&format!("{}@x.io", "a".repeat(65))).is_err());
        assert!(Email::parse(&format!("a@{}.io", "x".repeat(300))).is_err());
    }

    #[test]
    fn user_ids_are_canonical_non_nil_uuids() {
        let id = "0190A5C4-7B3E-7C00-8000-00000000002A";
        assert_eq!(
            UserId::parse(&format!(" {id} ")).map(|u| u.as_str().to_owned()),
            Ok(id.to_lowercase())
        );
        for bad in [
            "",
            "u-ada",
            "00000000-0000-0000-0000-000000000000",
            "0190a5c4-7b3e-7c00-8000-00000000002a\u{0}",
        ] {
            assert!(UserId::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn event_ids_and_types_are_visible_tokens() {
        assert_eq!(
            SourceEventId::parse(" 0190-abc ").map(|id| id.0),
            Ok("0190-abc".to_owned())
        );
        assert!(SourceEventId::parse("").is_err());
        assert!(SourceEventId::parse("a b").is_err());
        assert!(SourceEventId::parse(&"x".repeat(201)).is_err());
        assert!(SourceEventType::parse("agora.users.user_created").is_ok());
        assert!(SourceEventType::parse("agora\n.users").is_err());
    }

    #[test]
    fn lines_reject_control_characters_and_paragraphs_keep_line_breaks() {
        assert_eq!(parse_line(" Ada ", 10), Ok("Ada".to_owned()));
        assert!(parse_line("Ada\r\nBcc: x@y.io", 100).is_err());
        assert!(parse_line("  ", 10).is_err());
        assert!(parse_line("abcdef", 5).is_err());
        assert_eq!(
            parse_paragraph("out of stock\nsorry", 100),
            Ok("out of stock\nsorry".to_owned())
        );
        assert_eq!(parse_paragraph("", 100), Ok(String::new()));
        assert!(parse_paragraph("bell\u{7}", 100).is_err());
        assert!(parse_paragraph(&"x".repeat(101), 100).is_err());
    }

    #[test]
    fn statuses_round_trip_through_their_stored_form() {
        for status in [
            NotificationStatus::Sending,
            NotificationStatus::Sent,
            NotificationStatus::Failed,
        ] {
            assert_eq!(NotificationStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(NotificationStatus::parse("sent"), None);
    }
}
