//! The user event history and the state it folds into.
//!
//! [`UserEventData`] is what is stored (as JSON) for each event. The stored
//! `Created` event keeps the password hash, because the state must be
//! rebuildable from events alone; the protobuf events that leave the service
//! (`agora.users.v1.UserCreated` ...) never carry it.

use agora_platform::config::Secret;
use serde::{Deserialize, Serialize};

use crate::domain::Email;

/// Where a user is in their lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserStatus {
    /// Signed up, not yet activated.
    Pending,
    /// Activated by an admin.
    Active,
}

impl UserStatus {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "pending" => Some(Self::Pending),
            "active" => Some(Self::Active),
            _ => None,
        }
    }
}

/// What happened to a user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum UserEventData {
    /// The user signed up.
    UserCreated {
        /// Normalized email.
        email: String,
        /// Display name.
        name: String,
        /// argon2id PHC string; redacted in `Debug`.
        password_hash: Secret<String>,
        /// Granted roles.
        roles: Vec<String>,
    },
    /// The user changed their email.
    UserEmailUpdated {
        /// The email before.
        old_email: String,
        /// The email after.
        new_email: String,
    },
    /// An admin activated the user.
    UserActivated {
        /// The admin's user id.
        activated_by: String,
    },
}

impl UserEventData {
    /// The event type as stored and as published (`ce-type` suffix).
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::UserCreated { .. } => "user_created",
            Self::UserEmailUpdated { .. } => "user_email_updated",
            Self::UserActivated { .. } => "user_activated",
        }
    }
}

/// One event of a user's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    /// UUIDv7.
    pub event_id: String,
    /// The user it belongs to.
    pub user_id: String,
    /// Position in the user's history, from 1.
    pub version: i64,
    /// Microseconds since the epoch.
    pub occurred_at: i64,
    /// What happened.
    pub data: UserEventData,
}

impl StoredEvent {
    /// The event as it leaves the service (published on NATS, listed by
    /// `ListUserEvents`): the protobuf message, without the password hash.
    pub fn to_published(&self) -> agora_proto::users::v1::user_event::Event {
        use agora_proto::users::v1 as pb;
        use agora_proto::users::v1::user_event::Event;
        let user_id = self.user_id.clone();
        let version = self.version;
        match &self.data {
            UserEventData::UserCreated {
                email, name, roles, ..
            } => Event::UserCreated(pb::UserCreated {
                user_id,
                email: email.clone(),
                name: name.clone(),
                roles: roles.clone(),
                version,
            }),
            UserEventData::UserEmailUpdated {
                old_email,
                new_email,
            } => Event::UserEmailUpdated(pb::UserEmailUpdated {
                user_id,
                old_email: old_email.clone(),
                new_email: new_email.clone(),
                version,
            }),
            UserEventData::UserActivated { activated_by } => {
                Event::UserActivated(pb::UserActivated {
                    user_id,
                    activated_by: activated_by.clone(),
                    version,
                })
            }
        }
    }
}

/// A user's current state: the fold of their events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserState {
    /// UUIDv7.
    pub id: String,
    /// Normalized email.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Lifecycle status.
    pub status: UserStatus,
    /// Granted roles.
    pub roles: Vec<String>,
    /// argon2id PHC string; redacted in `Debug`.
    pub password_hash: Secret<String>,
    /// When the first event happened (microseconds).
    pub created_at: i64,
    /// When the last event happened (microseconds).
    pub updated_at: i64,
    /// The number of events applied.
    pub version: i64,
}

/// An event that does not fit the history it is applied to: the store is
/// corrupt or was written by an incompatible version.
#[derive(Debug, thiserror::Error)]
#[error("event {version} of user {user_id} cannot be applied: {reason}")]
pub struct ReplayError {
    user_id: String,
    version: i64,
    reason: &'static str,
}

impl UserState {
    /// Applies one event to the state so far (`None` before the first event).
    pub fn apply(state: Option<Self>, event: &StoredEvent) -> Result<Self, ReplayError> {
        let fail = |reason| ReplayError {
            user_id: event.user_id.clone(),
            version: event.version,
            reason,
        };
        let expected_version = state.as_ref().map_or(1, |s| s.version + 1);
        if event.version != expected_version {
            return Err(fail("version out of sequence"));
        }
        let mut next = match (state, &event.data) {
            (
                None,
                UserEventData::UserCreated {
                    email,
                    name,
                    password_hash,
                    roles,
                },
            ) => Self {
                id: event.user_id.clone(),
                email: email.clone(),
                name: name.clone(),
                status: UserStatus::Pending,
                roles: roles.clone(),
                password_hash: password_hash.clone(),
                created_at: event.occurred_at,
                updated_at: event.occurred_at,
                version: 0,
            },
            (None, _) => return Err(fail("history does not start with user_created")),
            (Some(_), UserEventData::UserCreated { .. }) => {
                return Err(fail("user_created after the first event"));
            }
            (Some(mut state), UserEventData::UserEmailUpdated { new_email, .. }) => {
                state.email = new_email.clone();
                state
            }
            (Some(mut state), UserEventData::UserActivated { .. }) => {
                state.status = UserStatus::Active;
                state
            }
        };
        next.version = event.version;
        next.updated_at = event.occurred_at;
        Ok(next)
    }

    /// Rebuilds a user from their whole history, oldest first.
    pub fn replay<'a>(
        events: impl IntoIterator<Item = &'a StoredEvent>,
    ) -> Result<Option<Self>, ReplayError> {
        let mut state = None;
        for event in events {
            state = Some(Self::apply(state, event)?);
        }
        Ok(state)
    }

    /// The event for an email change, or `None` when the email is unchanged.
    pub fn decide_update_email(&self, email: &Email) -> Option<UserEventData> {
        (self.email != email.as_str()).then(|| UserEventData::UserEmailUpdated {
            old_email: self.email.clone(),
            new_email: email.as_str().to_owned(),
        })
    }

    /// The event for an activation, or `None` when already active.
    pub fn decide_activate(&self, admin_id: &str) -> Option<UserEventData> {
        (self.status != UserStatus::Active).then(|| UserEventData::UserActivated {
            activated_by: admin_id.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(version: i64, data: UserEventData) -> StoredEvent {
        StoredEvent {
            event_id: format!("e{version}"),
            user_id: "u1".into(),
            version,
            occurred_at: version * 10,
            data,
        }
    }

    fn created() -> UserEventData {
        UserEventData::UserCreated {
            email: "a@x.io".into(),
            name: "Ada".into(),
            password_hash: Secret::new("h".into()),
            roles: vec![],
        }
    }

    #[test]
    fn replay_folds_every_event_in_order() {
        let history = [
            event(1, created()),
            event(
                2,
                UserEventData::UserEmailUpdated {
                    old_email: "a@x.io".into(),
                    new_email: "b@x.io".into(),
                },
            ),
            event(
                3,
                UserEventData::UserActivated {
                    activated_by: "admin".into(),
                },
            ),
        ];
        let state = UserState::replay(&history).expect("valid").expect("exists");
        assert_eq!(state.email, "b@x.io");
        assert_eq!(state.status, UserStatus::Active);
        assert_eq!(state.version, 3);
        assert_eq!((state.created_at, state.updated_at), (10, 30));
    }

    #[test]
    fn replay_rejects_broken_histories() {
        assert!(UserState::replay(&[event(2, created())]).is_err());
        assert!(
            UserState::replay(&[event(
                1,
                UserEventData::UserActivated {
                    activated_by: "x".into()
                }
            )])
            .is_err()
        );
        assert!(UserState::replay(&[event(1, created()), event(2, created())]).is_err());
        assert_eq!(UserState::replay(&[]).expect("empty is fine"), None);
    }

    #[test]
    fn unchanged_values_decide_no_event() {
        let state = UserState::replay(&[event(1, created())])
            .expect("valid")
            .expect("exists");
        let same = Email::parse("A@x.io").expect("valid");
        assert_eq!(state.decide_update_email(&same), None);
        assert!(state.decide_activate("admin").is_some());
    }

    #[test]
    fn stored_json_is_tagged_by_event_type() {
        let json = serde_json::to_value(created()).expect("serialize");
        assert_eq!(json["type"], "user_created");
        assert_eq!(created().event_type(), "user_created");
    }
}
