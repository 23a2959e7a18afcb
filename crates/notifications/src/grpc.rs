//! `agora.notifications.v1.NotificationService` over a [`NotificationStore`]:
//! validates requests, decides whose notifications a caller may list, and
//! maps them to protobuf.

use std::sync::Arc;

use agora_platform::auth::{Caller, TokenVerifier};
use agora_platform::error::{Error, ErrorKind, Result, Violations};
use agora_platform::pagination::{Cursor, next_page, page_size};
use agora_platform::time::micros_to_timestamp;
use agora_proto::notifications::v1 as pb;
use agora_proto::notifications::v1::notification_service_server::NotificationService;
use tonic::{Request, Response, Status};

use crate::domain::{Email, Notification, NotificationStatus};
use crate::store::NotificationStore;

/// The gRPC service.
pub struct NotificationApi<S> {
    store: Arc<S>,
    verifier: TokenVerifier,
}

impl<S: NotificationStore> NotificationApi<S> {
    /// The service over `store`, checking callers with `verifier`.
    pub fn new(store: S, verifier: TokenVerifier) -> Self {
        Self {
            store: Arc::new(store),
            verifier,
        }
    }
}

#[tonic::async_trait]
impl<S: NotificationStore> NotificationService for NotificationApi<S> {
    /// Lists notifications, newest first, in pages.
    ///
    /// Whose notifications a caller sees:
    /// - A user: their own, meaning those whose owner is the user id of their
    ///   token (its `sub`). The email in the token plays no part (it may be
    ///   missing): addresses are not verified and can change hands, so an
    ///   address that once was someone else's shows nothing of theirs. A
    ///   `recipient`, if given, keeps only those of the user's own
    ///   notifications that were sent to that address. It can only narrow the
    ///   list: an address that is not theirs gives an empty list, not
    ///   PERMISSION_DENIED.
    /// - An admin: every notification sent to `recipient`, whoever it
    ///   belongs to. `recipient` is required (INVALID_ARGUMENT otherwise).
    /// - A service: PERMISSION_DENIED. No token: UNAUTHENTICATED.
    async fn list_notifications(
        &self,
        request: Request<pb::ListNotificationsRequest>,
    ) -> Result<Response<pb::ListNotificationsResponse>, Status> {
        let caller = self.verifier.caller_of(&request)?;
        caller.require_authenticated()?;
        if caller.is_service() {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                "notifications are listed by users and admins only",
            )
            .into());
        }
        let req = request.into_inner();
        let mut violations = Violations::default();
        let size = violations.absorb("page_size", page_size(req.page_size));
        let cursor = violations.absorb("page_token", Cursor::decode(&req.page_token));
        let named = if req.recipient.trim().is_empty() {
            if caller.is_admin() {
                // An admin's own address is rarely what they mean: make them say.
                violations.add(
                    "recipient",
                    "is required for admins: name the address whose notifications to list",
                );
            }
            None
        } else {
            violations.check("recipient", Email::parse(&req.recipient))
        };
        violations.finish()?;
        let (Some(size), Some(cursor)) = (size, cursor) else {
            return Err(Error::new(ErrorKind::Internal, "validation passed without values").into());
        };

        let limit = size.saturating_add(1);
        let rows = match visible_scope(&caller, named)? {
            Scope::Own { user_id, recipient } => {
                self.store
                    .list_for_user(
                        user_id,
                        recipient.as_ref().map(Email::as_str),
                        cursor.as_ref(),
                        limit,
                    )
                    .await?
            }
            Scope::Recipient(recipient) => {
                self.store
                    .list_for_recipient(recipient.as_str(), cursor.as_ref(), limit)
                    .await?
            }
        };
        let (page, next_page_token) = next_page(rows, size, |n| Cursor {
            key: n.created_at,
            id: n.id.clone(),
        });
        Ok(Response::new(pb::ListNotificationsResponse {
            notifications: page.iter().map(to_proto).collect(),
            next_page_token,
        }))
    }
}

/// Which notifications a `ListNotifications` caller gets.
#[derive(Debug, PartialEq, Eq)]
enum Scope<'a> {
    /// A user's own (owned by `user_id`, the token's subject), only those
    /// sent to `recipient` if one was named.
    Own {
        user_id: &'a str,
        recipient: Option<Email>,
    },
    /// Everything sent to one address, whoever owns it (admins only).
    Recipient(Email),
}

/// Whose notifications `caller` (authenticated, not a service) gets for the
/// validated `named` recipient: admins anyone's at the address they name;
/// users their own, by user id, narrowed to `named` when given. The token's
/// email is never consulted: it does not prove ownership of anything.
fn visible_scope(caller: &Caller, named: Option<Email>) -> Result<Scope<'_>> {
    if caller.is_admin() {
        return named
            .map(Scope::Recipient)
            .ok_or_else(|| Error::invalid_field("recipient", "must not be empty"));
    }
    let user_id = caller.user_id().ok_or_else(|| {
        Error::new(
            ErrorKind::PermissionDenied,
            "notifications are listed by users and admins only",
        )
    })?;
    Ok(Scope::Own {
        user_id,
        recipient: named,
    })
}

fn status_to_proto(status: NotificationStatus) -> pb::NotificationStatus {
    match status {
        // The contract has no in-flight status: a claimed, not yet finished
        // delivery is neither sent nor failed.
        NotificationStatus::Sending => pb::NotificationStatus::Unspecified,
        NotificationStatus::Sent => pb::NotificationStatus::Sent,
        NotificationStatus::Failed => pb::NotificationStatus::Failed,
    }
}

/// The protobuf view of a stored notification.
pub fn to_proto(notification: &Notification) -> pb::Notification {
    pb::Notification {
        id: notification.id.clone(),
        recipient: notification.recipient.clone(),
        subject: notification.subject.clone(),
        body_text: notification.body_text.clone(),
        status: status_to_proto(notification.status) as i32,
        failure_reason: notification.failure_reason.clone(),
        source_event_type: notification.source_event_type.clone(),
        source_event_id: notification.source_event_id.clone(),
        created_at: Some(micros_to_timestamp(notification.created_at)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str, email: Option<&str>, roles: &[&str]) -> Caller {
        Caller::User {
            id: id.to_owned(),
            email: email.map(str::to_owned),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        }
    }

    fn email(raw: &str) -> Email {
        Email::parse(raw).expect("valid email")
    }

    #[test]
    fn users_get_their_own_by_id_whatever_their_token_email() {
        for token_email in [None, Some("ada@example.com"), Some("not an email")] {
            let ada = user("u-ada", token_email, &[]);
            assert_eq!(
                visible_scope(&ada, None).ok(),
                Some(Scope::Own {
                    user_id: "u-ada",
                    recipient: None
                })
            );
            // Naming any address narrows their own list, never widens it.
            assert_eq!(
                visible_scope(&ada, Some(email("grace@example.com"))).ok(),
                Some(Scope::Own {
                    user_id: "u-ada",
                    recipient: Some(email("grace@example.com"))
                })
            );
        }
    }

    #[test]
    fn admins_list_by_the_recipient_they_name() {
        let admin = user("u-admin", Some("admin@example.com"), &["admin"]);
        assert_eq!(
            visible_scope(&admin, Some(email("ada@example.com"))).ok(),
            Some(Scope::Recipient(email("ada@example.com")))
        );
        let err = visible_scope(&admin, None).expect_err("no recipient");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn services_and_anonymous_callers_have_no_scope() {
        for caller in [
            Caller::Anonymous,
            Caller::Service {
                name: "orders".into(),
            },
        ] {
            let err = visible_scope(&caller, None).expect_err("not a user");
            assert_eq!(err.kind(), ErrorKind::PermissionDenied);
        }
    }
}
