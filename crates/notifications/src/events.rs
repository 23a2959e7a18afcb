//! The notifications service's event consumer: it keeps the directory of
//! recipients from the users service's events and emails users about their
//! sign-up and their orders.
//!
//! In the consumer's transaction (once per event, with the inbox row) it
//! updates the directory, or, for an order event, checks that the user's
//! address is known: an order event that arrives before the user's
//! `UserCreated` fails and is retried later, never dropped. After the commit
//! it sends the email through [`Notifier`], idempotent per event id, so a
//! redelivery never sends twice and a failed send is retried.

use agora_platform::db::Db;
use agora_platform::error::{Error, ErrorKind, Result};
use agora_platform_events::{BoxFuture, Delivery, DomainEvent, EventHandler, UnitOfWork};
use agora_proto::orders::v1 as orders;
use agora_proto::users::v1 as users;

use crate::directory;
use crate::domain::NotificationStatus;
use crate::mailer::PERMANENT_SMTP;
use crate::notifier::{NotificationRequest, Notifier};
use crate::templates::TemplateData;

/// The consumer's name: its durable consumers are `notifications-users` and
/// `notifications-orders`, its inbox rows are keyed by it.
pub const CONSUMER: &str = "notifications";

/// What it consumes.
pub const SUBJECTS: &[&str] = &[
    users::UserCreated::SUBJECT,
    users::UserEmailUpdated::SUBJECT,
    orders::OrderCompleted::SUBJECT,
    orders::OrderCancelled::SUBJECT,
    orders::OrderFailed::SUBJECT,
];

/// The [`EventHandler`] of the notifications service.
#[derive(Clone, Debug)]
pub struct NotificationEvents {
    notifier: Notifier,
    db: Db,
}

impl NotificationEvents {
    /// Sends through `notifier`, reads the directory in `db`.
    pub fn new(notifier: Notifier, db: Db) -> Self {
        Self { notifier, db }
    }
}

/// An event that asks for an email, decoded.
enum Emailed {
    Welcome(users::UserCreated),
    OrderCompleted(orders::OrderCompleted),
    OrderCancelled(orders::OrderCancelled),
    OrderFailed(orders::OrderFailed),
}

impl Emailed {
    /// The email `event` asks for, if any.
    fn decode(event: &Delivery) -> Result<Option<Self>> {
        Ok(Some(match event.event_type.as_str() {
            users::UserCreated::TYPE => Self::Welcome(event.decode()?),
            orders::OrderCompleted::TYPE => Self::OrderCompleted(event.decode()?),
            orders::OrderCancelled::TYPE => Self::OrderCancelled(event.decode()?),
            orders::OrderFailed::TYPE => Self::OrderFailed(event.decode()?),
            _ => return Ok(None),
        }))
    }

    /// Whom it is for.
    fn user_id(&self) -> &str {
        match self {
            Self::Welcome(e) => &e.user_id,
            Self::OrderCompleted(e) => &e.user_id,
            Self::OrderCancelled(e) => &e.user_id,
            Self::OrderFailed(e) => &e.user_id,
        }
    }

    /// The request for the email to `recipient`.
    fn request(&self, event: &Delivery, recipient: &str) -> NotificationRequest {
        let (kind, id) = (event.event_type.as_str(), event.event_id.as_str());
        let template = match self {
            Self::Welcome(e) => return NotificationRequest::user_created(kind, id, e, recipient),
            Self::OrderCompleted(e) => {
                return NotificationRequest::order_completed(kind, id, e, recipient);
            }
            Self::OrderCancelled(e) => TemplateData::OrderCancelled {
                order_id: e.order_id.clone(),
                reason: e.reason.clone(),
            },
            Self::OrderFailed(e) => TemplateData::OrderFailed {
                order_id: e.order_id.clone(),
                reason: e.reason.clone(),
            },
        };
        NotificationRequest::for_event(kind, id, self.user_id(), recipient, template)
    }
}

fn unknown_recipient(user_id: &str) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("no address for user {user_id} yet (waiting for their UserCreated): retry later"),
    )
}

impl EventHandler for NotificationEvents {
    fn handle<'a>(
        &'a self,
        event: &'a Delivery,
        work: &'a mut UnitOfWork,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            match event.event_type.as_str() {
                users::UserCreated::TYPE => {
                    let created: users::UserCreated = event.decode()?;
                    directory::record(
                        work.tx(),
                        &created.user_id,
                        &created.email,
                        Some(&created.name),
                        created.version,
                    )
                    .await?;
                }
                users::UserEmailUpdated::TYPE => {
                    let updated: users::UserEmailUpdated = event.decode()?;
                    directory::record(
                        work.tx(),
                        &updated.user_id,
                        &updated.new_email,
                        None,
                        updated.version,
                    )
                    .await?;
                }
                _ => {
                    // An order email needs the user's address: check now, so
                    // that the inbox row is only written once it is known.
                    if let Some(emailed) = Emailed::decode(event)?
                        && directory::find(work.tx(), emailed.user_id())
                            .await?
                            .is_none()
                    {
                        return Err(unknown_recipient(emailed.user_id()));
                    }
                }
            }
            Ok(())
        })
    }

    fn after_commit<'a>(&'a self, event: &'a Delivery) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let Some(emailed) = Emailed::decode(event)? else {
                return Ok(());
            };
            // The address the user has now, which may be newer than the event.
            let recipient = directory::lookup(&self.db, emailed.user_id())
                .await?
                .ok_or_else(|| unknown_recipient(emailed.user_id()))?;
            let request = emailed.request(event, &recipient.email);
            let notification = self.notifier.notify(&request).await?;
            if notification.status == NotificationStatus::Failed {
                // The SMTP server said no for good: retry a few times, not a day.
                let kind = if notification.failure_reason.starts_with(PERMANENT_SMTP) {
                    ErrorKind::InvalidArgument
                } else {
                    ErrorKind::Unavailable
                };
                return Err(Error::new(
                    kind,
                    format!(
                        "email {} not delivered: {}",
                        notification.id, notification.failure_reason
                    ),
                ));
            }
            Ok(())
        })
    }
}
