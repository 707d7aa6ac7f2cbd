use clap::Parser as _;
use comment_service::config::Config;

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    // `comment-service healthcheck`: for container healthchecks.
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return Ok(service_kit::server::healthcheck(
            "chirp.comment.v1.CommentService",
            comment_service::config::DEFAULT_PORT,
        )
        .await);
    }
    let config = Config::parse();
    service_kit::telemetry::init(config.common.log_format);
    let listener = service_kit::server::bind(config.listen_addr()).await?;
    let metrics = service_kit::server::bind(config.metrics_addr()).await?;
    comment_service::run(config, listener, Some(metrics), service_kit::server::shutdown_signal()).await?;
    Ok(std::process::ExitCode::SUCCESS)
}
