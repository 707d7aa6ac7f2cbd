//! One start-up for every service, so that each service's `main.rs` and
//! `lib.rs` say only what is their own (their store, their peers, their
//! routes) and the rest is the same everywhere:
//!
//! - [`main`]: the binary: `healthcheck` for containers, flags and
//!   environment, logs and traces ([`crate::telemetry`]), the two
//!   listeners, SIGTERM, and the last spans flushed after the server stops;
//! - [`Service`]: what runs beside the routes: one metrics registry with
//!   the client stack's and the store operations' metrics in it, the health
//!   reporter, the store status and its monitor, the outbox relays (which
//!   wait for the store), background jobs, and [`Service::serve`].

use std::{any::Any, future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use prometheus::Registry;
use tokio::{net::TcpListener, sync::Notify};

use crate::{
    config::CommonArgs,
    jobs::Jobs,
    relay::{Destination, Outbox, RelayConfig, Relays},
    server::{Health, ServeOptions},
    store::{Probe, StoreMonitor, StoreStatus},
    telemetry::Telemetry,
};

/// A service binary: its name (logs, metrics, traces), the API a container
/// healthcheck asks about, and its default ports.
#[derive(Clone, Copy, Debug)]
pub struct Binary {
    pub name: &'static str,
    pub api: &'static str,
    pub default_port: u16,
    pub default_metrics_port: u16,
}

/// Resolves when the process is asked to stop (SIGTERM, SIGINT).
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A service's `main`: `<binary> healthcheck` answers whether the local
/// service is SERVING (exit code); `<binary> backup|restore` runs one
/// maintenance step on the store `maintenance` opens, with the
/// configuration from the environment (see [`crate::maintenance::command`]);
/// otherwise parses `C` from flags and environment, sets up telemetry,
/// binds the gRPC and metrics listeners and runs `run` until SIGTERM, then
/// flushes the spans not exported yet.
///
/// # Errors
/// When the configuration is unusable, a port cannot be bound, the service
/// fails, or a maintenance step is refused or fails.
pub async fn main<C, M, F, Fut>(
    binary: Binary,
    common: impl Fn(&C) -> &CommonArgs,
    maintenance: impl FnOnce(&C) -> anyhow::Result<M>,
    run: F,
) -> anyhow::Result<std::process::ExitCode>
where
    C: clap::Parser,
    M: crate::maintenance::StoreMaintenance,
    F: FnOnce(C, TcpListener, Option<TcpListener>, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return Ok(crate::server::healthcheck(binary.api, binary.default_port).await);
    }
    if crate::maintenance::command::requested() {
        // stdout carries the step's report; logs go to stderr.
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .init();
        let command = <crate::maintenance::command::Command as clap::Parser>::parse();
        // The service's configuration, from its environment only: the
        // arguments are the subcommand's.
        let config = C::try_parse_from([binary.name])?;
        let backup_dir = common(&config).backup_dir.clone();
        let store = maintenance(&config)?;
        crate::maintenance::command::run(binary.name, store, backup_dir, command).await?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let config = C::parse();
    let args = common(&config);
    let telemetry = Telemetry::init(binary.name, args.log_format);
    let listen: SocketAddr = args.listen_addr(binary.default_port);
    let metrics: SocketAddr = args.metrics_addr(binary.default_metrics_port);
    let result = async {
        let listener = crate::server::bind(listen).await?;
        let metrics = crate::server::bind(metrics).await?;
        run(
            config,
            listener,
            Some(metrics),
            Box::pin(crate::server::shutdown_signal()),
        )
        .await
    }
    .await;
    telemetry.shutdown_async().await;
    result?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Builds the backup and restore routes once the operator token is known.
type MaintenanceRoutes = Box<dyn FnOnce(&str) -> axum::Router + Send>;

/// What runs beside a service's routes, built up by its `run` and started
/// by [`Service::serve`].
pub struct Service {
    name: &'static str,
    apis: Vec<&'static str>,
    registry: Registry,
    health: Health,
    status: StoreStatus,
    relays: Relays,
    /// Opens the outbox operator routes on the metrics port.
    ingest_token: Option<String>,
    /// The backup and restore routes, once the store's maintenance is given.
    maintenance: Option<MaintenanceRoutes>,
    /// Handles whose drop would stop something (workers, syncs, monitor).
    kept: Vec<Box<dyn Any + Send>>,
}

impl Service {
    /// A service named `name` serving `apis` (their health starts
    /// NOT_SERVING and follows the store once [`Self::watch_store`] runs).
    ///
    /// # Errors
    /// When the metrics cannot be registered (not expected).
    pub fn new(name: &'static str, apis: Vec<&'static str>) -> anyhow::Result<Self> {
        let registry = Registry::new();
        crate::client::register_metrics(&registry)?;
        crate::store::register_metrics(&registry)?;
        let status = StoreStatus::new();
        let relays = Relays::new(&registry)?.gated_by(status.clone());
        Ok(Self {
            name,
            apis,
            registry,
            health: Health::new(),
            status,
            relays,
            ingest_token: None,
            maintenance: None,
            kept: Vec::new(),
        })
    }

    #[must_use]
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Whether the store answers; the store module fails fast while it does
    /// not, and relays wait for it.
    #[must_use]
    pub fn store_status(&self) -> StoreStatus {
        self.status.clone()
    }

    /// Delivers `outbox` to `destination` in the background.
    pub fn relay<O: Outbox, D: Destination>(&mut self, name: &'static str, outbox: O, destination: D) {
        self.relays.spawn(RelayConfig::new(name), outbox, destination);
    }

    /// Serves the operator routes (outbox dead letters and retry,
    /// maintenance) on the metrics port to callers presenting
    /// `ingest_token`.
    pub fn operator_routes(&mut self, ingest_token: &str) {
        self.ingest_token = Some(ingest_token.to_owned());
    }

    /// Serves backup and restore of the store through `store` on the
    /// operator routes (see [`crate::maintenance`]), with backups in
    /// `backup_dir`.
    pub fn maintenance<S: crate::maintenance::StoreMaintenance>(
        &mut self,
        store: S,
        backup_dir: Option<std::path::PathBuf>,
    ) {
        let maintainer = crate::maintenance::Maintainer::new(self.name, store, backup_dir, self.status.clone());
        self.maintenance = Some(Box::new(move |token| crate::maintenance::routes(maintainer, token)));
    }

    /// Runs `jobs` in the background (see [`crate::jobs`]) while the store
    /// is up, like the relays; the gauge `metric` counts what is pending.
    /// Returns the worker's waker.
    ///
    /// # Errors
    /// When the metric is registered already.
    pub fn job<J: Jobs>(&mut self, metric: &str, help: &str, jobs: J) -> anyhow::Result<Arc<Notify>> {
        let worker = crate::jobs::spawn(metric, help, jobs, &self.registry, self.status.clone())?;
        let waker = worker.waker();
        self.kept.push(Box::new(worker));
        Ok(waker)
    }

    /// Keeps `handle` alive as long as the service runs (a task that stops
    /// when its handle is dropped).
    pub fn keep<T: Send + 'static>(&mut self, handle: T) {
        self.kept.push(Box::new(handle));
    }

    /// Probes the store named `store` every `interval` through `probe`,
    /// prepares it once it answers, and makes the APIs' health follow it.
    ///
    /// # Errors
    /// When the monitor's metrics are registered already.
    pub fn watch_store<P: Probe>(
        &mut self,
        store: &'static str,
        interval: Duration,
        probe: Arc<P>,
    ) -> anyhow::Result<()> {
        let monitor = StoreMonitor::watch(
            store,
            self.health.clone(),
            &self.registry,
            self.apis.clone(),
            interval,
            self.status.clone(),
            probe,
        )?;
        self.kept.push(Box::new(monitor));
        Ok(())
    }

    /// Serves `routes` on `listener`, `/metrics` (and the outbox operator
    /// routes, see [`Self::operator_routes`]) on `metrics_listener`, until
    /// `shutdown` resolves; see [`crate::server::serve`].
    ///
    /// # Errors
    /// When the server fails.
    pub async fn serve(
        self,
        common: &CommonArgs,
        routes: tonic::service::Routes,
        listener: TcpListener,
        metrics_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let mut options = ServeOptions::new(self.name, self.apis, common);
        let relays = Arc::new(self.relays);
        if let Some(token) = &self.ingest_token {
            let mut routes = crate::relay::operator_routes(relays.clone(), token)
                .merge(crate::store::maintenance_routes(self.status.clone(), token));
            if let Some(maintenance) = self.maintenance {
                routes = routes.merge(maintenance(token));
            }
            options = options.with_operator_routes(routes);
        }
        let _running = (relays, self.kept);
        crate::server::serve(
            options,
            self.health,
            self.registry,
            listener,
            metrics_listener,
            routes,
            shutdown,
        )
        .await
    }
}
