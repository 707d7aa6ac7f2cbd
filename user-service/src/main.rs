fn main() -> anyhow::Result<std::process::ExitCode> {
    user_service::memory::return_large_blocks_to_the_system();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(service_kit::bootstrap::main(
            user_service::BINARY,
            |config: &user_service::config::Config| &config.common,
            user_service::maintenance,
            user_service::run,
        ))
}
