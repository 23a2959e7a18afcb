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
    async fn list_notifications(
        &self,
        request: Request<pb::ListNotificationsRequest>,
    ) -> Result<Response<pb::ListNotificationsResponse>, Status> {
        let caller = self.verifier.caller(request.metadata())?;
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
        let recipient = visible_recipient(&caller, named)?;

        let rows = self
            .store
            .list_for_recipient(recipient.as_str(), cursor.as_ref(), size.saturating_add(1))
            .await?;
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

/// Whose notifications `caller` gets for the (validated) `named` recipient:
/// admins anyone's they name; users their own, which is also what an empty
/// recipient means for them.
fn visible_recipient(caller: &Caller, named: Option<Email>) -> Result<Email> {
    if caller.is_admin() {
        return named.ok_or_else(|| Error::invalid_field("recipient", "must not be empty"));
    }
    let own = match caller {
        Caller::User {
            email: Some(email), ..
        } => Email::parse(email).ok(),
        _ => None,
    };
    let Some(own) = own else {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            "the access token carries no email address to list notifications for",
        ));
    };
    match named {
        Some(named) if named != own => Err(Error::new(
            ErrorKind::PermissionDenied,
            "users may list only their own notifications",
        )),
        _ => Ok(own),
    }
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
