//! Store servers run by a test, stopped and started again on the same port
//! and data directory to play an outage.
//!
//! Children are spawned from one long-lived thread with
//! `PR_SET_PDEATHSIG(SIGKILL)`: the kernel ties the signal to the spawning
//! thread, and test threads come and go, so a thread that lives as long as
//! the process is what makes "the test process died" kill the child too.

use std::{
    io,
    net::TcpStream,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use nix::{sys::signal::Signal, unistd::Pid};

type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnJob>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        thread::Builder::new()
            .name("test-support-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("starting the spawner thread");
        Mutex::new(tx)
    })
}

/// The user a command runs as: postgres refuses to run as root.
#[derive(Clone, Copy, Debug)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

fn lookup_user(name: &str) -> Option<RunAs> {
    // getpwnam_r underneath: safe to call while other threads look users up.
    let user = nix::unistd::User::from_name(name).ok()??;
    Some(RunAs {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    })
}

#[must_use]
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Who PostgreSQL must run as: nobody else when this process is not root;
/// the `postgres` user when it is (postgres refuses to run as root).
///
/// # Errors
/// When this process is root and there is no `postgres` user.
pub fn postgres_user() -> anyhow::Result<Option<RunAs>> {
    if !is_root() {
        return Ok(None);
    }
    lookup_user("postgres")
        .map(Some)
        .context("running as root, and there is no `postgres` user to run PostgreSQL as")
}

/// Makes `command` run as `run_as` (if given) and receive `death` when this
/// process dies, so a server started by a test or by `chirp up` never
/// outlives it.
pub fn tie(command: &mut Command, run_as: Option<RunAs>, death: Signal) {
    if let Some(user) = run_as {
        command.gid(user.gid).uid(user.uid);
    }
    // SAFETY: the closure runs between fork and exec and makes one
    // async-signal-safe call (prctl). std runs it after setuid, which
    // clears the death signal, so the signal set here stays.
    unsafe {
        command.pre_exec(move || nix::sys::prctl::set_pdeathsig(death).map_err(io::Error::from));
    }
}

/// Spawns `command` so that it dies with this process.
fn spawn_tied(mut command: Command, run_as: Option<RunAs>) -> io::Result<Child> {
    tie(&mut command, run_as, Signal::SIGKILL);
    // A group of its own, so a kill reaches the server's workers too
    // (PostgreSQL's backends outlive a killed postmaster otherwise).
    command.process_group(0);
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner()
        .lock()
        .map_err(|_| io::Error::other("spawner lock poisoned"))?
        .send((command, reply_tx))
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("spawner thread is gone"))?
}

fn wait_for_port(port: u16, child: &mut Child, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("the server exited before listening: {status}");
        }
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} after {timeout:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_postgres(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let pg_isready = pg_binary("pg_isready")?;
    let deadline = Instant::now() + timeout;
    loop {
        let ready = Command::new(&pg_isready)
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("PostgreSQL on port {port} does not accept sessions after {timeout:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, signal: Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // The child is ours and not reaped yet, so the pid is still its.
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
    }
}

/// Stops a child with `first`, then SIGKILL if it lingers past `grace`.
fn stop_child(mut child: Child, first: Signal, grace: Duration) {
    signal(&child, first);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A kind of server tests share (see [`StoreProcess::shared_url`]).
#[derive(Clone, Copy, Debug)]
pub enum SharedKind {
    Postgres,
    Redis,
}

/// Data directories of private shared servers start with this and the pid
/// of the test process that owns them: a server lives as long as its test
/// process (it gets SIGKILL when that dies), and its directory is removed by
/// the next test process that starts one.
const PRIVATE_PREFIX: &str = "chirp-test-shared-";

fn sweep_private_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(PRIVATE_PREFIX)) else {
            continue;
        };
        let owner = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
        let alive = owner.is_some_and(|pid| nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok());
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Which server, and how to start it.
enum Kind {
    Postgres {
        run_as: Option<RunAs>,
    },
    Redis {
        append_only: bool,
    },
    /// A node of a Redis Cluster (see [`crate::redis_cluster`]); its bus
    /// port is a free port too.
    RedisClusterNode {
        bus_port: u16,
    },
    Secantus,
}

/// A store server of the test's own, on a fixed port and data directory.
pub struct StoreProcess {
    kind: Kind,
    port: u16,
    data: tempfile::TempDir,
    child: Option<Child>,
}

impl StoreProcess {
    /// A private PostgreSQL cluster (initdb into a temporary directory, then
    /// `postgres` in the foreground), trust auth, user `postgres`.
    ///
    /// # Errors
    /// When initdb or postgres cannot run.
    pub fn postgres() -> anyhow::Result<Self> {
        Self::postgres_in(tempfile::tempdir()?)
    }

    fn postgres_in(data: tempfile::TempDir) -> anyhow::Result<Self> {
        let run_as = postgres_user()?;
        if let Some(user) = run_as {
            std::os::unix::fs::chown(data.path(), Some(user.uid), Some(user.gid))?;
        }
        let mut initdb = Command::new(pg_binary("initdb")?);
        initdb
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(cluster_dir(data.path()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let output = spawn_tied(initdb, run_as)?.wait_with_output()?;
        if !output.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Self::start_new(Kind::Postgres { run_as }, data)
    }

    /// A private redis-server; with `append_only`, writes survive a restart.
    ///
    /// # Errors
    /// When redis-server cannot run.
    pub fn redis(append_only: bool) -> anyhow::Result<Self> {
        Self::start_new(Kind::Redis { append_only }, tempfile::tempdir()?)
    }

    /// A redis-server in cluster mode, append-only, not yet in a cluster.
    ///
    /// # Errors
    /// When redis-server cannot run.
    pub fn redis_cluster_node() -> anyhow::Result<Self> {
        Self::start_new(
            Kind::RedisClusterNode {
                bus_port: crate::free_port(),
            },
            tempfile::tempdir()?,
        )
    }

    /// The URL of the shared server of a kind: `env` when set; else the
    /// server on `default_port` of this machine when one listens (as on the
    /// team's machines and in CI); else a private server started once for
    /// this test process and shared by its tests, so the suite needs no
    /// server set up beforehand.
    ///
    /// # Panics
    /// When no server is given or listening and a private one cannot start.
    #[must_use]
    pub fn shared_url(kind: SharedKind) -> String {
        static POSTGRES: OnceLock<StoreProcess> = OnceLock::new();
        static REDIS: OnceLock<StoreProcess> = OnceLock::new();
        let (env, default_url, port, slot) = match kind {
            SharedKind::Postgres => (
                "TEST_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
                5432,
                &POSTGRES,
            ),
            SharedKind::Redis => ("TEST_REDIS_URL", "redis://127.0.0.1:6379", 6379, &REDIS),
        };
        if let Ok(url) = std::env::var(env) {
            return url;
        }
        let listening = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300)).is_ok();
        if listening {
            return default_url.to_owned();
        }
        slot.get_or_init(|| {
            sweep_private_dirs();
            let data = tempfile::Builder::new()
                .prefix(&format!("{PRIVATE_PREFIX}{}-", std::process::id()))
                .tempdir()
                .expect("a temporary directory");
            let started = match kind {
                SharedKind::Postgres => Self::postgres_in(data),
                SharedKind::Redis => Self::start_new(Kind::Redis { append_only: false }, data),
            };
            started.unwrap_or_else(|e| {
                panic!("no {env} given, nothing on port {port}, and a private server failed: {e:#}")
            })
        })
        .url()
    }

    /// A private `secantusd-rs` (MongoDB wire protocol, single-node replica set).
    ///
    /// # Errors
    /// When secantusd-rs is not installed or cannot run.
    pub fn secantus() -> anyhow::Result<Self> {
        Self::start_new(Kind::Secantus, tempfile::tempdir()?)
    }

    fn start_new(kind: Kind, data: tempfile::TempDir) -> anyhow::Result<Self> {
        let mut process = Self {
            kind,
            port: crate::free_port(),
            data,
            child: None,
        };
        process.start()?;
        Ok(process)
    }

    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    #[must_use]
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// The URL a client connects with.
    #[must_use]
    pub fn url(&self) -> String {
        match self.kind {
            Kind::Postgres { .. } => format!("postgres://postgres@127.0.0.1:{}/postgres", self.port),
            Kind::Redis { .. } | Kind::RedisClusterNode { .. } => format!("redis://127.0.0.1:{}", self.port),
            Kind::Secantus => format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port),
        }
    }

    #[must_use]
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the server again (same port, same data) and waits until it
    /// accepts connections.
    ///
    /// # Errors
    /// When it does not come up within 30 seconds.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let port = self.port.to_string();
        let dir = self.data.path();
        let (mut command, run_as) = match &self.kind {
            Kind::Postgres { run_as } => {
                let mut c = Command::new(pg_binary("postgres")?);
                c.arg("-D")
                    .arg(cluster_dir(dir))
                    .args(["-p", &port, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
                    .arg("-c")
                    .arg(format!("unix_socket_directories={}", dir.display()));
                (c, *run_as)
            }
            Kind::Redis { append_only } => {
                let mut c = Command::new("redis-server");
                c.args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
                    .args(["--appendonly", if *append_only { "yes" } else { "no" }])
                    .arg("--dir")
                    .arg(dir);
                (c, None)
            }
            Kind::RedisClusterNode { bus_port } => {
                let mut c = Command::new("redis-server");
                c.args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
                    .args(["--cluster-enabled", "yes", "--cluster-port", &bus_port.to_string()])
                    .args(["--cluster-config-file", "nodes.conf"])
                    // A master that stops answering for a second is
                    // replaced by its replica (Redis's default is 15 s).
                    .args(["--cluster-node-timeout", "1000"])
                    // A new replica syncs at once (the default waits 5 s for
                    // more replicas to share one transfer), so it can take
                    // over from the start.
                    .args(["--repl-diskless-sync-delay", "0"])
                    // A master lost stops only its own slots, not the
                    // whole cluster (as comment-service's nodes are run).
                    .args(["--cluster-require-full-coverage", "no"])
                    .args(["--appendonly", "yes", "--appendfsync", "always"])
                    .arg("--dir")
                    .arg(dir);
                (c, None)
            }
            Kind::Secantus => {
                let mut c = Command::new("secantusd-rs");
                c.args(["--port", &port, "--cache-size", "64M", "--log-level", "WARNING"])
                    // Flush its log at each commit, as mongod does for a
                    // j:true write: without it a crash loses acknowledged writes.
                    .arg("--sync-on-commit")
                    .arg("--storage-path")
                    .arg(dir.join("db"));
                (c, None)
            }
        };
        command.stdout(Stdio::null()).stderr(Stdio::null()).stdin(Stdio::null());
        let mut child = spawn_tied(command, run_as).with_context(|| format!("starting {}", self.name()))?;
        let ready = wait_for_port(self.port, &mut child, Duration::from_secs(30)).and_then(|()| match self.kind {
            // PostgreSQL listens before it accepts sessions ("the database
            // system is starting up"); pg_isready tells the difference.
            Kind::Postgres { .. } => wait_for_postgres(self.port, Duration::from_secs(30)),
            _ => Ok(()),
        });
        if let Err(err) = ready {
            let _ = child.kill();
            let _ = child.wait();
            return Err(err.context(format!("starting {}", self.name())));
        }
        self.child = Some(child);
        Ok(())
    }

    /// Stops the server the way an operator would (fast shutdown), keeping
    /// its data.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            let first = match self.kind {
                // SIGINT is PostgreSQL's "fast" shutdown: clients are cut off at once.
                Kind::Postgres { .. } => Signal::SIGINT,
                Kind::Redis { .. } | Kind::RedisClusterNode { .. } | Kind::Secantus => Signal::SIGTERM,
            };
            stop_child(child, first, Duration::from_secs(10));
        }
    }

    /// Kills the server outright (SIGKILL), as a crash or the OOM killer
    /// would: no shutdown, nothing flushed that it had not written already.
    /// Its data stays for [`StoreProcess::start`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // The group is our own child's, made at its spawn.
                let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = child.wait();
        }
    }

    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Postgres { .. } => "postgres",
            Kind::Redis { .. } | Kind::RedisClusterNode { .. } => "redis-server",
            Kind::Secantus => "secantusd-rs",
        }
    }
}

impl Drop for StoreProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, Signal::SIGKILL, Duration::from_secs(5));
        }
    }
}

fn cluster_dir(data: &Path) -> PathBuf {
    data.join("cluster")
}

/// PostgreSQL's server binaries are not on PATH on Debian; find the newest.
/// A PostgreSQL program (`postgres`, `initdb`) of the newest version
/// installed under `/usr/lib/postgresql/<major>` (by number: 9 < 15 < 17),
/// else the one on `PATH`.
///
/// # Errors
/// When there is none.
pub fn pg_binary(name: &str) -> anyhow::Result<PathBuf> {
    newest_pg_binary(Path::new("/usr/lib/postgresql"), name)
        .or_else(|| which::which(name).ok())
        .with_context(|| format!("`{name}` not found: install the postgresql package"))
}

/// `root/<major>/bin/<name>` of the highest numbered major version.
fn newest_pg_binary(root: &Path, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, e.path().join("bin").join(name)))
        })
        .filter(|(_, path)| path.is_file())
        .max_by_key(|(major, _)| *major)
        .map(|(_, path)| path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_postgresql_is_chosen_by_number_not_by_text() {
        let root = tempfile::tempdir().unwrap();
        for major in ["9", "15", "17", "notes"] {
            let bin = root.path().join(major).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            std::fs::write(bin.join("initdb"), "").unwrap();
        }
        assert_eq!(
            newest_pg_binary(root.path(), "initdb"),
            Some(root.path().join("17").join("bin").join("initdb"))
        );
        std::fs::remove_file(root.path().join("17").join("bin").join("initdb")).unwrap();
        assert_eq!(
            newest_pg_binary(root.path(), "initdb"),
            Some(root.path().join("15").join("bin").join("initdb")),
            "a version without the program does not count"
        );
        assert_eq!(newest_pg_binary(root.path(), "pg_ctl"), None);
    }
}
