#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    service_kit::bootstrap::main(
        analytics_service::BINARY,
        |config: &analytics_service::config::Config| &config.common,
        analytics_service::maintenance,
        analytics_service::run,
    )
    .await
}
