//! The library entry point the event consumer calls: [`Notifier::notify`]
//! turns one event into at most one delivered email.
//!
//! The order of work is what makes it idempotent: validate and render, claim
//! the row for the event in a transaction ([`NotificationStore::claim`]),
//! send, then record SENT or FAILED. A second delivery of a sent event finds
//! the row SENT and returns it without sending; a failed one is retried; one
//! that another worker is sending right now is ABORTED, to be redelivered.

use std::sync::Arc;

use agora_platform::error::{Error, ErrorKind, Result, Violations};
use agora_platform::time::now_micros;
use agora_proto::orders::v1 as orders;
use agora_proto::users::v1 as users;
use lettre::message::Mailbox;

use crate::domain::{Email, Notification, SourceEventId, SourceEventType, UserId};
use crate::mailer::{Mailer, compose_message};
use crate::store::{Claim, NewNotification, NotificationStore, SqlNotificationStore};
use crate::templates::{Template, TemplateData};

/// How long a SENDING claim protects a notification from other senders. A
/// send is bounded by the SMTP timeouts (seconds), so a claim this old
/// belongs to a sender that died mid-way; taking it over may send the email
/// twice (it was possibly delivered), with the same `Message-ID` so that mail
/// software can tell, which beats never sending it.
pub const CLAIM_LEASE_MICROS: i64 = 5 * 60 * 1_000_000;

/// One event's request for an email.
#[derive(Clone, Debug, PartialEq)]
pub struct NotificationRequest {
    /// The `ce-type` of the event, for example `agora.orders.order_completed`.
    pub source_event_type: String,
    /// The `ce-id` of the event: the idempotency key.
    pub source_event_id: String,
    /// The id (UUID) of the user the notification belongs to: the only
    /// thing that decides whose `ListNotifications` shows it.
    pub user_id: String,
    /// The address to send to. It decides where the email goes, not who
    /// may read it afterwards (an address can change hands).
    pub recipient: String,
    /// Which email, with its data.
    pub template: TemplateData,
}

impl NotificationRequest {
    /// The email of event `source_event_id` (of type `source_event_type`)
    /// for user `user_id`, to `recipient` (the user's current address, from
    /// the directory).
    pub fn for_event(
        source_event_type: impl Into<String>,
        source_event_id: impl Into<String>,
        user_id: &str,
        recipient: &str,
        template: TemplateData,
    ) -> Self {
        Self {
            source_event_type: source_event_type.into(),
            source_event_id: source_event_id.into(),
            user_id: user_id.to_owned(),
            recipient: recipient.to_owned(),
            template,
        }
    }

    /// The welcome email for a `UserCreated` event.
    pub fn user_created(
        source_event_type: impl Into<String>,
        source_event_id: impl Into<String>,
        event: &users::UserCreated,
        recipient: &str,
    ) -> Self {
        let template = TemplateData::Welcome {
            name: event.name.clone(),
        };
        Self::for_event(
            source_event_type,
            source_event_id,
            &event.user_id,
            recipient,
            template,
        )
    }

    /// The confirmation email for an `OrderCompleted` event. A missing total
    /// is rejected by [`Notifier::notify`] as `template.total`.
    pub fn order_completed(
        source_event_type: impl Into<String>,
        source_event_id: impl Into<String>,
        event: &orders::OrderCompleted,
        recipient: &str,
    ) -> Self {
        let template = TemplateData::OrderCompleted {
            order_id: event.order_id.clone(),
            // An empty code fails validation, naming the field.
            total: event.total.clone().unwrap_or_default(),
        };
        Self::for_event(
            source_event_type,
            source_event_id,
            &event.user_id,
            recipient,
            template,
        )
    }
}

/// Renders, sends and records notifications. Cheap to clone; clones share
/// the store and the mailer.
pub struct Notifier<S = SqlNotificationStore> {
    store: Arc<S>,
    mailer: Arc<dyn Mailer>,
    from: Mailbox,
}

impl<S> Clone for Notifier<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            mailer: Arc::clone(&self.mailer),
            from: self.from.clone(),
        }
    }
}

impl<S> std::fmt::Debug for Notifier<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

impl<S: NotificationStore> Notifier<S> {
    /// A notifier recording in `store`, delivering through `mailer`, with
    /// `from` as the sender of every email.
    pub fn new(store: S, mailer: Arc<dyn Mailer>, from: Mailbox) -> Self {
        Self {
            store: Arc::new(store),
            mailer,
            from,
        }
    }

    /// Sends the email `request` asks for, once per `source_event_id`, and
    /// returns the stored notification.
    ///
    /// - INVALID_ARGUMENT naming every bad field (`user_id`, `recipient`,
    ///   `source_event_id`, `source_event_type`, `template.*`): nothing is
    ///   stored or sent; redelivering will not help.
    /// - A notification with status FAILED: delivery failed and the reason is
    ///   stored; calling again with the same event retries it.
    /// - SENT: delivered now, or already before (then nothing is sent again).
    /// - ABORTED: another worker is sending this event's email right now.
    pub async fn notify(&self, request: &NotificationRequest) -> Result<Notification> {
        let mut violations = Violations::default();
        let event_type = violations.check(
            "source_event_type",
            SourceEventType::parse(&request.source_event_type),
        );
        let event_id = violations.check(
            "source_event_id",
            SourceEventId::parse(&request.source_event_id),
        );
        let user_id = violations.check("user_id", UserId::parse(&request.user_id));
        let recipient = violations.check("recipient", Email::parse(&request.recipient));
        let template = Template::parse(&request.template, &mut violations);
        violations.finish()?;
        let (Some(event_type), Some(event_id), Some(user_id), Some(recipient), Some(template)) =
            (event_type, event_id, user_id, recipient, template)
        else {
            return Err(Error::new(
                ErrorKind::Internal,
                "validation passed without values",
            ));
        };

        let email = template.render(&recipient);
        let new = NewNotification {
            id: uuid::Uuid::now_v7().to_string(),
            user_id: user_id.as_str().to_owned(),
            recipient: recipient.as_str().to_owned(),
            subject: email.subject.clone(),
            body_text: email.text.clone(),
            source_event_type: event_type.as_str().to_owned(),
            source_event_id: event_id.as_str().to_owned(),
        };
        let claimed = match self
            .store
            .claim(&new, now_micros().saturating_sub(CLAIM_LEASE_MICROS))
            .await?
        {
            Claim::Claimed(notification) => notification,
            Claim::AlreadySent(notification) => {
                tracing::debug!(
                    notification_id = %notification.id,
                    source_event_id = %notification.source_event_id,
                    "event already notified, not sending again"
                );
                return Ok(notification);
            }
            Claim::InProgress(notification) => {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "the email for event {} is being sent by another worker: retry later",
                        notification.source_event_id
                    ),
                ));
            }
        };

        // On a retry the claimed row keeps its first id, and with it the
        // file name and Message-ID.
        let delivered = match compose_message(&self.from, &recipient, &claimed.id, &email) {
            Ok(message) => self.mailer.send(&claimed.id, &message).await,
            Err(err) => Err(err),
        };
        match &delivered {
            Ok(()) => tracing::info!(
                notification_id = %claimed.id,
                source_event_id = %claimed.source_event_id,
                attempt = claimed.attempts,
                "notification sent"
            ),
            Err(err) => tracing::warn!(
                notification_id = %claimed.id,
                source_event_id = %claimed.source_event_id,
                attempt = claimed.attempts,
                reason = %err,
                "notification failed"
            ),
        }
        self.store
            .record_outcome(
                &claimed.id,
                claimed.attempts,
                delivered.map_err(|err| err.reason().to_owned()),
            )
            .await
    }
}
