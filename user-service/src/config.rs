//! user-service's settings: flags, each mirrored by an environment variable.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use service_kit::config::{parse_duration, CommonArgs};

/// Chirp's user-service: accounts, credentials, roles, follows and bans, kept
/// in PostgreSQL, which no other service touches.
#[derive(Clone, Debug, Parser)]
#[command(name = "user-service", version)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// PostgreSQL URL of the service's own database
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Largest number of PostgreSQL connections
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10)]
    pub database_max_connections: u32,

    /// PKCS#8 PEM Ed25519 private key that signs tokens; every replica needs
    /// the same one. Without it a random key is made and tokens do not survive
    /// a restart (fine for development)
    #[arg(long, env = "JWT_SIGNING_KEY_FILE")]
    pub jwt_signing_key_file: Option<PathBuf>,

    /// PEM public keys of signing keys retired by a rotation, still published
    /// (and trusted by verifiers) until the tokens they signed expire;
    /// comma-separated files
    #[arg(long, env = "JWT_RETIRED_PUBLIC_KEY_FILES", value_delimiter = ',')]
    pub jwt_retired_public_key_files: Vec<PathBuf>,

    /// How long a token from Login stays valid (at most 24h: revocations are
    /// kept that long)
    #[arg(long, env = "TOKEN_TTL", value_parser = parse_duration, default_value = "60m")]
    pub token_ttl: Duration,

    /// Username of the first administrator, created (or promoted) at start-up
    /// with ADMIN_PASSWORD; nobody else can register it
    #[arg(long, env = "ADMIN_USERNAME", requires = "admin_password")]
    pub admin_username: Option<String>,

    /// Password of the first administrator, used only when creating it
    #[arg(long, env = "ADMIN_PASSWORD", hide_env_values = true, requires = "admin_username")]
    pub admin_password: Option<String>,

    /// analytics-service's gRPC endpoint: where events are delivered
    #[arg(long, env = "ANALYTICS_SERVICE_URL", default_value = "http://127.0.0.1:50054")]
    pub analytics_service_url: String,

    /// comment-service's gRPC endpoint: where bans purge comments
    #[arg(long, env = "COMMENT_SERVICE_URL", default_value = "http://127.0.0.1:50053")]
    pub comment_service_url: String,

    /// message-service's gRPC endpoint: where bans hide messages
    #[arg(long, env = "MESSAGE_SERVICE_URL", default_value = "http://127.0.0.1:50052")]
    pub message_service_url: String,

    /// Memory of one argon2id password hash, in KiB (OWASP's minimum is 19456)
    #[arg(long, env = "PASSWORD_HASH_MEMORY_KIB", default_value_t = 19_456)]
    pub password_hash_memory_kib: u32,

    /// Password hashes (Register, Login, ChangePassword) running at once; each
    /// holds PASSWORD_HASH_MEMORY_KIB. Default: the number of CPUs
    #[arg(long, env = "PASSWORD_HASH_CONCURRENCY")]
    pub password_hash_concurrency: Option<usize>,

    /// How long a call waits for a hashing slot before RESOURCE_EXHAUSTED
    #[arg(long, env = "PASSWORD_HASH_QUEUE_WAIT", value_parser = parse_duration, default_value = "250ms")]
    pub password_hash_queue_wait: Duration,

    /// Login and Register calls allowed per client address per minute (also
    /// the burst); 0 turns the limit off
    #[arg(long, env = "AUTH_REQUESTS_PER_ADDRESS_PER_MINUTE", default_value_t = 60)]
    pub auth_requests_per_address_per_minute: u32,

    /// Login attempts allowed per username per minute (also the burst), so
    /// guessing one account's password slows only that account; 0 turns the
    /// limit off
    #[arg(long, env = "LOGIN_ATTEMPTS_PER_USERNAME_PER_MINUTE", default_value_t = 10)]
    pub login_attempts_per_username_per_minute: u32,
}

/// gRPC port of user-service in ARCHITECTURE.md.
pub const DEFAULT_PORT: u16 = 50051;
/// Port of `/metrics` unless METRICS_ADDR says otherwise.
pub const DEFAULT_METRICS_PORT: u16 = 9451;

impl Config {
    #[must_use]
    pub fn password_hash_concurrency(&self) -> usize {
        self.password_hash_concurrency
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get))
    }
}
