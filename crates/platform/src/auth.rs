//! Tokens and callers.
//!
//! Users log in to the users service, which signs an EdDSA (Ed25519) JWT with
//! its private key ([`TokenIssuer`]). Every service verifies tokens with the
//! public key ([`TokenVerifier`]) and turns the `authorization` metadata of a
//! request into a [`Caller`]; authorization decisions are made from that, inside
//! each service, never only at the edge.

use std::path::Path;

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;

use crate::config::{AuthConfig, Secret};
use crate::error::{Error, ErrorKind};

/// The role that grants admin access.
pub const ADMIN_ROLE: &str = "admin";

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

    /// UNAUTHENTICATED for anonymous callers, PERMISSION_DENIED unless a service.
    pub fn require_service(&self) -> Result<(), Error> {
        self.require_authenticated()?;
        if self.is_service() {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::PermissionDenied,
                "this call is internal to Agora services",
            ))
        }
    }
}

/// Signs access tokens. Only the users service (and test kits) hold one.
#[derive(Clone)]
pub struct TokenIssuer {
    key: EncodingKey,
    issuer: String,
    ttl_secs: i64,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
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
        Ok(Self {
            key,
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

    /// Signs a user token.
    pub fn issue_user_token(
        &self,
        user_id: &str,
        email: &str,
        roles: &[String],
    ) -> Result<IssuedToken, Error> {
        self.sign(
            user_id,
            TokenKind::User,
            Some(email.to_owned()),
            roles.to_vec(),
        )
    }

    /// Signs a service token for internal-only RPCs.
    pub fn issue_service_token(&self, service: &str) -> Result<IssuedToken, Error> {
        self.sign(service, TokenKind::Service, None, Vec::new())
    }

    fn sign(
        &self,
        sub: &str,
        kind: TokenKind,
        email: Option<String>,
        roles: Vec<String>,
    ) -> Result<IssuedToken, Error> {
        let now = crate::time::now_micros() / 1_000_000;
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: sub.to_owned(),
            iat: now,
            exp: now.saturating_add(self.ttl_secs),
            jti: uuid::Uuid::now_v7().to_string(),
            kind,
            email,
            roles,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.key)
            .map_err(|err| Error::internal("signing a token", err))?;
        Ok(IssuedToken {
            token,
            expires_at: claims.exp,
        })
    }
}

/// Verifies access tokens; every service holds one.
#[derive(Clone)]
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier").finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// A verifier from an SPKI PEM public key.
    pub fn from_pem(public_pem: &[u8], issuer: &str) -> Result<Self, Error> {
        let key = DecodingKey::from_ed_pem(public_pem)
            .map_err(|err| Error::internal("reading the token verification key", err))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        // Tolerate small clock differences between pods.
        validation.leeway = 30;
        Ok(Self { key, validation })
    }

    /// The verifier configured in `auth`: the public key (inline or file), or
    /// the one derived from the private key when only that is configured.
    pub fn from_config(config: &AuthConfig) -> Result<Self, Error> {
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
        Self::from_pem(pem.as_bytes(), &config.issuer)
    }

    /// Verifies a compact JWT.
    pub fn verify(&self, token: &str) -> Result<Claims, Error> {
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|err| {
                Error::new(
                    ErrorKind::Unauthenticated,
                    format!("invalid access token: {err}"),
                )
            })
    }

    /// The caller of a request: anonymous without an `authorization` header,
    /// UNAUTHENTICATED with a malformed, expired or forged token.
    pub fn caller(&self, metadata: &MetadataMap) -> Result<Caller, Error> {
        let Some(value) = metadata.get("authorization") else {
            return Ok(Caller::Anonymous);
        };
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

    fn pair() -> (TokenIssuer, TokenVerifier) {
        let (private, public) = generate_keypair_pem().expect("keygen");
        (
            TokenIssuer::from_pem(private.expose().as_bytes(), "agora", 60).expect("issuer"),
            TokenVerifier::from_pem(public.as_bytes(), "agora").expect("verifier"),
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

    #[test]
    fn issued_user_tokens_verify_into_user_callers() {
        let (issuer, verifier) = pair();
        let token = issuer
            .issue_user_token("u1", "a@example.com", &["admin".to_owned()])
            .expect("issue");
        let caller = verifier.caller(&bearer(&token.token)).expect("verify");
        assert!(caller.is_user("u1"));
        assert!(caller.is_admin());
        let service = issuer.issue_service_token("orders").expect("issue");
        let caller = verifier.caller(&bearer(&service.token)).expect("verify");
        assert!(caller.is_service() && !caller.is_admin());
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
    fn expired_tokens_are_rejected() {
        let (private, public) = generate_keypair_pem().expect("keygen");
        let verifier = TokenVerifier::from_pem(public.as_bytes(), "agora").expect("verifier");
        let key = EncodingKey::from_ed_pem(private.expose().as_bytes()).expect("key");
        let now = crate::time::now_micros() / 1_000_000;
        let claims = Claims {
            iss: "agora".into(),
            sub: "u1".into(),
            iat: now - 7200,
            exp: now - 3600,
            jti: "j".into(),
            kind: TokenKind::User,
            email: None,
            roles: vec![],
        };
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key).expect("encode");
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
        let verifier = TokenVerifier::from_config(&config).expect("verifier");
        let token = issuer.issue_user_token("u", "u@x.io", &[]).expect("issue");
        assert!(verifier.verify(&token.token).is_ok());
    }
}
