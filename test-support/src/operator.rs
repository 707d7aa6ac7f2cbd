//! The operator routes of a service's metrics port (outbox, maintenance,
//! backups and restores), called as an operator would: HTTP/1.1 with the
//! ingest token.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The token services take when none is configured.
pub const DEV_TOKEN: &str = "chirp-dev-ingest-token";

/// `method path` on the metrics port at `addr`, presenting `token`: the
/// status code and the body as JSON (a JSON string when it is not JSON).
///
/// # Errors
/// When the service does not answer within a minute.
pub async fn call(addr: SocketAddr, token: &str, method: &str, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nx-chirp-ingest-token: {token}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await?;
        let (head, body) = reply.split_once("\r\n\r\n").context("not an HTTP reply")?;
        let code: u16 = head.split(' ').nth(1).context("no status")?.parse()?;
        let json = serde_json::from_str(body).unwrap_or_else(|_| serde_json::Value::String(body.to_owned()));
        anyhow::Ok((code, json))
    };
    tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .context("the operator route did not answer within a minute")?
}

/// A service's metrics port, as its operator calls it.
#[derive(Clone, Debug)]
pub struct Operator {
    pub addr: SocketAddr,
    pub token: String,
}

impl Operator {
    /// The service at `addr`, started with no ingest token of its own.
    #[must_use]
    pub fn new(addr: SocketAddr) -> Self {
        Self::with_token(addr, DEV_TOKEN)
    }

    #[must_use]
    pub fn with_token(addr: SocketAddr, token: &str) -> Self {
        Self {
            addr,
            token: token.to_owned(),
        }
    }

    /// `method path`, expecting 200: the body.
    ///
    /// # Panics
    /// When the route answers anything else.
    pub async fn ok(&self, method: &str, path: &str) -> serde_json::Value {
        let (code, body) = call(self.addr, &self.token, method, path)
            .await
            .expect("the operator route answers");
        assert_eq!(code, 200, "{method} {path}: {body}");
        body
    }

    /// Maintenance on (waiting until the operations under way are done and
    /// `api` on `channel` says NOT_SERVING), `POST path`, maintenance off,
    /// and SERVING again: one step of a restore, as `chirp` takes it.
    ///
    /// # Panics
    /// When a route refuses or the health does not follow.
    pub async fn in_maintenance(
        &self,
        channel: &tonic::transport::Channel,
        api: &str,
        path: &str,
    ) -> serde_json::Value {
        use tonic_health::pb::health_check_response::ServingStatus;
        let on = self.ok("POST", "/maintenance/on").await;
        assert_eq!(on["drained"], true, "{on}");
        crate::grpc::wait_for(channel, &[api], ServingStatus::NotServing).await;
        let reply = self.ok("POST", path).await;
        self.ok("POST", "/maintenance/off").await;
        crate::grpc::wait_for(channel, &[api], ServingStatus::Serving).await;
        reply
    }

    /// `method path`, expecting a refusal (409): the reason.
    ///
    /// # Panics
    /// When the route answers anything else.
    pub async fn refused(&self, method: &str, path: &str) -> String {
        let (code, body) = call(self.addr, &self.token, method, path)
            .await
            .expect("the operator route answers");
        assert_eq!(code, 409, "{method} {path} should be refused: {body}");
        body["error"].as_str().unwrap_or_default().to_owned()
    }
}

/// Rewrites the manifest of the backup in `dir` so that its checksums
/// match the files as they are now: what someone crafting a backup would
/// do, so a test reaches the checks behind the checksums.
///
/// # Panics
/// When the manifest cannot be read or written.
pub fn reseal(dir: &std::path::Path) {
    use sha2::Digest as _;
    let path = dir.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("a manifest")).expect("a JSON manifest");
    let names: Vec<String> = manifest["files"]
        .as_object()
        .expect("files in the manifest")
        .keys()
        .cloned()
        .collect();
    for name in names {
        if let Ok(bytes) = std::fs::read(dir.join(&name)) {
            manifest["files"][&name] = format!("{:x}", sha2::Sha256::digest(bytes)).into();
        }
    }
    std::fs::write(&path, manifest.to_string()).expect("writing the manifest");
}

/// A service binary's one-shot maintenance subcommand (`backup`,
/// `restore`), configured by `env` only, as a scheduled job runs it.
pub struct OneShot {
    binary: std::path::PathBuf,
    env: Vec<(String, String)>,
}

impl OneShot {
    #[must_use]
    pub fn new(binary: impl Into<std::path::PathBuf>, env: &[(&str, String)]) -> Self {
        Self {
            binary: binary.into(),
            env: env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
        }
    }

    /// Runs `<binary> args…`: its exit code and its report (stdout as JSON,
    /// or as a JSON string when it is not JSON, with stderr after it).
    ///
    /// # Panics
    /// When the binary cannot be started or runs longer than two minutes.
    pub async fn run(&self, args: &[&str]) -> (i32, serde_json::Value) {
        let mut command = tokio::process::Command::new(&self.binary);
        command.args(args).envs(self.env.iter().cloned()).kill_on_drop(true);
        let output = tokio::time::timeout(Duration::from_secs(120), command.output())
            .await
            .expect("the subcommand ends within two minutes")
            .expect("the binary starts");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let report = serde_json::from_str(&stdout).unwrap_or_else(|_| {
            serde_json::Value::String(format!("{stdout}{}", String::from_utf8_lossy(&output.stderr)))
        });
        (output.status.code().unwrap_or(-1), report)
    }

    /// Runs `<binary> args…` and returns its report.
    ///
    /// # Panics
    /// When it does not exit 0.
    pub async fn ok(&self, args: &[&str]) -> serde_json::Value {
        let (code, report) = self.run(args).await;
        assert_eq!(code, 0, "{args:?}: {report}");
        report
    }
}
