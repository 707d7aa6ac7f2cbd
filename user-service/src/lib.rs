//! Chirp's user-service: accounts, credentials, roles, the follow graph and
//! bans, in a PostgreSQL database that no other service touches.
//!
//! Layout: [`domain`] (types that parse, no prost, no sqlx), [`store`] (the
//! only sqlx code), [`service`] (the rules), [`grpc`] (the edge).

pub mod clients;
pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod limits;
pub mod memory;
mod password;
pub mod service;
pub mod store;

use std::{future::Future, sync::Arc};

use anyhow::Context as _;
use chirp_proto::user::v1::user_service_server::SERVICE_NAME;
use service_kit::{auth::TokenSigner, bootstrap::Service, client::DEFAULT_CALL_TIMEOUT, relay::Analytics};
use tokio::net::TcpListener;

use crate::{
    config::Config,
    domain::{Password, Username},
    grpc::{UserApi, UserServiceServer},
    limits::AuthLimits,
    service::{AdminAccount, Users},
    store::Store,
};

/// This binary, for [`service_kit::bootstrap::main`].
pub const BINARY: service_kit::bootstrap::Binary = service_kit::bootstrap::Binary {
    name: "user-service",
    api: "chirp.user.v1.UserService",
    default_port: config::DEFAULT_PORT,
    default_metrics_port: config::DEFAULT_METRICS_PORT,
};

/// The store's backup and restore (see `service_kit::maintenance`), for
/// the operator routes and for `user-service backup|restore`.
///
/// # Errors
/// When the store's address is not valid.
pub fn maintenance(config: &Config) -> anyhow::Result<store::Maintenance> {
    store::Maintenance::new(&config.database_url).context("DATABASE_URL")
}

/// Runs user-service on `listener` until `shutdown` resolves.
///
/// Starts even when PostgreSQL is down: the API reports NOT_SERVING and
/// answers UNAVAILABLE until the database answers, then migrations run and it
/// turns SERVING.
///
/// # Errors
/// When the configuration is unusable or the server fails.
pub async fn run(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.token_ttl <= service_kit::auth::MAX_TOKEN_LIFETIME,
        "TOKEN_TTL may be at most {:?}: revocations are kept that long",
        service_kit::auth::MAX_TOKEN_LIFETIME
    );
    let retired_keys = service_kit::auth::PublicKey::from_pem_files(&config.jwt_retired_public_key_files)
        .context("JWT_RETIRED_PUBLIC_KEY_FILES")?;
    let signer = match &config.jwt_signing_key_file {
        Some(path) => TokenSigner::from_pem_file(path, config.token_ttl)?,
        None => {
            tracing::warn!("JWT_SIGNING_KEY_FILE is not set: signing with a random key; tokens die with this process");
            TokenSigner::generate(config.token_ttl)?
        }
    };
    let admin = match (&config.admin_username, &config.admin_password) {
        (Some(username), Some(password)) => Some(AdminAccount {
            username: Username::parse(username).map_err(|v| anyhow::anyhow!("ADMIN_USERNAME {}", v.description))?,
            password: Password::parse(password).map_err(|v| anyhow::anyhow!("ADMIN_PASSWORD {}", v.description))?,
        }),
        _ => None,
    };

    let mut service = Service::new("user-service", vec![SERVICE_NAME])?;
    let store = Store::connect_lazy(
        &config.database_url,
        config.database_max_connections,
        service.store_status(),
    )
    .context("DATABASE_URL")?;
    let hasher = password::Hasher::new(
        config.password_hash_memory_kib,
        config.password_hash_concurrency(),
        config.password_hash_queue_wait,
        service.registry(),
    )?;
    let users = Arc::new(
        Users::new(store.clone(), hasher, signer, retired_keys, admin)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let limits = AuthLimits::new(
        config.auth_requests_per_address_per_minute,
        config.login_attempts_per_username_per_minute,
    );
    service.keep(limits.spawn_forgetting());
    service.watch_store("postgresql", config.common.store_probe_interval, users.clone())?;

    let peer = |name: &'static str, url: &str| service_kit::client::peer(name, url, DEFAULT_CALL_TIMEOUT);
    service.relay(
        store::ANALYTICS,
        store.outbox(store::ANALYTICS),
        Analytics::new(
            peer("analytics-service", &config.analytics_service_url)?,
            &config.common.ingest_token,
        )?,
    );
    service.relay(
        store::COMMENTS,
        store.outbox(store::COMMENTS),
        clients::CommentService {
            peer: peer("comment-service", &config.comment_service_url)?,
            users: users.clone(),
        },
    );
    service.relay(
        store::MESSAGES,
        store.outbox(store::MESSAGES),
        clients::MessageService {
            peer: peer("message-service", &config.message_service_url)?,
            users: users.clone(),
        },
    );

    let routes = tonic::service::Routes::new(
        UserServiceServer::new(UserApi::new(users, limits, config.common.ingest_token.clone()))
            .max_decoding_message_size(grpc::MAX_REQUEST_BYTES),
    );
    // Backups and restores (`chirp backup|restore`) on the metrics port.
    service.maintenance(maintenance(&config)?, config.common.backup_dir.clone());
    service.operator_routes(&config.common.ingest_token);
    service
        .serve(&config.common, routes, listener, metrics_listener, shutdown)
        .await
}
