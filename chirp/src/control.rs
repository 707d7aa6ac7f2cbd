//! The control socket of a running `chirp up`: one line in, one JSON line
//! out. `chaos` and `status` talk to it; `up` serves it.

use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
};

use crate::{layout::Part, restart::Death};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartState {
    pub part: Part,
    /// Which replica of a service (1 for stores and single services).
    pub replica: u8,
    /// `part`, or `part-N` for a service's further replicas.
    pub name: String,
    pub running: bool,
    /// `running`; `stopped` (by `chaos stop`, down until `chaos start`);
    /// `restarting` (died, another attempt scheduled); `dead` (died, left
    /// down: `--restart never`); `failed` (too many failures in a row);
    /// `external`.
    pub state: String,
    pub pid: Option<u32>,
    /// Times `chirp up` started it again on its own.
    pub restarts: u32,
    /// The last time it ended without being asked to, and why.
    pub last_death: Option<Death>,
    /// Where it listens (`host:port`), or the external URL it stands for.
    pub address: String,
    /// Run by `chirp up` (false when an external store URL was given).
    pub managed: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub message: String,
    pub parts: Vec<PartState>,
    pub port_base: u16,
}

/// Sends one command to the `chirp up` using `data_dir`.
///
/// # Errors
/// When no `chirp up` runs there, or it refuses the command.
pub async fn send(data_dir: &Path, command: &str) -> anyhow::Result<Reply> {
    let socket = crate::layout::control_socket(data_dir);
    let stream = UnixStream::connect(&socket)
        .await
        .with_context(|| format!("no `chirp up` is running with data dir {}", data_dir.display()))?;
    let (read, mut write) = stream.into_split();
    write.write_all(format!("{command}\n").as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let reply: Reply = serde_json::from_str(&line).context("a malformed reply from `chirp up`")?;
    if !reply.ok {
        anyhow::bail!("{}", reply.message);
    }
    Ok(reply)
}

/// The ports of the `chirp up` using `data_dir`: the running mesh knows its
/// own, whatever port base this command was given.
///
/// # Errors
/// When no `chirp up` runs there.
pub async fn ports(data_dir: &Path) -> anyhow::Result<crate::layout::Ports> {
    Ok(crate::layout::Ports {
        base: send(data_dir, "ps").await?.port_base,
    })
}
