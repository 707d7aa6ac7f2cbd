use clap::Parser as _;
use user_service::config::Config;

fn main() -> anyhow::Result<std::process::ExitCode> {
    user_service::memory::return_large_blocks_to_the_system();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve())
}

async fn serve() -> anyhow::Result<std::process::ExitCode> {
    // `user-service healthcheck`: for container healthchecks.
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return Ok(
            service_kit::server::healthcheck("chirp.user.v1.UserService", user_service::config::DEFAULT_PORT).await,
        );
    }
    let config = Config::parse();
    service_kit::telemetry::init(config.common.log_format);
    let listener = service_kit::server::bind(config.listen_addr()).await?;
    let metrics = service_kit::server::bind(config.metrics_addr()).await?;
    user_service::run(config, listener, Some(metrics), service_kit::server::shutdown_signal()).await?;
    Ok(std::process::ExitCode::SUCCESS)
}
