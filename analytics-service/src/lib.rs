//! Chirp's analytics-service: engagement events and their aggregates, in a
//! SQLite file that no other service touches. Producers deliver events from
//! their outboxes; each event id is applied once, whatever the deliveries.
//!
//! Layout: [`domain`] (requests and answers), [`store`] (the only sqlx code,
//! and why there is one writer), [`grpc`] (the edge).

pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod store;

use std::{future::Future, sync::Arc};

use anyhow::Context as _;
use service_kit::{
    auth::TokenVerifier,
    client::{peer, DEFAULT_CALL_TIMEOUT},
    revocation::Revocations,
    server::{Health, ServeOptions},
    store::{StoreMonitor, StoreStatus},
};
use tokio::net::TcpListener;

use crate::{config::Config, grpc::SERVICE_NAME, store::Store};

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
    let revocations = Revocations::catching_up_from(user_peer.clone(), &config.ingest_token)?;
    let verifier = Arc::new(
        TokenVerifier::configured(&config.jwt_public_key_file, user_peer)?.with_revocations(revocations.clone()),
    );
    let status = StoreStatus::new();
    let store = Store::connect_lazy(&config.database_url, status.clone()).context("DATABASE_URL")?;
    let _revocation_sync = revocations.sync(store.clone());

    let health = Health::new();
    let registry = prometheus::Registry::new();
    let _monitor = StoreMonitor::watch(
        "sqlite",
        health.clone(),
        &registry,
        vec![SERVICE_NAME],
        config.store_probe_interval,
        status,
        Arc::new(store::Prepared {
            store: store.clone(),
            revocations: revocations.clone(),
        }),
    )?;

    let api = grpc::AnalyticsApi::new(store, verifier, revocations, config.ingest_token.clone());
    let routes = tonic::service::Routes::new(
        grpc::AnalyticsServiceServer::new(api).max_decoding_message_size(grpc::MAX_REQUEST_BYTES),
    );
    service_kit::server::serve(
        ServeOptions::new("analytics-service", vec![SERVICE_NAME], &config.common),
        health,
        registry,
        listener,
        metrics_listener,
        routes,
        shutdown,
    )
    .await
}
