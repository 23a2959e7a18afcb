//! The tokens the suite sends: real ones (a user and an admin who signed up
//! and logged in through the users service, service tokens signed with the
//! keys `agora keygen` wrote) and forged ones (unknown keys, expired, for
//! another audience, `alg: none`).

use std::collections::BTreeMap;
use std::path::Path;

use agora_platform::auth::{
    Claims, ServiceTokenSigner, TokenIssuer, TokenKind, generate_keypair_pem,
    public_pem_from_private, user_key_id,
};
use agora_platform::config::{
    AuthConfig, PRIVATE_KEY_FILE, SERVICE_KEYS_DIR, service_private_key_file,
};
use agora_proto::users::v1 as users;
use agora_proto::users::v1::user_service_client::UserServiceClient;
use anyhow::Context as _;
use base64_url::encode as b64;
use tonic::transport::Channel;

/// The password of the suite's accounts.
const PASSWORD: &str = "correct horse battery";

/// Every token the cases use.
pub struct Tokens {
    /// A logged-in user (no roles).
    pub user: String,
    /// That user's id.
    pub user_id: String,
    /// A logged-in admin (its address is in `AGORA_AUTH__ADMIN_EMAILS`).
    pub admin: String,
    issuer: String,
    /// The real user-token private key (to forge expired user tokens).
    user_pem: String,
    /// Service name -> its real service-token private key.
    service_pems: BTreeMap<String, String>,
    /// A key no service knows.
    unknown_pem: String,
}

/// The bytes of a JWT segment, base64url without padding.
mod base64_url {
    pub fn encode(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            }
        }
        out
    }
}

impl Tokens {
    /// Signs `user_email` and `admin_email` up through the users service at
    /// `users` (ALREADY_EXISTS is fine), logs both in, and reads the keys
    /// under `data/keys`.
    pub async fn obtain(
        users_channel: Channel,
        data: &Path,
        user_email: &str,
        admin_email: &str,
    ) -> anyhow::Result<Self> {
        let mut client = UserServiceClient::new(users_channel);
        let (user, user_id) = login(&mut client, user_email).await?;
        let (admin, _) = login(&mut client, admin_email).await?;
        let keys = data.join("keys");
        let user_pem = std::fs::read_to_string(keys.join(PRIVATE_KEY_FILE))
            .context("reading the user-token key")?;
        let mut service_pems = BTreeMap::new();
        for service in agora_testkit::SERVICES {
            let path = keys
                .join(SERVICE_KEYS_DIR)
                .join(service_private_key_file(service));
            let pem = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            service_pems.insert(service.to_owned(), pem);
        }
        let (unknown, _) = generate_keypair_pem()?;
        Ok(Self {
            user,
            user_id,
            admin,
            issuer: AuthConfig::default().issuer,
            user_pem,
            service_pems,
            unknown_pem: unknown.expose().clone(),
        })
    }

    /// A valid service token of `caller` for `audience`.
    pub fn service(&self, caller: &str, audience: &str) -> anyhow::Result<String> {
        let pem = self
            .service_pems
            .get(caller)
            .with_context(|| format!("no key for service {caller}"))?;
        let signer = ServiceTokenSigner::from_pem(pem.as_bytes(), &self.issuer, caller, 600)?;
        Ok(signer.token_for(audience)?)
    }

    /// A service token of `caller` for `audience` signed with a key no one
    /// knows (but naming `caller` in `kid`).
    pub fn service_unknown_key(&self, caller: &str, audience: &str) -> anyhow::Result<String> {
        let signer =
            ServiceTokenSigner::from_pem(self.unknown_pem.as_bytes(), &self.issuer, caller, 600)?;
        Ok(signer.token_for(audience)?)
    }

    /// A service token of `caller` for `audience`, signed with its real key,
    /// that expired ten minutes ago.
    pub fn service_expired(&self, caller: &str, audience: &str) -> anyhow::Result<String> {
        let pem = self
            .service_pems
            .get(caller)
            .with_context(|| format!("no key for service {caller}"))?;
        let now = now_secs();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: caller.to_owned(),
            aud: Some(audience.to_owned()),
            iat: now - 660,
            exp: now - 600,
            jti: uuid::Uuid::now_v7().to_string(),
            kind: TokenKind::Service,
            email: None,
            roles: Vec::new(),
        };
        sign(pem, Some(caller.to_owned()), &claims)
    }

    /// An admin token for the suite's user signed with a key no one knows.
    pub fn user_unknown_key(&self) -> anyhow::Result<String> {
        let issuer = TokenIssuer::from_pem(self.unknown_pem.as_bytes(), &self.issuer, 600)?;
        Ok(issuer
            .issue_user_token(&self.user_id, "abuse@example.com", &["admin".to_owned()])?
            .token)
    }

    /// The user's token, signed with the real key, expired ten minutes ago.
    pub fn user_expired(&self) -> anyhow::Result<String> {
        let now = now_secs();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: self.user_id.clone(),
            aud: None,
            iat: now - 4200,
            exp: now - 600,
            jti: uuid::Uuid::now_v7().to_string(),
            kind: TokenKind::User,
            email: Some("abuse@example.com".to_owned()),
            roles: Vec::new(),
        };
        let kid = user_key_id(&public_pem_from_private(&self.user_pem)?)?;
        sign(&self.user_pem, Some(kid), &claims)
    }

    /// A token with a path in `kid`, signed with an unknown key: a verifier
    /// that looked keys up by file name would read outside its folder.
    pub fn kid_traversal(&self) -> anyhow::Result<String> {
        let now = now_secs();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: "../../../../etc/passwd".to_owned(),
            aud: Some("users".to_owned()),
            iat: now,
            exp: now + 60,
            jti: uuid::Uuid::now_v7().to_string(),
            kind: TokenKind::Service,
            email: None,
            roles: Vec::new(),
        };
        sign(
            &self.unknown_pem,
            Some("../../../../etc/passwd".to_owned()),
            &claims,
        )
    }

    /// An unsigned (`alg: none`) admin token for the suite's user.
    pub fn alg_none(&self) -> String {
        let now = now_secs();
        let header = br#"{"alg":"none","typ":"JWT"}"#;
        let claims = serde_json::json!({
            "iss": self.issuer,
            "sub": self.user_id,
            "iat": now,
            "exp": now + 600,
            "jti": "abuse",
            "kind": "user",
            "roles": ["admin"],
        });
        format!("{}.{}.", b64(header), b64(claims.to_string().as_bytes()))
    }
}

fn sign(pem: &str, kid: Option<String>, claims: &Claims) -> anyhow::Result<String> {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = kid;
    let key = jsonwebtoken::EncodingKey::from_ed_pem(pem.as_bytes())?;
    Ok(jsonwebtoken::encode(&header, claims, &key)?)
}

fn now_secs() -> i64 {
    agora_platform::time::now_micros() / 1_000_000
}

/// Signs `email` up (ALREADY_EXISTS is fine) and logs in: (token, user id).
async fn login(
    client: &mut UserServiceClient<Channel>,
    email: &str,
) -> anyhow::Result<(String, String)> {
    let created = client
        .create_user(users::CreateUserRequest {
            email: email.to_owned(),
            name: "Abuse Suite".to_owned(),
            password: PASSWORD.to_owned(),
        })
        .await;
    if let Err(status) = created
        && status.code() != tonic::Code::AlreadyExists
    {
        return Err(status).context("signing up");
    }
    let answer = client
        .authenticate(users::AuthenticateRequest {
            email: email.to_owned(),
            password: PASSWORD.to_owned(),
        })
        .await
        .context("logging in")?
        .into_inner();
    let id = answer.user.map(|user| user.id).unwrap_or_default();
    Ok((answer.access_token, id))
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64url_without_padding() {
        assert_eq!(super::b64(b""), "");
        assert_eq!(super::b64(b"f"), "Zg");
        assert_eq!(super::b64(b"fo"), "Zm8");
        assert_eq!(super::b64(b"foo"), "Zm9v");
        assert_eq!(super::b64(b"\xfb\xff"), "-_8");
    }
}
