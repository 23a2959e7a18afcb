//! Tokens and callers.
//!
//! Two kinds of token, signed with different keys:
//! - **User tokens.** Users log in to the users service, which signs an EdDSA
//!   (Ed25519) JWT with the user-token private key ([`TokenIssuer`]); only
//!   the users process holds that key. The header `kid` names the key,
//!   `user-` and a digest of its public half ([`user_key_id`]), so that
//!   verifiers can hold several user keys while the key is rotated: the
//!   current one and those in `auth.additional_public_key_files`.
//! - **Service tokens.** A service calling another one's internal RPC signs a
//!   short-lived JWT with a key of its own ([`ServiceTokenSigner`]): header
//!   `kid` and claim `sub` name the caller, `aud` the callee. So a service
//!   can speak only for itself, only to the service it addresses, and a
//!   stolen token is soon worthless.
//!
//! Every service verifies both kinds ([`TokenVerifier`], which knows the
//! service it verifies for and every service's public key) and turns the
//! `authorization` metadata of a request into a [`Caller`]; authorization
//! decisions are made from that, inside each service, never only at the
//! edge: each RPC declares in the contract who may call it, internal RPCs
//! the services they accept ([`crate::access`]), which every server checks
//! before the handler runs; handlers read the checked caller with
//! [`TokenVerifier::caller_of`] and decide what it may see.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;

use crate::config::{AuthConfig, Config, PUBLIC_KEY_FILE, SERVICE_PUBLIC_KEY_SUFFIX, Secret};
use crate::error::{Error, ErrorKind};

/// The role that grants admin access.
pub const ADMIN_ROLE: &str = "admin";

/// How the `kid` of a user token begins; no service name does, so a
/// verifier tells the two kinds of token apart before it picks a key.
pub const USER_KEY_ID_PREFIX: &str = "user-";

/// Clock difference between pods tolerated on `exp`, in seconds.
const CLOCK_LEEWAY_SECS: u64 = 30;

/// The longest lifetime (`exp - iat`) a service token may claim, whatever
/// `auth.service_token_ttl_secs` says: they are re-signed every few seconds.
pub const MAX_SERVICE_TOKEN_SECS: i64 = 3600;

/// Who a token speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// A person who logged in.
    User,
    /// Another Agora service, for internal-only RPCs.
    Service,
}

/// The claims of an Agora access token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer; must equal the configured `auth.issuer`.
    pub iss: String,
    /// Subject: the user id, or the calling service's name.
    pub sub: String,
    /// Audience: the service a service token is for (service tokens only;
    /// a user token carrying one is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Expires at, seconds since the epoch.
    pub exp: i64,
    /// Unique token id.
    pub jti: String,
    /// User or service token.
    pub kind: TokenKind,
    /// The user's email when the token was issued (user tokens only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Roles, for example `admin`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

/// Who made a request, as established from its verified token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// No token.
    Anonymous,
    /// A logged-in user.
    User {
        /// The user's id.
        id: String,
        /// The email in the token.
        email: Option<String>,
        /// The user's roles.
        roles: Vec<String>,
    },
    /// Another Agora service.
    Service {
        /// The service's name.
        name: String,
    },
}

impl Caller {
    /// Whether the caller is a user with the admin role.
    pub fn is_admin(&self) -> bool {
        matches!(self, Self::User { roles, .. } if roles.iter().any(|r| r == ADMIN_ROLE))
    }

    /// Whether the caller is another service.
    pub fn is_service(&self) -> bool {
        matches!(self, Self::Service { .. })
    }

    /// Whether the caller is the user `id`.
    pub fn is_user(&self, id: &str) -> bool {
        matches!(self, Self::User { id: own, .. } if own == id)
    }

    /// The user id of a user caller.
    pub fn user_id(&self) -> Option<&str> {
        match self {
            Self::User { id, .. } => Some(id),
            _ => None,
        }
    }

    /// UNAUTHENTICATED unless the request carried a valid token.
    pub fn require_authenticated(&self) -> Result<(), Error> {
        match self {
            Self::Anonymous => Err(Error::new(
                ErrorKind::Unauthenticated,
                "this call needs an access token (authorization: Bearer <token>)",
            )),
            _ => Ok(()),
        }
    }

    /// UNAUTHENTICATED for anonymous callers, PERMISSION_DENIED unless admin.
    pub fn require_admin(&self) -> Result<(), Error> {
        self.require_authenticated()?;
        if self.is_admin() {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::PermissionDenied,
                "admin role required",
            ))
        }
    }

    /// For internal RPCs: UNAUTHENTICATED for anonymous callers,
    /// PERMISSION_DENIED for users and for every service not in `allowed`
    /// (each internal RPC lists the services that need it, no more).
    pub fn require_service_from(&self, allowed: &[&str]) -> Result<(), Error> {
        self.require_authenticated()?;
        let allowed_list = if allowed.is_empty() {
            "no service".to_owned()
        } else {
            allowed.join(", ")
        };
        match self {
            Self::Service { name } if allowed.contains(&name.as_str()) => Ok(()),
            Self::Service { name } => Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("{name} may not call this; allowed: {allowed_list}"),
            )),
            _ => Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("this call is internal to Agora services; allowed: {allowed_list}"),
            )),
        }
    }
}

/// Signs user tokens. Only the users service (and operator tools such as
/// `agora seed`, and test kits) hold one.
#[derive(Clone)]
pub struct TokenIssuer {
    key: EncodingKey,
    /// EdDSA with `kid` = [`user_key_id`] of the key's public half.
    header: Header,
    issuer: String,
    ttl_secs: i64,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("kid", &self.header.kid)
            .field("issuer", &self.issuer)
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

/// A signed token and its expiry.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// The compact JWT.
    pub token: String,
    /// Expiry, seconds since the epoch.
    pub expires_at: i64,
}

impl TokenIssuer {
    /// An issuer from a PKCS#8 PEM private key.
    pub fn from_pem(private_pem: &[u8], issuer: &str, ttl_secs: u64) -> Result<Self, Error> {
        let key = EncodingKey::from_ed_pem(private_pem)
            .map_err(|err| Error::internal("reading the token signing key", err))?;
        let private_pem = std::str::from_utf8(private_pem)
            .map_err(|err| Error::internal("reading the token signing key", err))?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(user_key_id(&public_pem_from_private(private_pem)?)?);
        Ok(Self {
            key,
            header,
            issuer: issuer.to_owned(),
            ttl_secs: i64::try_from(ttl_secs).unwrap_or(i64::MAX),
        })
    }

    /// The issuer configured in `auth`: inline PEM or the key file.
    pub fn from_config(config: &AuthConfig) -> Result<Self, Error> {
        let pem = read_key(
            config.private_key_pem.as_ref().map(|p| p.expose().clone()),
            config.private_key_file.as_deref(),
            "auth.private_key_file",
        )?;
        Self::from_pem(pem.as_bytes(), &config.issuer, config.token_ttl_secs)
    }

    /// The `kid` of the tokens it signs: [`user_key_id`] of its key.
    pub fn key_id(&self) -> &str {
        self.header.kid.as_deref().unwrap_or_default()
    }

    /// Signs a user token. (Service tokens are signed by each service with
    /// its own key: [`ServiceTokenSigner`].)
    pub fn issue_user_token(
        &self,
        user_id: &str,
        email: &str,
        roles: &[String],
    ) -> Result<IssuedToken, Error> {
        let now = now_secs();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: user_id.to_owned(),
            aud: None,
            iat: now,
            exp: now.saturating_add(self.ttl_secs),
            jti: uuid::Uuid::now_v7().to_string(),
            kind: TokenKind::User,
            email: Some(email.to_owned()),
            roles: roles.to_vec(),
        };
        // `kid` names the user key (`user-...`), which tells a verifier both
        // that this is a user token and which of its user keys to check it with.
        let token = jsonwebtoken::encode(&self.header, &claims, &self.key)
            .map_err(|err| Error::internal("signing a token", err))?;
        Ok(IssuedToken {
            token,
            expires_at: claims.exp,
        })
    }
}

/// Signs the service tokens of one calling service, with that service's own
/// key, one token per target service (audience). Cheap to clone: clones
/// share the key and the token cache.
#[derive(Clone)]
pub struct ServiceTokenSigner {
    inner: Arc<SignerInner>,
}

struct SignerInner {
    key: EncodingKey,
    /// EdDSA with `kid` = the calling service: verifiers pick its key by it.
    header: Header,
    issuer: String,
    service: String,
    ttl_secs: i64,
    /// The last token signed per audience, reused while more than half of
    /// its lifetime is left: signing (~50 µs) is on every internal call's
    /// path. Audiences are the few service names, so this stays small.
    cache: Mutex<HashMap<String, IssuedToken>>,
}

impl std::fmt::Debug for ServiceTokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceTokenSigner")
            .field("service", &self.inner.service)
            .field("issuer", &self.inner.issuer)
            .field("ttl_secs", &self.inner.ttl_secs)
            .finish_non_exhaustive()
    }
}

impl ServiceTokenSigner {
    /// A signer for the calling service `service` from its PKCS#8 PEM
    /// private key; tokens live `ttl_secs` (at least one second).
    pub fn from_pem(
        private_pem: &[u8],
        issuer: &str,
        service: &str,
        ttl_secs: u64,
    ) -> Result<Self, Error> {
        let key = EncodingKey::from_ed_pem(private_pem).map_err(|err| {
            Error::internal(format!("reading the service token key of {service}"), err)
        })?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(service.to_owned());
        Ok(Self {
            inner: Arc::new(SignerInner {
                key,
                header,
                issuer: issuer.to_owned(),
                service: service.to_owned(),
                ttl_secs: i64::try_from(ttl_secs.max(1)).unwrap_or(i64::MAX),
                cache: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The signer of service `service` (`orders`, ...) as configured: its
    /// `<service>.signing_key_pem` or `<service>.signing_key_file`, the
    /// issuer and `auth.service_token_ttl_secs`.
    pub fn from_config(config: &Config, service: &str) -> Result<Self, Error> {
        let settings = config.service(service).ok_or_else(|| {
            Error::new(
                ErrorKind::FailedPrecondition,
                format!("no service called {service} to sign service tokens for"),
            )
        })?;
        let pem = read_key(
            settings
                .signing_key_pem
                .as_ref()
                .map(|p| p.expose().clone()),
            settings.signing_key_file.as_deref(),
            &format!("{service}.signing_key_file"),
        )?;
        if config.auth.service_token_ttl_secs > MAX_SERVICE_TOKEN_SECS.unsigned_abs() {
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "auth.service_token_ttl_secs must be at most {MAX_SERVICE_TOKEN_SECS}: \
                     verifiers refuse longer-lived service tokens"
                ),
            ));
        }
        Self::from_pem(
            pem.as_bytes(),
            &config.auth.issuer,
            service,
            config.auth.service_token_ttl_secs,
        )
    }

    /// The calling service these tokens speak for.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// A compact JWT for calling service `audience`: the cached one while
    /// more than half of its lifetime is left, else a freshly signed one.
    pub fn token_for(&self, audience: &str) -> Result<String, Error> {
        self.token_at(audience, now_secs())
    }

    /// [`Self::token_for`] at the time `now` (seconds since the epoch).
    fn token_at(&self, audience: &str, now: i64) -> Result<String, Error> {
        let inner = &self.inner;
        let cached = inner
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(audience)
            .filter(|token| {
                token.expires_at.saturating_sub(now).saturating_mul(2) >= inner.ttl_secs
            })
            .map(|token| token.token.clone());
        if let Some(token) = cached {
            return Ok(token);
        }
        // Signed outside the lock: callers for other audiences need not
        // wait; two racing callers both sign, which is harmless.
        let fresh = self.sign(audience, now)?;
        let token = fresh.token.clone();
        inner
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(audience.to_owned(), fresh);
        Ok(token)
    }

    fn sign(&self, audience: &str, now: i64) -> Result<IssuedToken, Error> {
        let inner = &self.inner;
        let claims = Claims {
            iss: inner.issuer.clone(),
            sub: inner.service.clone(),
            aud: Some(audience.to_owned()),
            iat: now,
            exp: now.saturating_add(inner.ttl_secs),
            jti: uuid::Uuid::now_v7().to_string(),
            kind: TokenKind::Service,
            email: None,
            roles: Vec::new(),
        };
        let token = jsonwebtoken::encode(&inner.header, &claims, &inner.key)
            .map_err(|err| Error::internal("signing a service token", err))?;
        Ok(IssuedToken {
            token,
            expires_at: claims.exp,
        })
    }
}

/// Verifies access tokens for one service; every service holds one.
///
/// The header `kid` decides how a token is checked:
/// - `user-...`: a user token, verified with the user-token public key of
///   that id (the current key or one of the additional keys accepted during
///   a rotation), and only with it; an id no configured key has is
///   UNAUTHENTICATED.
/// - none: a user token signed before user tokens named their key; it is
///   verified with the current user-token key only.
/// - anything else: a service token, verified with the public key of the
///   service `kid` names, whose `sub` must be that service and whose `aud`
///   must be the service verifying it.
///
/// Anything else (a service token signed with a user-token key, a user
/// token signed with a service key, an unknown `kid`, another audience, an
/// expired token) is UNAUTHENTICATED.
#[derive(Clone)]
pub struct TokenVerifier {
    /// User-token public keys by key id: the current one and any accepted
    /// during a rotation.
    user_keys: Arc<BTreeMap<String, DecodingKey>>,
    /// The id of the current user-token key, the one the users service
    /// signs with (it names no other key in `auth`).
    current_user_key: String,
    user_validation: Validation,
    /// The service this verifier verifies for: the only audience accepted.
    service: String,
    /// Calling service name -> the public key of its service tokens.
    service_keys: Arc<BTreeMap<String, DecodingKey>>,
    service_validation: Validation,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("service", &self.service)
            .field("current_user_key", &self.current_user_key)
            .field("user_keys", &self.user_keys.keys())
            .field("service_keys", &self.service_keys.keys())
            .finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// A verifier for service `service` that knows the current user-token
    /// public key (SPKI PEM) and no service key yet: add those with
    /// [`Self::with_service_key`], and the other user keys of a rotation
    /// with [`Self::with_user_key`].
    pub fn from_pem(user_public_pem: &[u8], issuer: &str, service: &str) -> Result<Self, Error> {
        let (kid, user_key) = user_decoding_key(user_public_pem)?;
        let mut user_validation = Validation::new(Algorithm::EdDSA);
        user_validation.set_issuer(&[issuer]);
        user_validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        // Tolerate small clock differences between pods.
        user_validation.leeway = CLOCK_LEEWAY_SECS;
        // A user token carries no audience; one that does is refused, since
        // no audience is expected here.
        let mut service_validation = user_validation.clone();
        service_validation.set_audience(&[service]);
        service_validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        Ok(Self {
            user_keys: Arc::new(BTreeMap::from([(kid.clone(), user_key)])),
            current_user_key: kid,
            user_validation,
            service: service.to_owned(),
            service_keys: Arc::new(BTreeMap::new()),
            service_validation,
        })
    }

    /// Also accepts user tokens signed with the key whose public half is
    /// `public_pem` (SPKI PEM), as named by their `kid`: the next key of a
    /// rotation, or the previous one. Tokens without `kid` still verify
    /// with the current key only.
    pub fn with_user_key(mut self, public_pem: &[u8]) -> Result<Self, Error> {
        let (kid, key) = user_decoding_key(public_pem)?;
        Arc::make_mut(&mut self.user_keys).insert(kid, key);
        Ok(self)
    }

    /// Trusts service tokens of `caller` signed with the key whose public
    /// half is `public_pem` (SPKI PEM).
    pub fn with_service_key(mut self, caller: &str, public_pem: &[u8]) -> Result<Self, Error> {
        if caller.starts_with(USER_KEY_ID_PREFIX) {
            // Its tokens' `kid` would read as a user key's.
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!("a service name may not begin with {USER_KEY_ID_PREFIX}: {caller}"),
            ));
        }
        let key = DecodingKey::from_ed_pem(public_pem).map_err(|err| {
            Error::new(
                ErrorKind::FailedPrecondition,
                format!("the service token public key of {caller} is not an Ed25519 SPKI PEM key"),
            )
            .with_source(err)
        })?;
        Arc::make_mut(&mut self.service_keys).insert(caller.to_owned(), key);
        Ok(self)
    }

    /// The verifier of service `service` as configured in `auth`: the
    /// current user-token public key (inline or file, or derived from the
    /// private key when only that is configured), the additional user keys
    /// of a rotation (`auth.additional_public_key_files`, then
    /// `auth.additional_public_keys`) and every service public key
    /// (`auth.service_public_key_dir`, then `auth.service_public_keys`).
    pub fn for_service(config: &AuthConfig, service: &str) -> Result<Self, Error> {
        let public = read_key(
            config.public_key_pem.clone(),
            config.public_key_file.as_deref(),
            "auth.public_key_file",
        );
        let pem = match public {
            Ok(pem) => pem,
            Err(missing) => {
                let private = read_key(
                    config.private_key_pem.as_ref().map(|p| p.expose().clone()),
                    config.private_key_file.as_deref(),
                    "auth.private_key_file",
                )
                .map_err(|_| missing)?;
                public_pem_from_private(&private)?
            }
        };
        let mut verifier = Self::from_pem(pem.as_bytes(), &config.issuer, service)?;
        for file in &config.additional_public_key_files {
            let pem = read_key(None, Some(file), "auth.additional_public_key_files")?;
            verifier = verifier.with_user_key(pem.as_bytes())?;
        }
        for pem in &config.additional_public_keys {
            verifier = verifier.with_user_key(pem.as_bytes())?;
        }
        let mut service_keys = match &config.service_public_key_dir {
            Some(dir) => service_public_keys_in(dir)?,
            None => BTreeMap::new(),
        };
        service_keys.extend(config.service_public_keys.clone());
        if service_keys.is_empty() {
            // Not fatal (a service may accept no service calls at all), but
            // every service token will be refused.
            tracing::warn!(
                service,
                "no service public keys configured (auth.service_public_keys or \
                 auth.service_public_key_dir): service tokens will be refused"
            );
        }
        for (caller, public_pem) in service_keys {
            verifier = verifier.with_service_key(&caller, public_pem.as_bytes())?;
        }
        Ok(verifier)
    }

    /// The service this verifier verifies for.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Verifies a compact JWT.
    pub fn verify(&self, token: &str) -> Result<Claims, Error> {
        let header = jsonwebtoken::decode_header(token).map_err(|err| self.invalid(&err))?;
        match header.kid {
            // Signed before user tokens named their key (or by a signer
            // that does not): the current key is the only one it can mean.
            // Once every such token has expired, this arm could refuse.
            None => self.verify_user_token(token, &self.current_user_key),
            Some(kid) if kid.starts_with(USER_KEY_ID_PREFIX) => self.verify_user_token(token, &kid),
            Some(kid) => self.verify_service_token(token, &kid),
        }
    }

    /// A user token signed with the user key `kid`, and no other.
    fn verify_user_token(&self, token: &str, kid: &str) -> Result<Claims, Error> {
        let key = self
            .user_keys
            .get(kid)
            .ok_or_else(|| unauthenticated("user token signed by an unknown key"))?;
        let not_a_user_token = || {
            unauthenticated(
                "a service token must be signed with its service's own key and name it in `kid`",
            )
        };
        let claims = jsonwebtoken::decode::<Claims>(token, key, &self.user_validation)
            .map(|data| data.claims)
            .map_err(|err| match err.kind() {
                // Only service tokens have an audience.
                jsonwebtoken::errors::ErrorKind::InvalidAudience => not_a_user_token(),
                _ => self.invalid(&err),
            })?;
        if claims.kind != TokenKind::User {
            return Err(not_a_user_token());
        }
        Ok(claims)
    }

    /// A service token of the service `kid`, signed with its key.
    fn verify_service_token(&self, token: &str, kid: &str) -> Result<Claims, Error> {
        let key = self
            .service_keys
            .get(kid)
            .ok_or_else(|| unauthenticated("service token signed by an unknown service key"))?;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &self.service_validation)
            .map(|data| data.claims)
            .map_err(|err| self.invalid(&err))?;
        if claims.kind != TokenKind::Service {
            return Err(unauthenticated(
                "a token signed with a service key must be a service token",
            ));
        }
        if claims.sub != kid {
            return Err(unauthenticated(format!(
                "service token of {} signed with the key of {kid}",
                claims.sub
            )));
        }
        // Service tokens are short-lived by design: one that claims a
        // long life, or was issued in the future, came from a signer
        // that misbehaves (or a stolen key), not from ours.
        let now = crate::time::now_micros() / 1_000_000;
        let leeway = i64::try_from(CLOCK_LEEWAY_SECS).unwrap_or(i64::MAX);
        if claims.iat > now.saturating_add(leeway)
            || claims.exp.saturating_sub(claims.iat) > MAX_SERVICE_TOKEN_SECS
        {
            return Err(unauthenticated(format!(
                "service token lifetime must be at most {MAX_SERVICE_TOKEN_SECS} s from an issue time not in the future"
            )));
        }
        Ok(claims)
    }

    fn invalid(&self, err: &jsonwebtoken::errors::Error) -> Error {
        match err.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidAudience => unauthenticated(format!(
                "invalid access token: not meant for {}",
                self.service
            )),
            _ => unauthenticated(format!("invalid access token: {err}")),
        }
    }

    /// The caller of a request: anonymous without an `authorization` header,
    /// UNAUTHENTICATED with a malformed, expired or forged token.
    pub fn caller(&self, metadata: &MetadataMap) -> Result<Caller, Error> {
        self.caller_from_headers(metadata.as_ref())
    }

    /// The caller of a gRPC request being handled: the one the server's
    /// [`crate::server::AccessLayer`] verified and checked against the
    /// RPC's declared access before the handler ran, or else (a handler
    /// served outside [`crate::server::Server`], a public RPC, whose token
    /// the layer does not look at) the caller its `authorization` metadata
    /// names, as [`Self::caller`].
    pub fn caller_of<T>(&self, request: &tonic::Request<T>) -> Result<Caller, Error> {
        // Only server-side code can put a `Caller` there: nothing a client
        // sends becomes a request extension.
        match request.extensions().get::<VerifiedCaller>() {
            Some(VerifiedCaller(caller)) => Ok(caller.clone()),
            None => self.caller(request.metadata()),
        }
    }

    /// [`Self::caller`] from the HTTP headers of a request.
    pub fn caller_from_headers(&self, headers: &http::HeaderMap) -> Result<Caller, Error> {
        let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return Ok(Caller::Anonymous);
        };
        // Two credentials are ambiguous: which one a proxy, the gateway and
        // the service each read could differ. Refuse rather than pick.
        if values.next().is_some() {
            return Err(Error::new(
                ErrorKind::Unauthenticated,
                "more than one authorization header",
            ));
        }
        let value = value.to_str().map_err(|_| {
            Error::new(
                ErrorKind::Unauthenticated,
                "authorization header is not text",
            )
        })?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Unauthenticated,
                    "authorization must be `Bearer <token>`",
                )
            })?;
        let claims = self.verify(token.trim())?;
        Ok(match claims.kind {
            TokenKind::User => Caller::User {
                id: claims.sub,
                email: claims.email,
                roles: claims.roles,
            },
            TokenKind::Service => Caller::Service { name: claims.sub },
        })
    }
}

/// The caller of a request as verified by the server's access layer,
/// stored in the request's extensions for [`TokenVerifier::caller_of`]. A
/// type of its own, so that no other extension of type [`Caller`] is ever
/// taken for a verified one.
#[derive(Clone, Debug)]
pub(crate) struct VerifiedCaller(pub(crate) Caller);

/// The key id of a user-token public key (SPKI PEM), as the users service
/// puts it in the `kid` of the tokens it signs with the private half:
/// `user-` and the first 16 hex digits of the SHA-256 of the key's DER
/// encoding. Derived from the key itself, so that every process agrees on
/// it without being told, and the PEM's line breaks do not matter.
pub fn user_key_id(public_pem: &str) -> Result<String, Error> {
    use sha2::Digest as _;
    let key = VerifyingKey::from_public_key_pem(public_pem.trim()).map_err(|err| {
        Error::new(
            ErrorKind::FailedPrecondition,
            "a user-token public key is not an Ed25519 SPKI PEM key",
        )
        .with_source(err)
    })?;
    let der = key
        .to_public_key_der()
        .map_err(|err| Error::internal("encoding a public key", err))?;
    let digest = sha2::Sha256::digest(der.as_bytes());
    let hex: String = digest
        .iter()
        .take(8)
        .map(|byte| format!("{byte:02x}"))
        .collect();
    Ok(format!("{USER_KEY_ID_PREFIX}{hex}"))
}

/// The key id and decoding key of a user-token public key (SPKI PEM).
fn user_decoding_key(public_pem: &[u8]) -> Result<(String, DecodingKey), Error> {
    let text = std::str::from_utf8(public_pem).map_err(|err| {
        Error::new(
            ErrorKind::FailedPrecondition,
            "a user-token public key is not PEM text",
        )
        .with_source(err)
    })?;
    let kid = user_key_id(text)?;
    let key = DecodingKey::from_ed_pem(public_pem)
        .map_err(|err| Error::internal("reading the token verification key", err))?;
    Ok((kid, key))
}

fn unauthenticated(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unauthenticated, message)
}

fn now_secs() -> i64 {
    crate::time::now_micros() / 1_000_000
}

/// The `<service>.pub.pem` files of `dir`, by service name. The user-token
/// public key is skipped: a ConfigMap of every public key, mounted as one
/// folder, holds it too, and it is no service's key.
fn service_public_keys_in(dir: &Path) -> Result<BTreeMap<String, String>, Error> {
    let unreadable = |err: std::io::Error| {
        Error::new(
            ErrorKind::FailedPrecondition,
            format!("cannot read auth.service_public_key_dir {}", dir.display()),
        )
        .with_source(err)
    };
    let mut keys = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        // Hidden entries include a mounted ConfigMap's `..data` links.
        if file_name == PUBLIC_KEY_FILE || file_name.starts_with('.') {
            continue;
        }
        let Some(service) = file_name.strip_suffix(SERVICE_PUBLIC_KEY_SUFFIX) else {
            continue;
        };
        if service.is_empty() {
            continue;
        }
        let pem = std::fs::read_to_string(entry.path()).map_err(|err| {
            Error::new(
                ErrorKind::FailedPrecondition,
                format!("cannot read service public key {}", entry.path().display()),
            )
            .with_source(err)
        })?;
        keys.insert(service.to_owned(), pem);
    }
    Ok(keys)
}

/// A new Ed25519 key pair as PEM: (PKCS#8 private key, SPKI public key).
pub fn generate_keypair_pem() -> Result<(Secret<String>, String), Error> {
    let signing = SigningKey::generate(&mut rand_core::OsRng);
    let private = signing
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|err| Error::internal("encoding the private key", err))?;
    let public = signing
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|err| Error::internal("encoding the public key", err))?;
    Ok((Secret::new(private.to_string()), public))
}

/// The SPKI PEM public key that belongs to a PKCS#8 PEM private key.
pub fn public_pem_from_private(private_pem: &str) -> Result<String, Error> {
    let signing = SigningKey::from_pkcs8_pem(private_pem)
        .map_err(|err| Error::internal("reading the token signing key", err))?;
    signing
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|err| Error::internal("encoding the public key", err))
}

fn read_key(inline: Option<String>, file: Option<&Path>, key: &str) -> Result<String, Error> {
    if let Some(pem) = inline {
        return Ok(pem);
    }
    let Some(file) = file else {
        return Err(Error::new(
            ErrorKind::FailedPrecondition,
            format!("{key} is not configured (run `agora keygen` for a development pair)"),
        ));
    };
    std::fs::read_to_string(file).map_err(|err| {
        Error::new(
            ErrorKind::FailedPrecondition,
            format!("cannot read {key} {}", file.display()),
        )
        .with_source(err)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUER: &str = "agora";

    fn pair() -> (TokenIssuer, TokenVerifier) {
        let (private, public) = generate_keypair_pem().expect("keygen");
        (
            TokenIssuer::from_pem(private.expose().as_bytes(), ISSUER, 60).expect("issuer"),
            TokenVerifier::from_pem(public.as_bytes(), ISSUER, "catalog").expect("verifier"),
        )
    }

    fn bearer(token: &str) -> MetadataMap {
        let mut md = MetadataMap::new();
        md.insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
        md
    }

    /// The user-token pair, the `orders` and `catalog` service keys, and an
    /// `inventory` verifier trusting the three.
    struct Mesh {
        user_private: Secret<String>,
        orders_private: Secret<String>,
        orders: ServiceTokenSigner,
        catalog: ServiceTokenSigner,
        inventory: TokenVerifier,
    }

    fn mesh() -> Mesh {
        let (user_private, user_public) = generate_keypair_pem().expect("keygen");
        let (orders_private, orders_public) = generate_keypair_pem().expect("keygen");
        let (catalog_private, catalog_public) = generate_keypair_pem().expect("keygen");
        let signer = |pem: &Secret<String>, service| {
            ServiceTokenSigner::from_pem(pem.expose().as_bytes(), ISSUER, service, 60)
                .expect("signer")
        };
        Mesh {
            orders: signer(&orders_private, "orders"),
            catalog: signer(&catalog_private, "catalog"),
            inventory: TokenVerifier::from_pem(user_public.as_bytes(), ISSUER, "inventory")
                .and_then(|v| v.with_service_key("orders", orders_public.as_bytes()))
                .and_then(|v| v.with_service_key("catalog", catalog_public.as_bytes()))
                .expect("verifier"),
            user_private,
            orders_private,
        }
    }

    /// A token with any header `kid` and claims, signed with `private`.
    fn forge(private: &Secret<String>, kid: Option<&str>, claims: &Claims) -> String {
        let key = EncodingKey::from_ed_pem(private.expose().as_bytes()).expect("key");
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &key).expect("encode")
    }

    fn service_claims(sub: &str, aud: &str) -> Claims {
        let now = now_secs();
        Claims {
            iss: ISSUER.into(),
            sub: sub.into(),
            aud: Some(aud.into()),
            iat: now,
            exp: now + 60,
            jti: "j".into(),
            kind: TokenKind::Service,
            email: None,
            roles: vec![],
        }
    }

    fn refusal(verifier: &TokenVerifier, token: &str) -> Error {
        verifier
            .caller(&bearer(token))
            .expect_err("must be refused")
    }

    #[test]
    fn issued_user_tokens_verify_into_user_callers() {
        let (issuer, verifier) = pair();
        let token = issuer
            .issue_user_token("u1", "a@example.com", &["admin".to_owned()])
            .expect("issue");
        let caller = verifier.caller(&bearer(&token.token)).expect("verify");
        assert!(caller.is_user("u1"));
        assert!(caller.is_admin());
        assert!(!caller.is_service());
    }

    #[test]
    fn tokens_from_another_key_are_rejected() {
        let (issuer, _) = pair();
        let (_, other_verifier) = pair();
        let token = issuer.issue_user_token("u1", "a@b.c", &[]).expect("issue");
        let err = other_verifier
            .caller(&bearer(&token.token))
            .expect_err("forged");
        assert_eq!(err.kind(), ErrorKind::Unauthenticated);
    }

    #[test]
    fn missing_header_is_anonymous_and_garbage_is_unauthenticated() {
        let (_, verifier) = pair();
        assert_eq!(
            verifier.caller(&MetadataMap::new()).ok(),
            Some(Caller::Anonymous)
        );
        let err = verifier.caller(&bearer("not-a-jwt")).expect_err("garbage");
        assert_eq!(err.kind(), ErrorKind::Unauthenticated);
        let mut md = MetadataMap::new();
        md.insert("authorization", "Basic abc".parse().expect("ascii"));
        assert!(verifier.caller(&md).is_err());
    }

    #[test]
    fn two_authorization_headers_are_refused_even_with_one_valid() {
        let (issuer, verifier) = pair();
        let token = issuer
            .issue_user_token("u1", "a@example.com", &[])
            .expect("issue");
        let mut md = bearer(&token.token);
        assert!(verifier.caller(&md).is_ok());
        md.append("authorization", "Bearer garbage".parse().expect("ascii"));
        let err = verifier.caller(&md).expect_err("ambiguous");
        assert_eq!(err.kind(), ErrorKind::Unauthenticated);
    }

    #[test]
    fn expired_tokens_are_rejected() {
        let (private, public) = generate_keypair_pem().expect("keygen");
        let verifier =
            TokenVerifier::from_pem(public.as_bytes(), ISSUER, "catalog").expect("verifier");
        let now = now_secs();
        let claims = Claims {
            iss: ISSUER.into(),
            sub: "u1".into(),
            aud: None,
            iat: now - 7200,
            exp: now - 3600,
            jti: "j".into(),
            kind: TokenKind::User,
            email: None,
            roles: vec![],
        };
        let token = forge(&private, None, &claims);
        assert!(verifier.verify(&token).is_err());
    }

    #[test]
    fn verifier_derives_the_public_key_from_a_private_one() {
        let (private, _) = generate_keypair_pem().expect("keygen");
        let config = AuthConfig {
            private_key_pem: Some(private.clone()),
            ..AuthConfig::default()
        };
        let issuer = TokenIssuer::from_config(&config).expect("issuer");
        let verifier = TokenVerifier::for_service(&config, "catalog").expect("verifier");
        let token = issuer.issue_user_token("u", "u@x.io", &[]).expect("issue");
        assert!(verifier.verify(&token.token).is_ok());
    }

    #[test]
    fn a_service_token_for_this_service_from_an_allowed_caller_is_accepted() {
        let mesh = mesh();
        let token = mesh.orders.token_for("inventory").expect("sign");
        let claims = mesh.inventory.verify(&token).expect("verify");
        assert_eq!(
            (claims.sub.as_str(), claims.aud.as_deref(), claims.kind),
            ("orders", Some("inventory"), TokenKind::Service)
        );
        assert!(claims.exp - claims.iat == 60);
        let caller = mesh.inventory.caller(&bearer(&token)).expect("caller");
        assert_eq!(
            caller,
            Caller::Service {
                name: "orders".into()
            }
        );
        assert!(caller.require_service_from(&["orders"]).is_ok());
        assert!(caller.require_service_from(&["payments", "orders"]).is_ok());
    }

    #[test]
    fn a_service_not_in_the_allowed_list_is_denied_by_name() {
        let mesh = mesh();
        let token = mesh.catalog.token_for("inventory").expect("sign");
        let caller = mesh.inventory.caller(&bearer(&token)).expect("valid token");
        let err = caller
            .require_service_from(&["orders"])
            .expect_err("catalog is not allowed");
        assert_eq!(err.kind(), ErrorKind::PermissionDenied);
        assert_eq!(err.message(), "catalog may not call this; allowed: orders");
        // Users (even admins) are denied, anonymous callers unauthenticated.
        let admin = Caller::User {
            id: "u".into(),
            email: None,
            roles: vec![ADMIN_ROLE.into()],
        };
        let err = admin.require_service_from(&["orders"]).expect_err("user");
        assert_eq!(err.kind(), ErrorKind::PermissionDenied);
        let err = Caller::Anonymous
            .require_service_from(&["orders"])
            .expect_err("anonymous");
        assert_eq!(err.kind(), ErrorKind::Unauthenticated);
    }

    #[test]
    fn a_service_token_for_another_audience_is_unauthenticated() {
        let mesh = mesh();
        let token = mesh.orders.token_for("payments").expect("sign");
        let err = refusal(&mesh.inventory, &token);
        assert_eq!(err.kind(), ErrorKind::Unauthenticated);
        assert!(err.message().contains("not meant for inventory"), "{err}");
    }

    #[test]
    fn an_expired_service_token_is_unauthenticated() {
        let mesh = mesh();
        let mut claims = service_claims("orders", "inventory");
        // Beyond the clock leeway.
        claims.iat -= 600;
        claims.exp = claims.iat + 60;
        let token = forge(&mesh.orders_private, Some("orders"), &claims);
        let err = refusal(&mesh.inventory, &token);
        assert_eq!(err.kind(), ErrorKind::Unauthenticated);
        assert!(err.message().contains("xpired"), "{err}");
    }

    #[test]
    fn a_long_lived_or_future_service_token_is_unauthenticated() {
        let mesh = mesh();
        let mut long = service_claims("orders", "inventory");
        long.exp = long.iat + MAX_SERVICE_TOKEN_SECS + 1;
        let mut future = service_claims("orders", "inventory");
        future.iat += 600;
        future.exp = future.iat + 60;
        for claims in [long, future] {
            let token = forge(&mesh.orders_private, Some("orders"), &claims);
            let err = refusal(&mesh.inventory, &token);
            assert_eq!(err.kind(), ErrorKind::Unauthenticated);
            assert!(err.message().contains("lifetime"), "{err}");
        }
    }

    #[test]
    fn a_service_token_signed_by_an_unknown_key_is_unauthenticated() {
        let mesh = mesh();
        // A key nobody trusts, in the name of a known service...
        let (stranger, _) = generate_keypair_pem().expect("keygen");
        let signer =
            ServiceTokenSigner::from_pem(stranger.expose().as_bytes(), ISSUER, "orders", 60)
                .expect("signer");
        let err = refusal(
            &mesh.inventory,
            &signer.token_for("inventory").expect("sign"),
        );
        assert_eq!(err.kind(), ErrorKind::Unauthenticated);
        // ... and in the name of an unknown one.
        let signer =
            ServiceTokenSigner::from_pem(stranger.expose().as_bytes(), ISSUER, "gateway", 60)
                .expect("signer");
        let err = refusal(
            &mesh.inventory,
            &signer.token_for("inventory").expect("sign"),
        );
        assert_eq!(err.kind(), ErrorKind::Unauthenticated);
        assert!(err.message().contains("unknown service key"), "{err}");
    }

    #[test]
    fn a_service_token_signed_with_the_user_token_key_is_unauthenticated() {
        let mesh = mesh();
        let claims = service_claims("orders", "inventory");
        // Without `kid`, as the user-token issuer signs: a user-key token
        // that claims to be a service.
        let token = forge(&mesh.user_private, None, &claims);
        let err = refusal(&mesh.inventory, &token);
        assert_eq!(err.kind(), ErrorKind::Unauthenticated);
        assert!(err.message().contains("its service's own key"), "{err}");
        // With `kid`: the orders key does not verify it.
        let token = forge(&mesh.user_private, Some("orders"), &claims);
        assert_eq!(
            refusal(&mesh.inventory, &token).kind(),
            ErrorKind::Unauthenticated
        );
    }

    #[test]
    fn a_kid_that_is_not_the_subject_is_unauthenticated() {
        let mesh = mesh();
        // Orders signs with its own key but claims to be payments.
        let token = forge(
            &mesh.orders_private,
            Some("orders"),
            &service_claims("payments", "inventory"),
        );
        let err = refusal(&mesh.inventory, &token);
        assert_eq!(err.kind(), ErrorKind::Unauthenticated);
        assert!(
            err.message()
                .contains("service token of payments signed with the key of orders"),
            "{err}"
        );
    }

    #[test]
    fn a_service_key_cannot_sign_user_tokens() {
        let mesh = mesh();
        let mut claims = service_claims("orders", "inventory");
        claims.kind = TokenKind::User;
        claims.roles = vec![ADMIN_ROLE.into()];
        let token = forge(&mesh.orders_private, Some("orders"), &claims);
        let err = refusal(&mesh.inventory, &token);
        assert_eq!(err.kind(), ErrorKind::Unauthenticated);
        assert!(err.message().contains("must be a service token"), "{err}");
    }

    #[test]
    fn a_user_token_with_an_audience_is_unauthenticated() {
        let mesh = mesh();
        let mut claims = service_claims("u1", "inventory");
        claims.kind = TokenKind::User;
        let token = forge(&mesh.user_private, None, &claims);
        assert_eq!(
            refusal(&mesh.inventory, &token).kind(),
            ErrorKind::Unauthenticated
        );
    }

    #[test]
    fn service_tokens_are_cached_per_audience_and_re_signed_near_expiry() {
        let mesh = mesh();
        // Signing "in the past", so that every token below is still valid
        // (and none is issued in the future) when verified now.
        let now = now_secs() - 40;
        let first = mesh.orders.token_at("inventory", now).expect("sign");
        // Half the lifetime left or more: the same token.
        assert_eq!(
            mesh.orders.token_at("inventory", now + 10).expect("sign"),
            first
        );
        assert_eq!(
            mesh.orders.token_at("inventory", now + 30).expect("sign"),
            first
        );
        // Another audience: a token of its own.
        let payments = mesh.orders.token_at("payments", now).expect("sign");
        assert_ne!(payments, first);
        // Less than half left: a new token, valid for a full lifetime again.
        let renewed = mesh.orders.token_at("inventory", now + 31).expect("sign");
        assert_ne!(renewed, first);
        let claims = mesh.inventory.verify(&renewed).expect("verify");
        assert_eq!(claims.exp, now + 31 + 60);
        // And that one is now the cached one.
        assert_eq!(
            mesh.orders.token_at("inventory", now + 40).expect("sign"),
            renewed
        );
        // Clones share the cache.
        assert_eq!(
            mesh.orders
                .clone()
                .token_at("payments", now + 1)
                .expect("sign"),
            payments
        );
    }

    #[test]
    fn the_configured_verifier_reads_service_keys_from_a_folder_and_inline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (user_private, user_public) = generate_keypair_pem().expect("keygen");
        let (orders_private, orders_public) = generate_keypair_pem().expect("keygen");
        let (payments_private, payments_public) = generate_keypair_pem().expect("keygen");
        std::fs::write(dir.path().join("orders.pub.pem"), &orders_public).expect("write");
        // Ignored: the user-token key, private keys, other files.
        std::fs::write(dir.path().join(PUBLIC_KEY_FILE), &user_public).expect("write");
        std::fs::write(dir.path().join("orders.pem"), orders_private.expose()).expect("write");
        std::fs::write(dir.path().join("README"), "not a key").expect("write");
        let config = AuthConfig {
            public_key_pem: Some(user_public),
            service_public_key_dir: Some(dir.path().to_path_buf()),
            // As an environment variable gives it: without the final newline.
            service_public_keys: BTreeMap::from([(
                "payments".to_owned(),
                payments_public.trim_end().to_owned(),
            )]),
            ..AuthConfig::default()
        };
        let verifier = TokenVerifier::for_service(&config, "inventory").expect("verifier");
        assert_eq!(
            verifier.service_keys.keys().collect::<Vec<_>>(),
            ["orders", "payments"]
        );
        for (private, caller) in [(&orders_private, "orders"), (&payments_private, "payments")] {
            let signer =
                ServiceTokenSigner::from_pem(private.expose().as_bytes(), ISSUER, caller, 60)
                    .expect("signer");
            let token = signer.token_for("inventory").expect("sign");
            assert!(verifier.verify(&token).is_ok(), "{caller}");
        }
        // The user-token key lying in the folder is not a service's key.
        let jwt = forge(
            &user_private,
            Some("jwt_ed25519"),
            &service_claims("jwt_ed25519", "inventory"),
        );
        assert!(verifier.verify(&jwt).is_err());
    }

    #[test]
    fn the_configured_signer_uses_the_service_key_and_ttl() {
        let (private, public) = generate_keypair_pem().expect("keygen");
        let mut config = Config::default();
        config.auth.service_token_ttl_secs = 120;
        config.orders.signing_key_pem = Some(private);
        let signer = ServiceTokenSigner::from_config(&config, "orders").expect("signer");
        assert_eq!(signer.service(), "orders");
        let verifier = TokenVerifier::from_pem(public.as_bytes(), ISSUER, "payments")
            .and_then(|v| v.with_service_key("orders", public.as_bytes()))
            .expect("verifier");
        let claims = verifier
            .verify(&signer.token_for("payments").expect("sign"))
            .expect("verify");
        assert_eq!(claims.exp - claims.iat, 120);
        // A service without a key cannot sign.
        let err = ServiceTokenSigner::from_config(&config, "catalog").expect_err("no key");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(err.message().contains("catalog.signing_key_file"), "{err}");
    }

    /// A user-token key pair: its issuer and its public PEM.
    fn user_key() -> (Secret<String>, TokenIssuer, String) {
        let (private, public) = generate_keypair_pem().expect("keygen");
        let issuer =
            TokenIssuer::from_pem(private.expose().as_bytes(), ISSUER, 60).expect("issuer");
        (private, issuer, public)
    }

    fn user_claims(sub: &str) -> Claims {
        let now = now_secs();
        Claims {
            iss: ISSUER.into(),
            sub: sub.into(),
            aud: None,
            iat: now,
            exp: now + 60,
            jti: "j".into(),
            kind: TokenKind::User,
            email: None,
            roles: vec![],
        }
    }

    #[test]
    fn a_user_key_id_is_a_digest_of_the_public_key() {
        let (_, issuer, public) = user_key();
        let kid = user_key_id(&public).expect("key id");
        // Computed another way: SHA-256 of the DER the PEM wraps.
        let body: String = public.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, body)
            .expect("base64");
        let digest = sha2::Digest::finalize(sha2::Digest::chain_update(
            <sha2::Sha256 as sha2::Digest>::new(),
            &der,
        ));
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(kid, format!("user-{hex}"));
        assert_eq!(kid.len(), "user-".len() + 16);
        // Line endings and surrounding blanks do not change it.
        let crlf = format!("\n{}\n", public.replace('\n', "\r\n"));
        assert_eq!(user_key_id(&crlf).expect("key id"), kid);
        // The issuer names its key so, and its tokens say so.
        assert_eq!(issuer.key_id(), kid);
        let token = issuer.issue_user_token("u1", "a@b.c", &[]).expect("issue");
        let header = jsonwebtoken::decode_header(&token.token).expect("header");
        assert_eq!(header.kid.as_deref(), Some(kid.as_str()));
        assert!(user_key_id("not a key").is_err());
    }

    #[test]
    fn tokens_of_the_old_and_the_new_key_verify_during_a_rotation() {
        let (old_private, old, old_public) = user_key();
        let (new_private, new, new_public) = user_key();
        let verifier = TokenVerifier::from_pem(new_public.as_bytes(), ISSUER, "catalog")
            .and_then(|v| v.with_user_key(old_public.as_bytes()))
            .expect("verifier");
        for (issuer, user) in [(&old, "old"), (&new, "new")] {
            let token = issuer.issue_user_token(user, "a@b.c", &[]).expect("issue");
            let caller = verifier.caller(&bearer(&token.token)).expect(user);
            assert!(caller.is_user(user), "{caller:?}");
        }
        // Tokens from before user tokens had a `kid`: the current key only.
        let legacy_new = forge(&new_private, None, &user_claims("u1"));
        assert!(verifier.verify(&legacy_new).is_ok());
        let legacy_old = forge(&old_private, None, &user_claims("u1"));
        assert_eq!(
            refusal(&verifier, &legacy_old).kind(),
            ErrorKind::Unauthenticated
        );
        // Before the rotation, the old verifier alone refuses the new key's tokens.
        let before =
            TokenVerifier::from_pem(old_public.as_bytes(), ISSUER, "catalog").expect("verifier");
        let token = new.issue_user_token("u1", "a@b.c", &[]).expect("issue");
        let err = refusal(&before, &token.token);
        assert_eq!(err.kind(), ErrorKind::Unauthenticated);
        assert_eq!(err.message(), "user token signed by an unknown key");
    }

    #[test]
    fn a_user_token_of_a_key_not_configured_is_unauthenticated() {
        let (_, _, current_public) = user_key();
        let (_, stranger, _) = user_key();
        let verifier = TokenVerifier::from_pem(current_public.as_bytes(), ISSUER, "catalog")
            .expect("verifier");
        let token = stranger
            .issue_user_token("u1", "a@b.c", &[])
            .expect("issue");
        let err = refusal(&verifier, &token.token);
        assert_eq!(err.kind(), ErrorKind::Unauthenticated);
        assert!(err.message().contains("unknown key"), "{err}");
        // Nor does an id of the right shape that no key has.
        let (private, ..) = user_key();
        let token = forge(&private, Some("user-0000000000000000"), &user_claims("u1"));
        assert!(refusal(&verifier, &token).message().contains("unknown key"));
    }

    #[test]
    fn a_user_token_whose_kid_names_another_key_is_unauthenticated() {
        let (_, _, old_public) = user_key();
        let (new_private, _, new_public) = user_key();
        let verifier = TokenVerifier::from_pem(new_public.as_bytes(), ISSUER, "catalog")
            .and_then(|v| v.with_user_key(old_public.as_bytes()))
            .expect("verifier");
        // Signed with the new key, claiming to be of the old one: checked
        // with the old key only, so the signature does not hold.
        let old_kid = user_key_id(&old_public).expect("key id");
        let token = forge(&new_private, Some(&old_kid), &user_claims("u1"));
        let err = refusal(&verifier, &token);
        assert_eq!(err.kind(), ErrorKind::Unauthenticated);
        assert!(err.message().contains("InvalidSignature"), "{err}");
    }

    #[test]
    fn a_user_token_with_a_service_kid_is_unauthenticated() {
        let mesh = mesh();
        // Signed with the user-token key, an admin's claims, and the `kid`
        // of a service: checked with that service's key, which did not sign it.
        let mut claims = user_claims("u1");
        claims.roles = vec![ADMIN_ROLE.into()];
        let token = forge(&mesh.user_private, Some("orders"), &claims);
        assert_eq!(
            refusal(&mesh.inventory, &token).kind(),
            ErrorKind::Unauthenticated
        );
        // And a service name can never pass for a user key.
        let (_, public) = generate_keypair_pem().expect("keygen");
        let err = mesh
            .inventory
            .clone()
            .with_service_key("user-orders", public.as_bytes())
            .expect_err("a user- service");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    }

    #[test]
    fn the_configured_verifier_reads_the_additional_user_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, current, current_public) = user_key();
        let (_, previous, previous_public) = user_key();
        let (_, next, next_public) = user_key();
        let (_, stranger, _) = user_key();
        let previous_file = dir.path().join("previous.pub.pem");
        std::fs::write(&previous_file, &previous_public).expect("write");
        let config = AuthConfig {
            public_key_pem: Some(current_public),
            additional_public_key_files: vec![previous_file],
            // As an environment variable gives it: without the final newline.
            additional_public_keys: vec![next_public.trim_end().to_owned()],
            ..AuthConfig::default()
        };
        let verifier = TokenVerifier::for_service(&config, "gateway").expect("verifier");
        for issuer in [&current, &previous, &next] {
            let token = issuer.issue_user_token("u1", "a@b.c", &[]).expect("issue");
            assert!(verifier.verify(&token.token).is_ok(), "{}", issuer.key_id());
        }
        let token = stranger
            .issue_user_token("u1", "a@b.c", &[])
            .expect("issue");
        assert!(verifier.verify(&token.token).is_err());
        // A missing file is a configuration error, not a quiet omission.
        let config = AuthConfig {
            additional_public_key_files: vec![dir.path().join("missing.pem")],
            ..config
        };
        let err = TokenVerifier::for_service(&config, "gateway").expect_err("missing");
        assert!(
            err.message().contains("auth.additional_public_key_files"),
            "{err}"
        );
    }
}
