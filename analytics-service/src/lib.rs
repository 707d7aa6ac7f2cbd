//! Chirp's analytics-service: engagement events and their aggregates, in a
//! SQLite file that no other service touches. Producers deliver events from
//! their outboxes; each event id is applied once, whatever the deliveries.
//!
//! Layout: [`domain`] (requests and answers, parsed), [`store`] (the only
//! sqlx code, and why there is one writer), [`service`] (the rules),
//! [`grpc`] (the edge).

pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod service;
pub mod store;

use std::{future::Future, sync::Arc};

use anyhow::Context as _;
use service_kit::{
    auth::TokenVerifier,
    bootstrap::Service,
    client::{peer, DEFAULT_CALL_TIMEOUT},
};
use tokio::net::TcpListener;

use crate::{config::Config, grpc::SERVICE_NAME, store::Store};

/// This binary, for [`service_kit::bootstrap::main`].
pub const BINARY: service_kit::bootstrap::Binary = service_kit::bootstrap::Binary {
    name: "analytics-service",
    api: "chirp.analytics.v1.AnalyticsService",
    default_port: config::DEFAULT_PORT,
    default_metrics_port: config::DEFAULT_METRICS_PORT,
};

/// The store's backup and restore (see `service_kit::maintenance`), for
/// the operator routes and for `analytics-service backup|restore`.
///
/// # Errors
/// When the store's address is not valid.
pub fn maintenance(config: &Config) -> anyhow::Result<store::Maintenance> {
    store::Maintenance::new(&config.database_url).context("DATABASE_URL")
}

/// Runs analytics-service on `listener` until `shutdown` resolves.
///
/// # Errors
/// When the configuration is unusable or the server fails.
pub async fn run(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let user_peer = peer("user-service", &config.user_service_url, DEFAULT_CALL_TIMEOUT)?;
    let (verifier, revocations) =
        TokenVerifier::with_revocations_from(user_peer, &config.jwt_public_key_file, &config.common.ingest_token)?;
    let mut service = Service::new("analytics-service", vec![SERVICE_NAME])?;
    let store = Store::connect_lazy(&config.database_url, service.store_status()).context("DATABASE_URL")?;
    service.keep(revocations.sync(store.clone(), service.store_status()));
    service.watch_store(
        "sqlite",
        config.common.store_probe_interval,
        Arc::new(store::Prepared {
            store: store.clone(),
            revocations: revocations.clone(),
        }),
    )?;

    // Maintenance, backups and restores (`chirp backup|restore`) on the
    // metrics port.
    service.maintenance(maintenance(&config)?, config.common.backup_dir.clone());
    service.operator_routes(&config.common.ingest_token);

    let analytics = Arc::new(service::Analytics::new(store, revocations));
    let api = grpc::AnalyticsApi::new(analytics, verifier, config.common.ingest_token.clone());
    let routes = tonic::service::Routes::new(
        grpc::AnalyticsServiceServer::new(api).max_decoding_message_size(grpc::MAX_REQUEST_BYTES),
    );
    service
        .serve(&config.common, routes, listener, metrics_listener, shutdown)
        .await
}
