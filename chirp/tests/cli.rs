//! The CLI's answers when something it needs is not there.

use std::process::Command;

fn chirp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_chirp"))
}

#[test]
fn up_names_the_package_to_install_for_each_missing_store_binary() {
    let data = tempfile::tempdir().unwrap();
    let output = chirp()
        .arg("up")
        .env("CHIRP_DATA_DIR", data.path())
        // Nothing on PATH: redis-server and secantusd-rs cannot be found.
        .env("PATH", data.path())
        .env_remove("REDIS_URL")
        .env_remove("MONGODB_URI")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("apt-get install redis-server"), "{stderr}");
    assert!(stderr.contains("cargo install secantus-mdb"), "{stderr}");
    assert!(
        !data.path().join("run").join("control.sock").exists(),
        "nothing was started"
    );
}

#[test]
fn operator_commands_say_when_no_mesh_is_running() {
    let data = tempfile::tempdir().unwrap();
    for args in [vec!["status"], vec!["chaos", "stop", "redis"]] {
        let output = chirp().args(&args).env("CHIRP_DATA_DIR", data.path()).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("no `chirp up` is running"), "{args:?}: {stderr}");
    }
    let output = chirp()
        .args(["chaos", "stop", "kafka"])
        .env("CHIRP_DATA_DIR", data.path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown part `kafka`"));
}

#[test]
fn client_commands_without_a_session_ask_for_a_login() {
    let config = tempfile::tempdir().unwrap();
    let output = chirp()
        .args(["post", "hello"])
        .env("CHIRP_CONFIG_DIR", config.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("chirp login"), "{stderr}");
}
