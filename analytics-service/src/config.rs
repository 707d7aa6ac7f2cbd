//! analytics-service's settings: flags, each mirrored by an environment variable.

use std::path::PathBuf;

use clap::Parser;
use service_kit::config::CommonArgs;

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
