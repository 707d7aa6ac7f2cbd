//! analytics-service's settings: flags, each mirrored by an environment variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use service_kit::config::{parse_duration, CommonArgs};

/// Chirp's analytics-service: engagement events and their aggregates, in a
/// SQLite file that no other service touches.
#[derive(Clone, Debug, Parser)]
#[command(name = "analytics-service", version)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// SQLite URL of the service's own database file
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://analytics.db")]
    pub database_url: String,

    /// How often the database is probed to drive health
    #[arg(long, env = "STORE_PROBE_INTERVAL", value_parser = parse_duration, default_value = "1s")]
    pub store_probe_interval: Duration,

    /// Shared secret producers present as `x-chirp-ingest-token` to RecordEvents
    #[arg(
        long,
        env = "INGEST_TOKEN",
        hide_env_values = true,
        default_value = "chirp-dev-ingest-token"
    )]
    pub ingest_token: String,

    /// user-service's gRPC endpoint: token keys
    #[arg(long, env = "USER_SERVICE_URL", default_value = "http://127.0.0.1:50051")]
    pub user_service_url: String,

    /// PEM Ed25519 public keys that verify tokens (deployments mount them
    /// from a Secret: the current key, and retired keys until their tokens
    /// expire), comma-separated files. Without them the keys are fetched from
    /// user-service and cached (local development)
    #[arg(long, env = "JWT_PUBLIC_KEY_FILE", value_delimiter = ',')]
    pub jwt_public_key_file: Vec<PathBuf>,
}

/// gRPC port of analytics-service in ARCHITECTURE.md.
pub const DEFAULT_PORT: u16 = 50054;
/// Port of `/metrics` unless METRICS_ADDR says otherwise.
pub const DEFAULT_METRICS_PORT: u16 = 9454;

impl Config {
    #[must_use]
    pub fn listen_addr(&self) -> SocketAddr {
        self.common.listen_addr(DEFAULT_PORT)
    }

    #[must_use]
    pub fn metrics_addr(&self) -> SocketAddr {
        self.common.metrics_addr(DEFAULT_METRICS_PORT)
    }
}
