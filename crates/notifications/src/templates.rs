//! The emails Agora sends, each as a subject, a plain-text body and an HTML
//! alternative rendered from the same data.
//!
//! Every value that came from a user or another service (names, order ids,
//! reasons, addresses) goes through [`escape_html`] before it lands in the
//! HTML part: a user called `<script>` must not get script into a mail client.

use agora_platform::error::Violations;
use agora_proto::common::v1 as common;

use crate::domain::{Email, parse_line, parse_paragraph};

/// Longest accepted user name, order id and cancellation reason.
const MAX_NAME_CHARS: usize = 200;
const MAX_ORDER_ID_CHARS: usize = 100;
const MAX_REASON_CHARS: usize = 2_000;

/// Which email to send and the data it shows, as the caller hands it in
/// (unvalidated; see [`Template::parse`]).
#[derive(Clone, Debug, PartialEq)]
pub enum TemplateData {
    /// A user signed up (`UserCreated`); the recipient is their email.
    Welcome {
        /// The user's display name.
        name: String,
    },
    /// An order was paid and confirmed (`OrderCompleted`).
    OrderCompleted {
        /// The order's id.
        order_id: String,
        /// What was charged.
        total: common::Money,
    },
    /// A completed order was cancelled (`OrderCancelled`).
    OrderCancelled {
        /// The order's id.
        order_id: String,
        /// Why, in words a customer can read; may be empty.
        reason: String,
    },
    /// The checkout of an order failed (`OrderFailed`).
    OrderFailed {
        /// The order's id.
        order_id: String,
        /// Why, in words a customer can read; may be empty.
        reason: String,
    },
}

/// Validated template data, ready to render.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Template {
    /// See [`TemplateData::Welcome`].
    Welcome {
        /// Trimmed, without control characters.
        name: String,
    },
    /// See [`TemplateData::OrderCompleted`].
    OrderCompleted {
        /// Trimmed, without control characters.
        order_id: String,
        /// The total as shown, for example `EUR 19.99`.
        total: String,
    },
    /// See [`TemplateData::OrderCancelled`].
    OrderCancelled {
        /// Trimmed, without control characters.
        order_id: String,
        /// Trimmed; may contain line breaks; may be empty.
        reason: String,
    },
    /// See [`TemplateData::OrderFailed`].
    OrderFailed {
        /// Trimmed, without control characters.
        order_id: String,
        /// Trimmed; may contain line breaks; may be empty.
        reason: String,
    },
}

/// A rendered email: what goes into the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedEmail {
    /// The subject line.
    pub subject: String,
    /// The plain-text part.
    pub text: String,
    /// The HTML alternative.
    pub html: String,
}

impl Template {
    /// Validates `data`, recording each bad field under `template.<field>`
    /// (`template.total.currency_code` for nested ones) in `violations`.
    pub fn parse(data: &TemplateData, violations: &mut Violations) -> Option<Self> {
        match data {
            TemplateData::Welcome { name } => {
                let name = violations.check("template.name", parse_line(name, MAX_NAME_CHARS));
                Some(Self::Welcome { name: name? })
            }
            TemplateData::OrderCompleted { order_id, total } => {
                let order_id = violations.check(
                    "template.order_id",
                    parse_line(order_id, MAX_ORDER_ID_CHARS),
                );
                let total = parse_total(total, violations);
                Some(Self::OrderCompleted {
                    order_id: order_id?,
                    total: total?,
                })
            }
            TemplateData::OrderCancelled { order_id, reason }
            | TemplateData::OrderFailed { order_id, reason } => {
                let order_id = violations.check(
                    "template.order_id",
                    parse_line(order_id, MAX_ORDER_ID_CHARS),
                );
                let reason =
                    violations.check("template.reason", parse_paragraph(reason, MAX_REASON_CHARS));
                let (order_id, reason) = (order_id?, reason?);
                Some(match data {
                    TemplateData::OrderFailed { .. } => Self::OrderFailed { order_id, reason },
                    _ => Self::OrderCancelled { order_id, reason },
                })
            }
        }
    }

    /// The email for `recipient`.
    pub fn render(&self, recipient: &Email) -> RenderedEmail {
        match self {
            Self::Welcome { name } => welcome(name, recipient.as_str()),
            Self::OrderCompleted { order_id, total } => order_completed(order_id, total),
            Self::OrderCancelled { order_id, reason } => order_cancelled(order_id, reason),
            Self::OrderFailed { order_id, reason } => order_failed(order_id, reason),
        }
    }
}

/// The welcome email for a new user.
pub fn welcome(name: &str, email: &str) -> RenderedEmail {
    let subject = format!("Welcome to Agora, {name}");
    let text = format!(
        "Hello {name},\n\n\
         welcome to Agora! Your account {email} is ready: sign in with it to start shopping.\n\n\
         The Agora team\n"
    );
    let html = html_document(
        &subject,
        &format!(
            "<p>Hello {name},</p>\n\
             <p>welcome to Agora! Your account <strong>{email}</strong> is ready: \
             sign in with it to start shopping.</p>\n",
            name = escape_html(name),
            email = escape_html(email),
        ),
    );
    RenderedEmail {
        subject,
        text,
        html,
    }
}

/// The confirmation of a paid order; `total` is money text like `EUR 19.99`.
pub fn order_completed(order_id: &str, total: &str) -> RenderedEmail {
    let subject = format!("Your Agora order {order_id} is confirmed");
    let text = format!(
        "Hello,\n\n\
         thank you for your order {order_id}. We charged {total} and are getting it ready.\n\n\
         The Agora team\n"
    );
    let html = html_document(
        &subject,
        &format!(
            "<p>Hello,</p>\n\
             <p>thank you for your order <strong>{order_id}</strong>. \
             We charged <strong>{total}</strong> and are getting it ready.</p>\n",
            order_id = escape_html(order_id),
            total = escape_html(total),
        ),
    );
    RenderedEmail {
        subject,
        text,
        html,
    }
}

/// The notice of a cancelled order, with the reason when one was given.
pub fn order_cancelled(order_id: &str, reason: &str) -> RenderedEmail {
    order_notice(
        format!("Your Agora order {order_id} was cancelled"),
        order_id,
        "was cancelled",
        reason,
        "Anything you were charged for it has been refunded.",
    )
}

/// The notice of an order whose checkout failed, with the reason.
pub fn order_failed(order_id: &str, reason: &str) -> RenderedEmail {
    order_notice(
        format!("Your Agora order {order_id} could not be completed"),
        order_id,
        "could not be completed",
        reason,
        "Nothing was charged for it.",
    )
}

/// An order's end: what happened to it, why, and what it means for money.
fn order_notice(
    subject: String,
    order_id: &str,
    what: &str,
    reason: &str,
    money: &str,
) -> RenderedEmail {
    let reason = if reason.trim().is_empty() {
        "no reason was given"
    } else {
        reason
    };
    let text = format!(
        "Hello,\n\n\
         your order {order_id} {what}.\n\
         Reason: {reason}\n\n\
         {money}\n\n\
         The Agora team\n"
    );
    let html = html_document(
        &subject,
        &format!(
            "<p>Hello,</p>\n\
             <p>your order <strong>{order_id}</strong> {what}.</p>\n\
             <p>Reason: {reason}</p>\n\
             <p>{money}</p>\n",
            order_id = escape_html(order_id),
            // Escape first, then turn the (now inert) line breaks into tags.
            reason = escape_html(reason)
                .replace("\r\n", "\n")
                .replace('\n', "<br>\n"),
        ),
    );
    RenderedEmail {
        subject,
        text,
        html,
    }
}

/// Wraps a body fragment (already escaped) into the shared HTML layout.
fn html_document(subject: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n\
         <html lang=\"en\">\n\
         <head><meta charset=\"utf-8\"><title>{title}</title></head>\n\
         <body>\n{body}<p>The Agora team</p>\n</body>\n\
         </html>\n",
        title = escape_html(subject),
    )
}

/// Text made safe to place in HTML element content and in quoted attribute
/// values: `& < > " '` become character references.
pub fn escape_html(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

/// Validates a total (three upper-case letters, zero or more minor units:
/// free orders exist) and formats it.
fn parse_total(total: &common::Money, violations: &mut Violations) -> Option<String> {
    let code = total.currency_code.as_str();
    let mut ok = true;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
        violations.add(
            "template.total.currency_code",
            "must be three upper-case letters (ISO 4217), e.g. EUR",
        );
        ok = false;
    }
    if total.amount_minor < 0 {
        violations.add("template.total.amount_minor", "must not be negative");
        ok = false;
    }
    ok.then(|| format_money(code, total.amount_minor))
}

/// Money as people read it: the ISO 4217 code, a space, and the amount with
/// the currency's number of decimals (`EUR 19.99`, `JPY 500`, `KWD 1.250`).
pub fn format_money(currency_code: &str, amount_minor: i64) -> String {
    let decimals = minor_unit_digits(currency_code);
    let sign = if amount_minor < 0 { "-" } else { "" };
    // unsigned_abs: i64::MIN has no positive i64 counterpart.
    let magnitude = amount_minor.unsigned_abs();
    if decimals == 0 {
        return format!("{currency_code} {sign}{magnitude}");
    }
    let scale = 10_u64.pow(decimals);
    let whole = magnitude / scale;
    let fraction = magnitude % scale;
    let width = usize::try_from(decimals).unwrap_or(2);
    format!("{currency_code} {sign}{whole}.{fraction:0width$}")
}

/// ISO 4217 minor unit digits: most currencies have 2; these are the ones
/// in circulation with 0 or 3.
fn minor_unit_digits(currency_code: &str) -> u32 {
    const NO_DECIMALS: &[&str] = &[
        "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND",
        "VUV", "XAF", "XOF", "XPF",
    ];
    const THREE_DECIMALS: &[&str] = &["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"];
    if NO_DECIMALS.contains(&currency_code) {
        0
    } else if THREE_DECIMALS.contains(&currency_code) {
        3
    } else {
        2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email(raw: &str) -> Email {
        Email::parse(raw).expect("valid email")
    }

    #[test]
    fn html_special_characters_are_escaped() {
        assert_eq!(
            escape_html(r#"<a href="x">Tom & 'Jerry'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/a&gt;"
        );
        assert_eq!(escape_html("plain"), "plain");
    }

    #[test]
    fn a_script_in_a_name_is_inert_in_the_html_part() {
        let template = Template::Welcome {
            name: "<script>alert('x')</script>".to_owned(),
        };
        let email = template.render(&email("ada@example.com"));
        assert!(!email.html.contains("<script>"), "{}", email.html);
        assert!(
            email
                .html
                .contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"),
            "{}",
            email.html
        );
        // The plain-text part and the subject show the name as typed.
        assert!(email.text.contains("<script>alert('x')</script>"));
        assert!(email.subject.contains("<script>"));
    }

    #[test]
    fn every_user_value_is_escaped_in_every_template() {
        let evil = "<b>&\"x\"</b>";
        let rendered = [
            welcome(evil, evil),
            order_completed(evil, evil),
            order_cancelled(evil, evil),
        ];
        for email in rendered {
            assert!(!email.html.contains("<b>"), "{}", email.html);
            assert!(email.html.contains("&lt;b&gt;&amp;&quot;x&quot;&lt;/b&gt;"));
            assert!(email.text.contains(evil));
        }
    }

    #[test]
    fn welcome_names_the_user_and_the_account() {
        let email = welcome("Ada Lovelace", "ada@example.com");
        assert_eq!(email.subject, "Welcome to Agora, Ada Lovelace");
        for part in [&email.text, &email.html] {
            assert!(part.contains("Ada Lovelace"));
            assert!(part.contains("ada@example.com"));
        }
    }

    #[test]
    fn order_emails_show_the_order_total_and_reason() {
        let done = order_completed("o-1", "EUR 19.99");
        assert!(done.subject.contains("o-1"));
        assert!(done.text.contains("EUR 19.99") && done.html.contains("EUR 19.99"));
        let cancelled = order_cancelled("o-2", "card declined\nplease retry");
        assert!(cancelled.subject.contains("o-2") && cancelled.subject.contains("cancelled"));
        assert!(
            cancelled
                .text
                .contains("Reason: card declined\nplease retry")
        );
        assert!(cancelled.html.contains("card declined<br>\nplease retry"));
        let silent = order_cancelled("o-3", "  ");
        assert!(silent.text.contains("no reason was given"));
    }

    #[test]
    fn money_is_formatted_with_the_currency_decimals() {
        assert_eq!(format_money("EUR", 1999), "EUR 19.99");
        assert_eq!(format_money("EUR", 5), "EUR 0.05");
        assert_eq!(format_money("USD", 0), "USD 0.00");
        assert_eq!(format_money("JPY", 500), "JPY 500");
        assert_eq!(format_money("KWD", 1250), "KWD 1.250");
        assert_eq!(format_money("EUR", -150), "EUR -1.50");
        assert_eq!(format_money("EUR", i64::MIN), "EUR -92233720368547758.08");
    }

    #[test]
    fn template_data_is_validated_per_field() {
        let mut violations = Violations::default();
        let parsed = Template::parse(
            &TemplateData::OrderCompleted {
                order_id: " ".into(),
                total: common::Money {
                    currency_code: "eur".into(),
                    amount_minor: -1,
                },
            },
            &mut violations,
        );
        assert!(parsed.is_none());
        let err = violations.finish().expect_err("three bad fields");
        let fields: Vec<_> = err.violations().iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "template.order_id",
                "template.total.currency_code",
                "template.total.amount_minor"
            ]
        );

        let mut violations = Violations::default();
        let parsed = Template::parse(
            &TemplateData::Welcome {
                name: "Ada\r\nBcc: eve@example.com".into(),
            },
            &mut violations,
        );
        assert!(parsed.is_none());
        assert!(!violations.is_empty());

        let mut violations = Violations::default();
        let parsed = Template::parse(
            &TemplateData::OrderCompleted {
                order_id: " o-1 ".into(),
                total: common::Money {
                    currency_code: "EUR".into(),
                    amount_minor: 1999,
                },
            },
            &mut violations,
        );
        assert!(violations.is_empty());
        assert_eq!(
            parsed,
            Some(Template::OrderCompleted {
                order_id: "o-1".into(),
                total: "EUR 19.99".into()
            })
        );
    }
}
