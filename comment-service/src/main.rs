#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    service_kit::bootstrap::main(
        comment_service::BINARY,
        |config: &comment_service::config::Config| &config.common,
        comment_service::maintenance,
        comment_service::run,
    )
    .await
}
