//! Chirp's comment-service: comments on messages, in a Redis that no other
//! service touches. The data model is documented in [`store`].
//!
//! Layout: [`domain`] (types that parse), [`store`] (the only Redis code),
//! [`clients`] (the message existence check), [`service`] (the rules),
//! [`grpc`] (the edge).

pub mod clients;
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
    relay::{self, Analytics, RelayConfig, Relays},
    revocation::Revocations,
    server::{Health, ServeOptions},
    store::{StoreMonitor, StoreStatus},
};
use tokio::net::TcpListener;

use crate::{
    clients::{MessageClient, UserClient},
    config::Config,
    grpc::SERVICE_NAME,
    service::Comments,
    store::Store,
};

/// Runs comment-service on `listener` until `shutdown` resolves. Starts even
/// while Redis or its peers are down.
///
/// # Errors
/// When the configuration is unusable or the server fails.
pub async fn run(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let peer = |name: &'static str, url: &str| service_kit::client::peer(name, url, config.peer_timeout);
    let user_peer = peer("user-service", &config.user_service_url)?;
    let revocations = Revocations::catching_up_from(user_peer.clone(), &config.ingest_token)?;
    let verifier = Arc::new(
        TokenVerifier::configured(&config.jwt_public_key_file, user_peer.clone())?
            .with_revocations(revocations.clone()),
    );
    let messages = MessageClient::new(peer("message-service", &config.message_service_url)?);

    let status = StoreStatus::new();
    let store =
        Store::connect_lazy(&config.redis_url, &config.redis_key_prefix, status.clone()).context("REDIS_URL")?;
    let health = Health::new();
    let registry = prometheus::Registry::new();
    service_kit::client::register_metrics(&registry)?;
    let mut relays = Relays::new(&registry)?.gated_by(status.clone());
    relays.spawn(
        RelayConfig::new("analytics"),
        store.outbox(),
        Analytics::new(
            peer("analytics-service", &config.analytics_service_url)?,
            &config.ingest_token,
        )?,
    );
    let relays = Arc::new(relays);
    let _revocation_sync = revocations.sync(store.revocation_store());
    let purges = service_kit::jobs::spawn(
        "erasures_pending",
        "Purges of users' and deleted messages' comments recorded and not finished",
        service::Purges(store.clone()),
        &registry,
    )?;
    let comments = Arc::new(Comments::new(
        store,
        messages,
        UserClient::new(user_peer),
        revocations,
        purges.waker(),
        config.message_exists_cache_ttl,
    ));
    let _monitor = StoreMonitor::watch(
        "redis",
        health.clone(),
        &registry,
        vec![SERVICE_NAME],
        config.store_probe_interval,
        status.clone(),
        comments.clone(),
    )?;

    let api = grpc::CommentApi::new(comments, verifier, config.ingest_token.clone());
    let routes = tonic::service::Routes::new(
        grpc::CommentServiceServer::new(api).max_decoding_message_size(grpc::MAX_REQUEST_BYTES),
    );
    service_kit::server::serve(
        ServeOptions::new("comment-service", vec![SERVICE_NAME], &config.common)
            .with_operator_routes(relay::operator_routes(relays, &config.ingest_token)),
        health,
        registry,
        listener,
        metrics_listener,
        routes,
        shutdown,
    )
    .await
}
