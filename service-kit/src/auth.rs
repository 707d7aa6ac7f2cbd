//! Ed25519 JWTs: user-service signs them, every service verifies them locally.
//!
//! Verification needs only public keys, fetched once from user-service (or read
//! from a file) and cached, so authentication keeps working while
//! user-service is down.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use ed25519_dalek::{
    pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey},
    SigningKey, VerifyingKey,
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;
use uuid::Uuid;

use crate::client::{Idempotency, Peer};

/// Issuer claim of every Chirp token.
pub const ISSUER: &str = "chirp-user-service";
/// Clock skew tolerated between services.
const LEEWAY_SECS: u64 = 5;
/// Shortest time between two key fetches triggered by unknown key ids, so a
/// flood of forged tokens cannot turn into a flood of calls to user-service.
const REFETCH_INTERVAL: Duration = Duration::from_secs(30);

/// What a user may do beyond their own content, in increasing power.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Moderator,
    Admin,
}

impl Role {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Moderator => "moderator",
            Self::Admin => "admin",
        }
    }

    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "user" => Some(Self::User),
            "moderator" => Some(Self::Moderator),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    /// Moderators and admins may moderate.
    #[must_use]
    pub fn can_moderate(self) -> bool {
        self >= Self::Moderator
    }
}

/// The claims of a Chirp token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub iss: String,
    pub iat: i64,
    pub exp: i64,
}

/// An authenticated caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub user_id: Uuid,
    pub role: Role,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing `authorization: Bearer <token>` metadata")]
    Missing,
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token's key is unknown")]
    UnknownKey,
    /// No key is known yet and user-service cannot be asked.
    #[error("token keys are not available yet")]
    KeysUnavailable,
}

impl From<AuthError> for tonic::Status {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::KeysUnavailable => tonic::Status::unavailable(err.to_string()),
            _ => tonic::Status::unauthenticated(err.to_string()),
        }
    }
}

/// An Ed25519 public key and the id tokens name it by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    pub key_id: String,
    pub bytes: [u8; 32],
}

impl PublicKey {
    #[must_use]
    pub fn new(bytes: [u8; 32]) -> Self {
        Self {
            key_id: key_id(&bytes),
            bytes,
        }
    }
}

/// Derived from the key itself, so every replica holding the same key file
/// names it the same way.
fn key_id(bytes: &[u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(&bytes[..9])
}

/// Signs tokens. Only user-service holds one.
pub struct TokenSigner {
    key_id: String,
    encoding: EncodingKey,
    public: PublicKey,
    ttl: Duration,
}

impl TokenSigner {
    /// A fresh random key: tokens do not survive a restart. For development
    /// and tests; production loads a key file shared by all replicas.
    ///
    /// # Errors
    /// When the key cannot be encoded (not expected).
    pub fn generate(ttl: Duration) -> anyhow::Result<Self> {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        Self::from_signing_key(&key, ttl)
    }

    /// A new random private key as PKCS#8 PEM, the format
    /// [`TokenSigner::from_pem_file`] reads: for key files made by tools and
    /// tests.
    ///
    /// # Errors
    /// When the key cannot be encoded (not expected).
    pub fn generate_pem() -> anyhow::Result<String> {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        key.to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .map(|pem| pem.to_string())
            .map_err(|e| anyhow::anyhow!("encoding a signing key: {e}"))
    }

    /// Loads a PKCS#8 PEM Ed25519 private key (`openssl genpkey -algorithm ed25519`).
    ///
    /// # Errors
    /// When the file cannot be read or holds no Ed25519 private key.
    pub fn from_pem_file(path: &Path, ttl: Duration) -> anyhow::Result<Self> {
        let pem = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading signing key {}: {e}", path.display()))?;
        let key = SigningKey::from_pkcs8_pem(&pem)
            .map_err(|e| anyhow::anyhow!("{} is not an Ed25519 PKCS#8 key: {e}", path.display()))?;
        Self::from_signing_key(&key, ttl)
    }

    fn from_signing_key(key: &SigningKey, ttl: Duration) -> anyhow::Result<Self> {
        let der = key
            .to_pkcs8_der()
            .map_err(|e| anyhow::anyhow!("encoding signing key: {e}"))?;
        let public = PublicKey::new(key.verifying_key().to_bytes());
        Ok(Self {
            key_id: public.key_id.clone(),
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            public,
            ttl,
        })
    }

    #[must_use]
    pub fn public_key(&self) -> PublicKey {
        self.public.clone()
    }

    /// The public key as a PEM `PUBLIC KEY`, the format
    /// [`TokenVerifier::from_pem_file`] reads.
    ///
    /// # Errors
    /// When the key cannot be encoded (not expected).
    pub fn public_key_pem(&self) -> anyhow::Result<String> {
        use ed25519_dalek::pkcs8::EncodePublicKey as _;
        VerifyingKey::from_bytes(&self.public.bytes)
            .map_err(|e| anyhow::anyhow!("public key: {e}"))?
            .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .map_err(|e| anyhow::anyhow!("encoding a public key: {e}"))
    }

    /// A token for `caller`, valid for the signer's TTL from `now` (Unix seconds).
    ///
    /// # Errors
    /// When signing fails (not expected with a valid key).
    pub fn issue(&self, caller: Caller, now: i64) -> anyhow::Result<(String, i64)> {
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let claims = Claims {
            sub: caller.user_id.to_string(),
            role: caller.role,
            iss: ISSUER.to_owned(),
            iat: now,
            exp: now.saturating_add(ttl),
        };
        let exp = claims.exp;
        Ok((self.sign(&claims)?, exp))
    }

    /// Signs arbitrary claims (tests use it for expired tokens).
    ///
    /// # Errors
    /// When signing fails.
    pub fn sign(&self, claims: &Claims) -> anyhow::Result<String> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.key_id.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(|e| anyhow::anyhow!("signing token: {e}"))
    }
}

/// Verifies tokens against cached public keys.
pub struct TokenVerifier {
    keys: RwLock<HashMap<String, Arc<DecodingKey>>>,
    source: Option<KeySource>,
}

struct KeySource {
    user_service: Arc<Peer>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl TokenVerifier {
    /// Verifies with a fixed set of keys (user-service's own, or a key file).
    #[must_use]
    pub fn with_keys(keys: &[PublicKey]) -> Self {
        let verifier = Self {
            keys: RwLock::new(HashMap::new()),
            source: None,
        };
        verifier.install(keys);
        verifier
    }

    /// Reads a PEM `PUBLIC KEY` (SPKI) Ed25519 key file.
    ///
    /// # Errors
    /// When the file cannot be read or holds no Ed25519 public key.
    pub fn from_pem_file(path: &Path) -> anyhow::Result<Self> {
        let pem =
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading public key {}: {e}", path.display()))?;
        let key = VerifyingKey::from_public_key_pem(&pem)
            .map_err(|e| anyhow::anyhow!("{} is not an Ed25519 public key: {e}", path.display()))?;
        Ok(Self::with_keys(&[PublicKey::new(key.to_bytes())]))
    }

    /// Fetches keys from user-service on first use and when a token names an
    /// unknown key; cached keys keep verifying while user-service is down.
    #[must_use]
    pub fn from_user_service(user_service: Arc<Peer>) -> Self {
        Self {
            keys: RwLock::new(HashMap::new()),
            source: Some(KeySource {
                user_service,
                last_fetch: tokio::sync::Mutex::new(None),
            }),
        }
    }

    fn install(&self, keys: &[PublicKey]) {
        let mut map = self.keys.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        for key in keys {
            let decoding = DecodingKey::from_ed_components(&URL_SAFE_NO_PAD.encode(key.bytes));
            if let Ok(decoding) = decoding {
                map.insert(key.key_id.clone(), Arc::new(decoding));
            }
        }
    }

    fn key(&self, kid: &str) -> Option<Arc<DecodingKey>> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(kid)
            .cloned()
    }

    /// Authenticates the caller from `authorization: Bearer <token>` metadata.
    ///
    /// # Errors
    /// [`AuthError`] saying why the caller is not authenticated.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, AuthError> {
        let header = metadata
            .get("authorization")
            .ok_or(AuthError::Missing)?
            .to_str()
            .map_err(|_| AuthError::Malformed)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(AuthError::Malformed)?;
        self.verify(token.trim()).await
    }

    /// The caller if `metadata` carries a token, `None` if it carries none.
    ///
    /// # Errors
    /// When a token is present but does not verify.
    pub async fn authenticate_optional(&self, metadata: &MetadataMap) -> Result<Option<Caller>, AuthError> {
        if metadata.get("authorization").is_none() {
            return Ok(None);
        }
        self.authenticate(metadata).await.map(Some)
    }

    /// Verifies a token.
    ///
    /// # Errors
    /// [`AuthError`] saying why the token is not valid.
    pub async fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(AuthError::Malformed);
        }
        let kid = header.kid.ok_or(AuthError::Malformed)?;
        let key = match self.key(&kid) {
            Some(key) => key,
            None => {
                self.refresh().await?;
                self.key(&kid).ok_or(AuthError::UnknownKey)?
            }
        };
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
        validation.leeway = LEEWAY_SECS;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                _ => AuthError::Malformed,
            }
        })?;
        let user_id = Uuid::try_parse(&data.claims.sub).map_err(|_| AuthError::Malformed)?;
        Ok(Caller {
            user_id,
            role: data.claims.role,
        })
    }

    async fn refresh(&self) -> Result<(), AuthError> {
        let Some(source) = &self.source else {
            return Err(AuthError::UnknownKey);
        };
        let mut last = source.last_fetch.lock().await;
        if last.is_some_and(|at| at.elapsed() < REFETCH_INTERVAL) {
            return Err(if self.is_empty() {
                AuthError::KeysUnavailable
            } else {
                AuthError::UnknownKey
            });
        }
        *last = Some(Instant::now());
        let response = source
            .user_service
            .call(
                Idempotency::Idempotent,
                chirp_proto::user::v1::GetPublicKeysRequest {},
                |channel, request| async move {
                    chirp_proto::user::v1::user_service_client::UserServiceClient::new(channel)
                        .get_public_keys(request)
                        .await
                },
            )
            .await;
        match response {
            Ok(response) => {
                let keys: Vec<PublicKey> = response
                    .keys
                    .into_iter()
                    .filter(|k| k.algorithm == "EdDSA")
                    .filter_map(|k| <[u8; 32]>::try_from(k.public_key.as_slice()).ok())
                    .map(PublicKey::new)
                    .collect();
                self.install(&keys);
                Ok(())
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "fetching token keys from user-service");
                // Let the next request try again rather than waiting out the interval.
                *last = None;
                Err(if self.is_empty() {
                    AuthError::KeysUnavailable
                } else {
                    AuthError::UnknownKey
                })
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(role: Role) -> Caller {
        Caller {
            user_id: Uuid::new_v4(),
            role,
        }
    }

    fn bearer(token: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", format!("Bearer {token}").parse().unwrap());
        metadata
    }

    #[tokio::test]
    async fn a_token_verifies_with_its_signers_public_key() {
        let signer = TokenSigner::generate(Duration::from_secs(60)).unwrap();
        let verifier = TokenVerifier::with_keys(&[signer.public_key()]);
        let who = caller(Role::Moderator);
        let (token, _) = signer.issue(who, chrono::Utc::now().timestamp()).unwrap();
        assert_eq!(verifier.authenticate(&bearer(&token)).await.unwrap(), who);
    }

    #[tokio::test]
    async fn a_token_from_another_key_is_rejected() {
        let signer = TokenSigner::generate(Duration::from_secs(60)).unwrap();
        let other = TokenSigner::generate(Duration::from_secs(60)).unwrap();
        let verifier = TokenVerifier::with_keys(&[signer.public_key()]);
        let (token, _) = other.issue(caller(Role::User), chrono::Utc::now().timestamp()).unwrap();
        assert!(matches!(verifier.verify(&token).await, Err(AuthError::UnknownKey)));

        // Same key id, different key: the signature is what fails.
        let forged = {
            let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
            let (good, _) = signer
                .issue(caller(Role::Admin), chrono::Utc::now().timestamp())
                .unwrap();
            parts[0] = good.split('.').next().unwrap().to_owned();
            parts.join(".")
        };
        assert!(matches!(verifier.verify(&forged).await, Err(AuthError::BadSignature)));
    }

    #[tokio::test]
    async fn a_public_key_file_verifies_the_signers_tokens() {
        let signer = TokenSigner::generate(Duration::from_secs(60)).unwrap();
        let dir = std::env::temp_dir().join(format!("chirp-key-{}", Uuid::new_v4()));
        std::fs::write(&dir, signer.public_key_pem().unwrap()).unwrap();
        let verifier = TokenVerifier::from_pem_file(&dir);
        std::fs::remove_file(&dir).unwrap();
        let who = caller(Role::User);
        let (token, _) = signer.issue(who, chrono::Utc::now().timestamp()).unwrap();
        assert_eq!(verifier.unwrap().verify(&token).await.unwrap(), who);
    }

    #[tokio::test]
    async fn an_expired_token_is_rejected() {
        let signer = TokenSigner::generate(Duration::from_secs(60)).unwrap();
        let verifier = TokenVerifier::with_keys(&[signer.public_key()]);
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub: Uuid::new_v4().to_string(),
            role: Role::User,
            iss: ISSUER.into(),
            iat: now - 7200,
            exp: now - 3600,
        };
        let token = signer.sign(&claims).unwrap();
        assert!(matches!(verifier.verify(&token).await, Err(AuthError::Expired)));
    }

    #[tokio::test]
    async fn missing_and_malformed_authorization_is_rejected() {
        let verifier = TokenVerifier::with_keys(&[]);
        assert!(matches!(
            verifier.authenticate(&MetadataMap::new()).await,
            Err(AuthError::Missing)
        ));
        assert!(matches!(
            verifier.authenticate(&bearer("x.y.z")).await,
            Err(AuthError::Malformed)
        ));
        assert_eq!(verifier.authenticate_optional(&MetadataMap::new()).await.unwrap(), None);
    }

    #[test]
    fn roles_are_ordered_by_power() {
        assert!(Role::Admin > Role::Moderator && Role::Moderator > Role::User);
        assert!(Role::Moderator.can_moderate() && !Role::User.can_moderate());
        for role in [Role::User, Role::Moderator, Role::Admin] {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
    }
}
