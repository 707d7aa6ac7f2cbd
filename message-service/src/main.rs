#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    service_kit::bootstrap::main(
        message_service::BINARY,
        |config: &message_service::config::Config| &config.common,
        message_service::maintenance,
        message_service::run,
    )
    .await
}
