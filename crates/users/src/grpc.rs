//! `agora.users.v1.UserService` over a [`UserStore`]: validates requests,
//! decides who may do what, hashes passwords off the async runtime and
//! bounded ([`Passwords`]), and maps states and events to protobuf.

use std::sync::Arc;

use agora_platform::auth::{Caller, TokenIssuer, TokenVerifier};
use agora_platform::config::Secret;
use agora_platform::error::{Error, ErrorKind, Result, Violations};
use agora_platform::ids::UserId;
use agora_platform::time::micros_to_timestamp;
use agora_proto::users::v1 as pb;
use agora_proto::users::v1::user_service_server::UserService;
use tonic::{Request, Response, Status};

use crate::domain::{Email, UserName};
use crate::events::{StoredEvent, UserEventData, UserState, UserStatus};
use crate::passwords::Passwords;
use crate::store::UserStore;

/// How often a write without `expected_version` is retried after losing a
/// race to a concurrent writer before ABORTED reaches the client.
const CONFLICT_RETRIES: usize = 3;

/// The services that may read any user with `GetUser`. The contract allows
/// services; no service calls it yet, and orders is the one whose checkout
/// may need to (the tests read a user as orders). Add a caller here when it
/// starts calling.
const GET_USER_CALLERS: &[&str] = &["orders"];

/// The gRPC service.
pub struct UserApi<S> {
    store: Arc<S>,
    issuer: TokenIssuer,
    verifier: TokenVerifier,
    /// Every password hash and verification goes through it.
    passwords: Passwords,
    /// Normalized emails that may claim the admin bootstrap at sign-up.
    admin_emails: Vec<String>,
}

impl<S: UserStore> UserApi<S> {
    /// The service over `store`, issuing tokens with `issuer`, checking
    /// callers with `verifier` and hashing with `passwords`.
    pub fn new(
        store: S,
        issuer: TokenIssuer,
        verifier: TokenVerifier,
        passwords: Passwords,
    ) -> Self {
        Self {
            store: Arc::new(store),
            issuer,
            verifier,
            passwords,
            admin_emails: Vec::new(),
        }
    }

    /// The first user to sign up with one of these emails gets the admin
    /// role: the bootstrap of the first admin, claimed once in the same
    /// transaction that creates the user ([`UserStore::create`]), so that
    /// racing sign-ups make exactly one admin and the others plain users, and
    /// closed for ever after (a listed address freed later by an email change
    /// cannot be taken over). Invalid addresses are ignored.
    pub fn with_admin_emails(mut self, emails: &[String]) -> Self {
        self.admin_emails = emails
            .iter()
            .filter_map(|email| Email::parse(email).ok())
            .map(|email| email.as_str().to_owned())
            .collect();
        self
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<Caller> {
        self.verifier.caller_of(request)
    }

    /// Whether signing up with `email` may claim the admin bootstrap.
    fn may_bootstrap_admin(&self, email: &Email) -> bool {
        self.admin_emails.iter().any(|e| e == email.as_str())
    }

    /// Appends an event, retrying lost races when the client did not pin a version.
    async fn append<F>(&self, user_id: &str, expected: Option<i64>, decide: F) -> Result<UserState>
    where
        F: Fn(&UserState) -> Result<Option<UserEventData>> + Send + Sync,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.store.append(user_id, expected, &decide).await {
                Err(err)
                    if err.kind() == ErrorKind::Conflict
                        && expected.is_none()
                        && attempt < CONFLICT_RETRIES => {}
                other => return other,
            }
        }
    }

    /// The user `id` as seen by `caller`: NOT_FOUND both when it does not exist
    /// and when the caller may not see it, so ids cannot be probed. The user
    /// themself and admins may see it, and the services in `services`.
    async fn visible_user(
        &self,
        caller: &Caller,
        id: &str,
        services: &[&str],
    ) -> Result<UserState> {
        caller.require_authenticated()?;
        let allowed = caller.is_user(id)
            || caller.is_admin()
            || (caller.is_service() && caller.require_service_from(services).is_ok());
        let user = if allowed {
            self.store.get(id).await?
        } else {
            None
        };
        user.ok_or_else(|| Error::not_found(format_args!("user {id}")))
    }
}

#[tonic::async_trait]
impl<S: UserStore> UserService for UserApi<S> {
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let req = request.into_inner();
        let mut violations = Violations::default();
        let email = violations.check("email", Email::parse(&req.email));
        let name = violations.check("name", UserName::parse(&req.name));
        let password = violations.check("password", self.passwords.parse_new(&req.password));
        violations.finish()?;
        let (Some(email), Some(name), Some(password)) = (email, name, password) else {
            return Err(Error::new(ErrorKind::Internal, "validation passed without values").into());
        };
        if self.store.find_by_email(email.as_str()).await?.is_some() {
            return Err(Error::new(ErrorKind::AlreadyExists, "email is already registered").into());
        }
        let password_hash = self.passwords.hash(password).await?;
        let user_id = uuid::Uuid::now_v7().to_string();
        let created = UserEventData::UserCreated {
            email: email.as_str().to_owned(),
            name: name.as_str().to_owned(),
            password_hash: Secret::new(password_hash),
            roles: Vec::new(),
        };
        let claim_admin = self.may_bootstrap_admin(&email);
        let user = self.store.create(&user_id, created, claim_admin).await?;
        tracing::info!(user_id = %user.id, roles = ?user.roles, "user created");
        Ok(Response::new(pb::CreateUserResponse {
            user: Some(to_proto(&user)),
        }))
    }

    async fn authenticate(
        &self,
        request: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        let req = request.into_inner();
        let mut violations = Violations::default();
        let email = violations.check("email", Email::parse(&req.email));
        // Before any database or hashing work: an over-long password costs
        // nothing but this check.
        violations.check("password", self.passwords.check_length(&req.password));
        violations.finish()?;
        let Some(email) = email else {
            return Err(Error::new(ErrorKind::Internal, "validation passed without values").into());
        };
        let user = self.store.find_by_email(email.as_str()).await?;
        // An unknown email is verified against a dummy hash, so that the
        // answer costs as much as for a wrong password and reveals nothing.
        let hash = user
            .as_ref()
            .map(|user| user.password_hash.expose().clone());
        let matches = self.passwords.verify(req.password, hash).await?;
        let user = match user {
            Some(user) if matches => user,
            _ => {
                return Err(
                    Error::new(ErrorKind::Unauthenticated, "invalid email or password").into(),
                );
            }
        };
        let token = self
            .issuer
            .issue_user_token(&user.id, &user.email, &user.roles)?;
        Ok(Response::new(pb::AuthenticateResponse {
            access_token: token.token,
            expires_at: Some(prost_types::Timestamp {
                seconds: token.expires_at,
                nanos: 0,
            }),
            user: Some(to_proto(&user)),
        }))
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let caller = self.caller(&request)?;
        caller.require_authenticated()?;
        let id = parse_id(&request.get_ref().id)?;
        let user = self.visible_user(&caller, &id, GET_USER_CALLERS).await?;
        Ok(Response::new(pb::GetUserResponse {
            user: Some(to_proto(&user)),
        }))
    }

    async fn update_email(
        &self,
        request: Request<pb::UpdateEmailRequest>,
    ) -> Result<Response<pb::UpdateEmailResponse>, Status> {
        let caller = self.caller(&request)?;
        caller.require_authenticated()?;
        let req = request.into_inner();
        let mut violations = Violations::default();
        let id = violations.check("id", UserId::parse(&req.id));
        let email = violations.check("email", Email::parse(&req.email));
        violations.finish()?;
        let (Some(id), Some(email)) = (id, email) else {
            return Err(Error::new(ErrorKind::Internal, "validation passed without values").into());
        };
        if !caller.is_user(id.as_str()) {
            // Only the user themself may change their email.
            return Err(Error::not_found(format_args!("user {id}")).into());
        }
        let user = self
            .append(id.as_str(), req.expected_version, |state| {
                Ok(state.decide_update_email(&email))
            })
            .await?;
        Ok(Response::new(pb::UpdateEmailResponse {
            user: Some(to_proto(&user)),
        }))
    }

    async fn activate_user(
        &self,
        request: Request<pb::ActivateUserRequest>,
    ) -> Result<Response<pb::ActivateUserResponse>, Status> {
        let caller = self.caller(&request)?;
        caller.require_admin()?;
        let req = request.into_inner();
        let id = parse_id(&req.id)?;
        let admin_id = caller.user_id().unwrap_or_default().to_owned();
        let user = self
            .append(&id, req.expected_version, |state| {
                Ok(state.decide_activate(&admin_id))
            })
            .await?;
        Ok(Response::new(pb::ActivateUserResponse {
            user: Some(to_proto(&user)),
        }))
    }

    async fn list_user_events(
        &self,
        request: Request<pb::ListUserEventsRequest>,
    ) -> Result<Response<pb::ListUserEventsResponse>, Status> {
        let caller = self.caller(&request)?;
        caller.require_authenticated()?;
        let id = parse_id(&request.get_ref().id)?;
        self.visible_user(&caller, &id, &[]).await?;
        let events = self.store.events(&id).await?;
        Ok(Response::new(pb::ListUserEventsResponse {
            events: events.iter().map(event_to_proto).collect(),
        }))
    }
}

fn parse_id(raw: &str) -> Result<String> {
    UserId::parse(raw)
        .map(|id| id.as_str().to_owned())
        .map_err(|reason| Error::invalid_field("id", reason))
}

fn status_to_proto(status: UserStatus) -> pb::UserStatus {
    match status {
        UserStatus::Pending => pb::UserStatus::Pending,
        UserStatus::Active => pb::UserStatus::Active,
    }
}

/// The protobuf view of a user's state.
pub fn to_proto(user: &UserState) -> pb::User {
    pb::User {
        id: user.id.clone(),
        email: user.email.clone(),
        name: user.name.clone(),
        status: status_to_proto(user.status) as i32,
        roles: user.roles.clone(),
        created_at: Some(micros_to_timestamp(user.created_at)),
        updated_at: Some(micros_to_timestamp(user.updated_at)),
        version: user.version,
    }
}

/// The protobuf view of a stored event; credentials stay behind.
pub fn event_to_proto(event: &StoredEvent) -> pb::UserEvent {
    let payload = event.to_published();
    pb::UserEvent {
        event_id: event.event_id.clone(),
        user_id: event.user_id.clone(),
        version: event.version,
        occurred_at: Some(micros_to_timestamp(event.occurred_at)),
        event: Some(payload),
    }
}
