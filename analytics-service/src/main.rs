use analytics_service::config::Config;
use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    // `analytics-service healthcheck`: for container healthchecks.
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return Ok(service_kit::server::healthcheck(
            "chirp.analytics.v1.AnalyticsService",
            analytics_service::config::DEFAULT_PORT,
        )
        .await);
    }
    let config = Config::parse();
    service_kit::telemetry::init(config.common.log_format);
    let listener = service_kit::server::bind(config.listen_addr()).await?;
    let metrics = service_kit::server::bind(config.metrics_addr()).await?;
    analytics_service::run(config, listener, Some(metrics), service_kit::server::shutdown_signal()).await?;
    Ok(std::process::ExitCode::SUCCESS)
}
