//! Ed25519 JWTs: user-service signs them, every service verifies them locally.
//!
//! Verification needs only public keys, read from files (deployments: a
//! Secret, so a spoofed key source cannot plant a key) or fetched from
//! user-service and cached (local development), so authentication keeps
//! working while user-service is down.
//!
//! A valid signature is not the whole answer: a token of a user who was
//! banned, deleted, demoted or changed password since it was issued is void.
//! user-service checks that against its own database; every other service
//! consults its [`Revocations`] (see [`crate::revocation`]), a projection of
//! user-service's `TokensRevoked` events kept in its own store.
//!
//! user-service also signs a *service token* for its own deliveries
//! (`scope: "service"`). It is not a user: [`TokenVerifier::authenticate`]
//! refuses it, and only the RPCs that apply user-service's events accept it,
//! through [`TokenVerifier::authenticate_service`].

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

use crate::{
    client::{Idempotency, Peer},
    revocation::Revocations,
};

/// Issuer claim of every Chirp token.
pub const ISSUER: &str = "chirp-user-service";
/// Clock skew tolerated between services.
const LEEWAY_SECS: u64 = 5;
/// The longest lifetime (`exp - iat`) a token may have. Revocations are kept
/// this long, so a token that outlives it could outlive its revocation:
/// verifiers refuse such tokens and user-service refuses such a TTL.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// `scope` claim of the token user-service signs for its own deliveries.
pub const SERVICE_SCOPE: &str = "service";

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

    /// Whether a holder of this role may moderate (ban, hide, purge, delete
    /// the content of) a user holding `target`: only users below them, the
    /// rule BanUser set and every moderation path keeps.
    #[must_use]
    pub fn may_moderate(self, target: Self) -> bool {
        self.can_moderate() && self > target
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
    /// Set only on service tokens ([`SERVICE_SCOPE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// An authenticated caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub user_id: Uuid,
    pub role: Role,
}

/// A caller and when their token was issued (Unix seconds), for the service
/// that owns the truth about revocations (user-service) to check itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    pub caller: Caller,
    pub issued_at: i64,
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
    /// The token was issued before its user's session ended (password or
    /// role change, ban lifted), or the account is gone.
    #[error("the token has been revoked; log in again")]
    Revoked,
    /// The token was issued before its user was banned.
    #[error("the account is banned")]
    Banned,
    /// This service cannot tell yet whether the token was revoked (its
    /// projection of revocations has not been read from its store).
    #[error("token revocations are not available yet")]
    RevocationsUnavailable,
    /// A service token where a user must act, or a user token where only
    /// user-service may act.
    #[error("this call is not open to this kind of token")]
    WrongKind,
}

impl From<AuthError> for tonic::Status {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::KeysUnavailable | AuthError::RevocationsUnavailable => {
                tonic::Status::unavailable(err.to_string())
            }
            AuthError::Banned | AuthError::WrongKind => tonic::Status::permission_denied(err.to_string()),
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

impl PublicKey {
    /// Every `PUBLIC KEY` (SPKI) Ed25519 key in a PEM text, in order.
    ///
    /// # Errors
    /// When a block is not an Ed25519 public key, or there is none.
    pub fn from_pem(pem: &str) -> anyhow::Result<Vec<Self>> {
        const END: &str = "-----END PUBLIC KEY-----";
        let mut keys = Vec::new();
        for block in pem.split_inclusive(END).filter(|b| b.contains(END)) {
            let key = VerifyingKey::from_public_key_pem(block.trim())
                .map_err(|e| anyhow::anyhow!("not an Ed25519 public key: {e}"))?;
            keys.push(Self::new(key.to_bytes()));
        }
        anyhow::ensure!(!keys.is_empty(), "no PUBLIC KEY block found");
        Ok(keys)
    }

    /// The keys of several PEM files (the current key and retired ones).
    ///
    /// # Errors
    /// When a file cannot be read or holds no Ed25519 public key.
    pub fn from_pem_files(paths: &[std::path::PathBuf]) -> anyhow::Result<Vec<Self>> {
        let mut keys = Vec::new();
        for path in paths {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading public key {}: {e}", path.display()))?;
            keys.extend(Self::from_pem(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?);
        }
        Ok(keys)
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
            scope: None,
        };
        let exp = claims.exp;
        Ok((self.sign(&claims)?, exp))
    }

    /// A short-lived service token: user-service's own credential when it
    /// delivers its decisions (revocations, bans, erasures) to the services
    /// that apply them. It names no user (the nil UUID) and holds the lowest
    /// role, so nothing that authorizes by role can mistake it for an admin.
    ///
    /// # Errors
    /// When signing fails (not expected).
    pub fn service_token(&self, now: i64, ttl: Duration) -> anyhow::Result<String> {
        self.sign(&Claims {
            sub: Uuid::nil().to_string(),
            role: Role::User,
            iss: ISSUER.to_owned(),
            iat: now,
            exp: now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
            scope: Some(SERVICE_SCOPE.to_owned()),
        })
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

/// Verifies tokens against cached public keys, and (where given) against a
/// service's projection of revocations.
pub struct TokenVerifier {
    keys: RwLock<KeySet>,
    source: Option<KeySource>,
    revocations: Option<Arc<Revocations>>,
    /// Tokens whose signature verified, with their claims. A session
    /// presents the same token on every call, and checking an Ed25519
    /// signature costs about 50 µs of CPU (40 % of comment-service's time
    /// per AddComment in a profile) where a lookup costs well under one.
    /// Only tokens that verified go in, so forged ones cannot fill it; expiry
    /// is checked on every use; an entry made under an older key set is
    /// ignored, so a retired key's tokens stop being accepted exactly when
    /// they did without it. Revocations are checked on every call, after it.
    verified: moka::sync::Cache<Arc<str>, Verified>,
}

/// Tokens the verifier remembers having verified; about half a kilobyte
/// each, so a few MiB at most.
const VERIFIED_CAPACITY: u64 = 10_000;

/// The trusted keys by id, and a number that changes whenever they do.
#[derive(Default)]
struct KeySet {
    generation: u64,
    keys: HashMap<String, Arc<DecodingKey>>,
}

#[derive(Clone)]
struct Verified {
    claims: Arc<Claims>,
    /// [`KeySet::generation`] of the keys it verified under.
    generation: u64,
}

/// How a verifier that fetches its keys from user-service refreshes them.
#[derive(Clone, Copy, Debug)]
pub struct KeyRefresh {
    /// Shortest time between two fetches triggered by unknown key ids, so a
    /// flood of forged tokens cannot turn into a flood of calls to
    /// user-service.
    pub min_interval: Duration,
    /// How often the key set is fetched again even when every token names a
    /// known key: a key user-service stopped publishing is dropped then, so
    /// a retired key is trusted for at most this long after its retirement.
    pub max_age: Duration,
}

impl Default for KeyRefresh {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(5),
            max_age: Duration::from_secs(300),
        }
    }
}

struct KeySource {
    user_service: Arc<Peer>,
    refresh: KeyRefresh,
    /// When the last fetch was tried, and when one last succeeded.
    fetches: tokio::sync::Mutex<Fetches>,
}

#[derive(Default)]
struct Fetches {
    tried: Option<Instant>,
    succeeded: Option<Instant>,
}

impl TokenVerifier {
    /// Verifies with a fixed set of keys (user-service's own, or key files).
    #[must_use]
    pub fn with_keys(keys: &[PublicKey]) -> Self {
        let verifier = Self {
            keys: RwLock::new(KeySet::default()),
            source: None,
            revocations: None,
            verified: verified_cache(),
        };
        verifier.replace_keys(keys);
        verifier
    }

    /// Reads PEM `PUBLIC KEY` (SPKI) Ed25519 key files: the current key and
    /// any retired keys whose tokens may still be live.
    ///
    /// # Errors
    /// When a file cannot be read or holds no Ed25519 public key.
    pub fn from_pem_files(paths: &[std::path::PathBuf]) -> anyhow::Result<Self> {
        Ok(Self::with_keys(&PublicKey::from_pem_files(paths)?))
    }

    /// Reads one PEM key file (see [`TokenVerifier::from_pem_files`]).
    ///
    /// # Errors
    /// When the file cannot be read or holds no Ed25519 public key.
    pub fn from_pem_file(path: &Path) -> anyhow::Result<Self> {
        Self::from_pem_files(&[path.to_path_buf()])
    }

    /// Key files when there are any (deployments), else keys fetched from
    /// user-service (local development).
    ///
    /// # Errors
    /// When a key file cannot be read.
    pub fn configured(key_files: &[std::path::PathBuf], user_service: Arc<Peer>) -> anyhow::Result<Self> {
        if key_files.is_empty() {
            Ok(Self::from_user_service(user_service))
        } else {
            Self::from_pem_files(key_files)
        }
    }

    /// Fetches keys from user-service on first use, when a token names an
    /// unknown key, and every [`KeyRefresh::max_age`]; cached keys keep
    /// verifying while user-service is down.
    #[must_use]
    pub fn from_user_service(user_service: Arc<Peer>) -> Self {
        Self::from_user_service_with(user_service, KeyRefresh::default())
    }

    #[must_use]
    pub fn from_user_service_with(user_service: Arc<Peer>, refresh: KeyRefresh) -> Self {
        Self {
            keys: RwLock::new(KeySet::default()),
            source: Some(KeySource {
                user_service,
                refresh,
                fetches: tokio::sync::Mutex::new(Fetches::default()),
            }),
            revocations: None,
            verified: verified_cache(),
        }
    }

    /// Also refuses tokens that `revocations` says are void.
    #[must_use]
    pub fn with_revocations(mut self, revocations: Arc<Revocations>) -> Self {
        self.revocations = Some(revocations);
        self
    }

    /// What every service that verifies users' tokens builds at start-up:
    /// the revocations it keeps, which catch up from `user_service` with the
    /// ingest token, and a verifier that consults them, its keys from
    /// `key_files` or else from user-service ([`Self::configured`]).
    ///
    /// # Errors
    /// When a key file cannot be read or the ingest token is unusable.
    pub fn with_revocations_from(
        user_service: Arc<Peer>,
        key_files: &[std::path::PathBuf],
        ingest_token: &str,
    ) -> anyhow::Result<(Arc<Self>, Arc<Revocations>)> {
        let revocations = Revocations::catching_up_from(user_service.clone(), ingest_token)?;
        let verifier = Self::configured(key_files, user_service)?.with_revocations(revocations.clone());
        Ok((Arc::new(verifier), revocations))
    }

    /// Makes `keys` the whole trusted set: a key left out is no longer
    /// trusted.
    fn replace_keys(&self, keys: &[PublicKey]) {
        let fresh: HashMap<String, Arc<DecodingKey>> = keys
            .iter()
            .filter_map(|key| {
                let decoding = DecodingKey::from_ed_components(&URL_SAFE_NO_PAD.encode(key.bytes)).ok()?;
                Some((key.key_id.clone(), Arc::new(decoding)))
            })
            .collect();
        let mut set = self.keys.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        set.generation += 1;
        set.keys = fresh;
        drop(set);
        // Unusable now (wrong generation); this only frees the memory.
        self.verified.invalidate_all();
    }

    /// The key `kid` and the generation of the key set it belongs to, read
    /// together.
    fn key(&self, kid: &str) -> Option<(Arc<DecodingKey>, u64)> {
        let set = self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        set.keys.get(kid).map(|key| (key.clone(), set.generation))
    }

    fn generation(&self) -> u64 {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .generation
    }

    /// What the cache knows of `token` at Unix time `now`: its claims, or
    /// that it has expired since it verified; `None` when it must be
    /// verified.
    fn cached(&self, token: &str, now: i64) -> Option<Result<Arc<Claims>, AuthError>> {
        let hit = self.verified.get(token)?;
        if hit.generation != self.generation() {
            return None;
        }
        if hit.claims.exp.saturating_add(LEEWAY_SECS.cast_signed()) < now {
            self.verified.invalidate(token);
            return Some(Err(AuthError::Expired));
        }
        Some(Ok(hit.claims))
    }

    fn bearer(metadata: &MetadataMap) -> Result<&str, AuthError> {
        let header = metadata
            .get("authorization")
            .ok_or(AuthError::Missing)?
            .to_str()
            .map_err(|_| AuthError::Malformed)?;
        header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or(AuthError::Malformed)
    }

    /// Authenticates a user from `authorization: Bearer <token>` metadata:
    /// the signature, the expiry, the kind (a service token is refused) and,
    /// where this verifier has them, the revocations.
    ///
    /// # Errors
    /// [`AuthError`] saying why the caller is not authenticated.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, AuthError> {
        Ok(self.authenticate_session(metadata).await?.caller)
    }

    /// [`TokenVerifier::authenticate`], with the token's issue time.
    ///
    /// # Errors
    /// [`AuthError`] saying why the caller is not authenticated.
    pub async fn authenticate_session(&self, metadata: &MetadataMap) -> Result<Session, AuthError> {
        self.verify_session(Self::bearer(metadata)?).await
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

    /// Accepts only user-service's service token (see
    /// [`TokenSigner::service_token`]).
    ///
    /// # Errors
    /// [`AuthError::WrongKind`] for a user's token; otherwise why the token
    /// does not verify.
    pub async fn authenticate_service(&self, metadata: &MetadataMap) -> Result<(), AuthError> {
        let claims = self.decode(Self::bearer(metadata)?).await?;
        if claims.scope.as_deref() == Some(SERVICE_SCOPE) {
            Ok(())
        } else {
            Err(AuthError::WrongKind)
        }
    }

    /// Verifies a user's token.
    ///
    /// # Errors
    /// [`AuthError`] saying why the token is not valid.
    pub async fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        Ok(self.verify_session(token).await?.caller)
    }

    async fn verify_session(&self, token: &str) -> Result<Session, AuthError> {
        let claims = self.decode(token).await?;
        if claims.scope.is_some() {
            return Err(AuthError::WrongKind);
        }
        let user_id = Uuid::try_parse(&claims.sub).map_err(|_| AuthError::Malformed)?;
        if let Some(revocations) = &self.revocations {
            revocations.check(user_id, claims.iat)?;
        }
        Ok(Session {
            caller: Caller {
                user_id,
                role: claims.role,
            },
            issued_at: claims.iat,
        })
    }

    /// Checks signature, issuer, expiry and lifetime; the claims.
    async fn decode(&self, token: &str) -> Result<Arc<Claims>, AuthError> {
        // Before the cache, so that keys are refreshed on schedule even
        // while every token is a known one.
        self.refresh_if_old().await;
        if let Some(known) = self.cached(token, chrono::Utc::now().timestamp()) {
            return known;
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(AuthError::Malformed);
        }
        let kid = header.kid.ok_or(AuthError::Malformed)?;
        let (key, generation) = match self.key(&kid) {
            Some(found) => found,
            None => self.fetch_for(&kid).await?,
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
        let lifetime = data.claims.exp.saturating_sub(data.claims.iat);
        if lifetime > i64::try_from(MAX_TOKEN_LIFETIME.as_secs()).unwrap_or(i64::MAX) {
            // Could outlive the revocations kept for it.
            return Err(AuthError::Malformed);
        }
        let claims = Arc::new(data.claims);
        self.verified.insert(
            token.into(),
            Verified {
                claims: claims.clone(),
                generation,
            },
        );
        Ok(claims)
    }

    /// Fetches the key set again when it is older than its refresh age. One
    /// request does it; the others go on with the keys they have.
    async fn refresh_if_old(&self) {
        let Some(source) = &self.source else { return };
        let Ok(mut fetches) = source.fetches.try_lock() else {
            return;
        };
        let stale = fetches
            .succeeded
            .is_some_and(|at| at.elapsed() >= source.refresh.max_age);
        if stale {
            // A failure keeps the cached keys: user-service may be down.
            let _ = self.fetch(source, &mut fetches).await;
        }
    }

    /// The key `kid` after fetching the key set, at most once per
    /// [`KeyRefresh::min_interval`].
    async fn fetch_for(&self, kid: &str) -> Result<(Arc<DecodingKey>, u64), AuthError> {
        let Some(source) = &self.source else {
            return Err(AuthError::UnknownKey);
        };
        let mut fetches = source.fetches.lock().await;
        // Another request may have fetched while this one waited for the
        // lock: the key may be here now, and must not be reported unknown
        // just because the fetch that brought it was recent.
        if let Some(key) = self.key(kid) {
            return Ok(key);
        }
        let recent = fetches
            .tried
            .is_some_and(|at| at.elapsed() < source.refresh.min_interval);
        if !recent {
            self.fetch(source, &mut fetches).await?;
        }
        self.key(kid).ok_or_else(|| self.missing())
    }

    fn missing(&self) -> AuthError {
        if self.is_empty() {
            AuthError::KeysUnavailable
        } else {
            AuthError::UnknownKey
        }
    }

    async fn fetch(&self, source: &KeySource, fetches: &mut Fetches) -> Result<(), AuthError> {
        fetches.tried = Some(Instant::now());
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
                self.replace_keys(&keys);
                fetches.succeeded = Some(Instant::now());
                Ok(())
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "fetching token keys from user-service");
                // Let the next request try again rather than waiting out the interval.
                fetches.tried = None;
                Err(self.missing())
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys
            .is_empty()
    }
}

fn verified_cache() -> moka::sync::Cache<Arc<str>, Verified> {
    moka::sync::Cache::builder().max_capacity(VERIFIED_CAPACITY).build()
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
    async fn a_verified_token_is_remembered_until_it_expires_and_forgotten_when_the_keys_change() {
        let signer = TokenSigner::generate(Duration::from_secs(60)).unwrap();
        let verifier = TokenVerifier::with_keys(&[signer.public_key()]);
        let who = caller(Role::User);
        let now = chrono::Utc::now().timestamp();
        let (token, exp) = signer.issue(who, now).unwrap();
        assert!(verifier.cached(&token, now).is_none(), "nothing verified yet");
        assert_eq!(verifier.verify(&token).await.unwrap(), who);
        assert_eq!(
            verifier.cached(&token, now).unwrap().unwrap().sub,
            who.user_id.to_string()
        );

        let after_expiry = exp + i64::try_from(LEEWAY_SECS).unwrap() + 1;
        assert!(matches!(
            verifier.cached(&token, after_expiry),
            Some(Err(AuthError::Expired))
        ));

        assert_eq!(verifier.verify(&token).await.unwrap(), who);
        let other = TokenSigner::generate(Duration::from_secs(60)).unwrap();
        verifier.replace_keys(&[other.public_key()]);
        assert!(verifier.cached(&token, now).is_none());
        assert!(matches!(verifier.verify(&token).await, Err(AuthError::UnknownKey)));
    }

    #[tokio::test]
    async fn a_token_that_does_not_verify_is_not_remembered() {
        let signer = TokenSigner::generate(Duration::from_secs(60)).unwrap();
        let verifier = TokenVerifier::with_keys(&[signer.public_key()]);
        let now = chrono::Utc::now().timestamp();
        let (token, _) = signer.issue(caller(Role::User), now).unwrap();
        let (header_and_claims, _) = token.rsplit_once('.').unwrap();
        let forged = format!("{header_and_claims}.{}", URL_SAFE_NO_PAD.encode([7u8; 64]));
        for _ in 0..2 {
            assert!(matches!(verifier.verify(&forged).await, Err(AuthError::BadSignature)));
            assert!(verifier.cached(&forged, now).is_none());
        }
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
            scope: None,
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
