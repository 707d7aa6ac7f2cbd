//! `chirp up`: the four stores and the four services on this machine, from
//! local binaries, no Docker. Stores are private processes under the data
//! directory (or external ones, where `DATABASE_URL`, `REDIS_URL`,
//! `MONGODB_URI` say); services are the binaries next to `chirp`.

use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use nix::sys::signal::Signal;
use service_kit::files::{private_dirs, write_private};
use test_support::process::{self, RunAs};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpStream, UnixListener},
    process::{Child, Command},
    sync::Mutex,
};

use crate::{
    control::{PartState, Reply},
    faults::{self, Fault},
    layout::{self, Instance, Part, Ports, MAX_REPLICAS},
    live::{self, traffic::Traffic, Live},
    restart::{self, Death},
};

/// Version of SecantusDB's server that serves MongoDB locally.
const SECANTUS_VERSION: &str = "0.5.3-beta.196";
pub const ADMIN: &str = "admin";
pub const ADMIN_PASSWORD: &str = "chirp-admin-password";
pub const DEMO_PASSWORD: &str = "chirp-demo-password";

#[derive(Clone, Debug)]
pub struct UpArgs {
    pub data_dir: PathBuf,
    pub ports: Ports,
    pub seed: bool,
    pub replicas: Replicas,
    pub restart: restart::Policy,
    /// Where every service exports its traces (OTLP/gRPC), if anywhere.
    pub otlp_endpoint: Option<String>,
    /// Where the live page listens.
    pub page: std::net::SocketAddr,
    /// Whether services reach their stores and peers through the fault
    /// proxies (`chirp chaos slow|flaky`) or directly (`--direct`, what a
    /// benchmark wants: a proxy adds a copy to every hop).
    pub proxies: bool,
}

/// How many replicas of each service to run (`--replicas
/// message-service=2,comment-service=2`); one of any service not named.
/// Every caller is given all replicas of a peer and balances across them,
/// as it would across a Kubernetes headless Service's pods.
#[derive(Clone, Debug, Default)]
pub struct Replicas(Vec<(Part, u8)>);

impl Replicas {
    #[must_use]
    pub fn of(&self, part: Part) -> u8 {
        self.0.iter().find(|(p, _)| *p == part).map_or(1, |(_, n)| *n)
    }

    /// comment-service's store as a Redis Cluster (`--redis-cluster`).
    #[must_use]
    pub fn with_redis_cluster(mut self) -> Self {
        self.0.retain(|(p, _)| *p != Part::Redis);
        self.0.push((Part::Redis, layout::REDIS_CLUSTER_NODES));
        self
    }

    /// Whether Redis runs as a cluster.
    #[must_use]
    pub fn redis_cluster(&self) -> bool {
        self.of(Part::Redis) > 1
    }

    /// Every process of the mesh, in start order: the stores (every node of
    /// a Redis Cluster), the first replica of each service, then the others.
    fn instances(&self) -> Vec<Instance> {
        let mut all: Vec<Instance> = Part::ALL
            .into_iter()
            .filter(|p| !p.is_service())
            .flat_map(|part| (1..=self.of(part)).map(move |replica| Instance { part, replica }))
            .collect();
        all.extend(Part::SERVICES.into_iter().map(Instance::from));
        for part in Part::SERVICES {
            all.extend((2..=self.of(part)).map(|replica| Instance { part, replica }));
        }
        all
    }
}

impl std::str::FromStr for Replicas {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut replicas = Vec::new();
        for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, count) = pair
                .split_once('=')
                .ok_or_else(|| format!("`{pair}`: expected SERVICE=COUNT"))?;
            let part = Part::parse(name.trim())
                .filter(|p| p.is_service())
                .ok_or_else(|| format!("`{name}` is not a service"))?;
            if part == Part::AnalyticsService {
                // Its SQLite file takes one writer; a second process would
                // share the file, not scale out.
                return Err("analytics-service runs as one replica (one SQLite writer)".into());
            }
            let count: u8 = count
                .trim()
                .parse()
                .ok()
                .filter(|n| (1..=MAX_REPLICAS).contains(n))
                .ok_or_else(|| format!("`{count}`: a replica count from 1 to {MAX_REPLICAS}"))?;
            replicas.retain(|(p, _)| *p != part);
            replicas.push((part, count));
        }
        Ok(Self(replicas))
    }
}

/// Stores given from outside, not run by `chirp up`.
#[derive(Clone, Debug, Default)]
struct External {
    postgres: Option<String>,
    redis: Option<String>,
    mongodb: Option<String>,
}

impl External {
    fn from_env() -> Self {
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        Self {
            postgres: var("DATABASE_URL"),
            redis: var("REDIS_URL"),
            mongodb: var("MONGODB_URI"),
        }
    }

    fn url(&self, part: Part) -> Option<&str> {
        match part {
            Part::Postgres => self.postgres.as_deref(),
            Part::Redis => self.redis.as_deref(),
            Part::Mongodb => self.mongodb.as_deref(),
            _ => None,
        }
    }
}

struct Supervisor {
    args: UpArgs,
    external: External,
    bin_dir: PathBuf,
    slots: HashMap<Instance, Slot>,
    ingest_token: String,
    /// The fault on the way to each part chirp runs (with proxies on).
    switches: HashMap<Instance, faults::Switch>,
}

/// What the supervisor knows of one process of the mesh.
#[derive(Default)]
struct Slot {
    life: Life,
    /// Deaths and failed starts in a row since the last run that lasted
    /// [`restart::STABLE_AFTER`]; what the backoff and the limit count.
    failures: u32,
    /// Starts the supervisor made on its own, in all.
    restarts: u32,
    last_death: Option<Death>,
}

#[derive(Default)]
enum Life {
    Running {
        child: Child,
        since: Instant,
    },
    /// Not started yet, or stopped with `chaos stop`: down until `chaos
    /// start`.
    #[default]
    Stopped,
    /// Ended on its own; started again at `retry_at`, or left down (`None`)
    /// under `--restart never`, after a failed `chaos start`, or once
    /// [`restart::MAX_RESTARTS`] attempts in a row have failed.
    Dead {
        retry_at: Option<Instant>,
    },
}

impl Slot {
    fn pid(&self) -> Option<u32> {
        match &self.life {
            Life::Running { child, .. } => child.id(),
            _ => None,
        }
    }

    /// The word `chirp status` shows.
    fn state(&self) -> &'static str {
        match self.life {
            Life::Running { .. } => "running",
            Life::Stopped => "stopped",
            Life::Dead { retry_at: Some(_) } => "restarting",
            Life::Dead { retry_at: None } if self.failures > restart::MAX_RESTARTS => "failed",
            Life::Dead { retry_at: None } => "dead",
        }
    }

    /// Records a death or a failed start and decides what follows: another
    /// attempt after the backoff, or staying down.
    fn failed(&mut self, name: &str, death: Death, policy: restart::Policy) {
        self.failures += 1;
        let mut retry_at = None;
        let next = match policy {
            restart::Policy::Never => {
                format!("left down (--restart never); `chirp chaos start {name}` brings it back")
            }
            _ if self.failures > restart::MAX_RESTARTS => format!(
                "{} failures in a row: left down; `chirp chaos start {name}` tries again",
                self.failures
            ),
            restart::Policy::OnFailure => {
                let wait = restart::backoff(self.failures);
                retry_at = Some(Instant::now() + wait);
                format!(
                    "restarting in {:.2} s (attempt {} of {})",
                    wait.as_secs_f64(),
                    self.failures,
                    restart::MAX_RESTARTS
                )
            }
        };
        self.life = Life::Dead { retry_at };
        println!("[chirp] {name} {}; {next}", death.cause);
        self.last_death = Some(death);
    }
}

/// Runs the mesh until SIGINT or SIGTERM, then stops everything it started.
///
/// # Errors
/// When a store or service cannot start.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let socket = layout::control_socket(&args.data_dir);
    if socket.exists() && tokio::net::UnixStream::connect(&socket).await.is_ok() {
        bail!(
            "`chirp up` is already running with data dir {}",
            args.data_dir.display()
        );
    }
    // Keys, tokens, stores and backups: private from the start (0700).
    for dir in [
        "run",
        "keys",
        "postgres",
        "redis",
        "redis-cluster",
        "mongodb",
        "backups",
    ] {
        private_dirs(&args.data_dir.join(dir))?;
    }
    let external = External::from_env();
    if args.replicas.redis_cluster() && external.redis.is_some() {
        bail!("--redis-cluster runs its own cluster: unset REDIS_URL");
    }
    if external.postgres.is_none() && process::postgres_user()?.is_some() {
        // PostgreSQL runs as its own user and must pass through the data
        // directory to reach its own: traverse only, nothing listed.
        std::fs::set_permissions(&args.data_dir, std::fs::Permissions::from_mode(0o711))?;
        reachable_by_others(&args.data_dir)?;
    }
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("the chirp binary has no directory")?
        .to_path_buf();
    preflight(&external, &bin_dir)?;
    // Bound before anything starts, so a taken port stops nothing halfway.
    let page = tokio::net::TcpListener::bind(args.page)
        .await
        .with_context(|| format!("the live page's address {} (--page-addr)", args.page))?;
    let switches = if args.proxies {
        start_proxies(&args, &external).await?
    } else {
        HashMap::new()
    };
    let ingest_token = read_or_create(&layout::ingest_token_file(&args.data_dir), || {
        Ok(uuid::Uuid::new_v4().simple().to_string())
    })?;
    read_or_create(
        &args.data_dir.join("keys").join("signing.pem"),
        service_kit::auth::TokenSigner::generate_pem,
    )?;

    let supervisor = Arc::new(Mutex::new(Supervisor {
        args: args.clone(),
        external,
        bin_dir,
        slots: HashMap::new(),
        ingest_token,
        switches,
    }));
    let started = async {
        // The stores first (a Redis Cluster joined once its nodes run);
        // further replicas start once the first is SERVING, so they find
        // the schema migrated and the indexes built instead of racing to.
        let (stores, services): (Vec<Instance>, Vec<Instance>) = args
            .replicas
            .instances()
            .into_iter()
            .partition(|i| !i.part.is_service());
        let (first, further): (Vec<Instance>, Vec<Instance>) = services.into_iter().partition(|i| i.replica == 1);
        for &instance in &stores {
            supervisor.lock().await.start(instance).await?;
        }
        if args.replicas.redis_cluster() {
            crate::redis_cluster::join(args.ports).await?;
        }
        for batch in [first, further] {
            for &instance in &batch {
                supervisor.lock().await.start(instance).await?;
            }
            for &instance in &batch {
                wait_serving(args.ports, instance, Duration::from_secs(90)).await?;
            }
        }
        anyhow::Ok(())
    };
    let outcome = tokio::select! {
        result = started => result,
        () = service_kit::server::shutdown_signal() => Err(anyhow::anyhow!("interrupted while starting")),
    };
    if let Err(err) = outcome {
        supervisor.lock().await.stop_all().await;
        return Err(err);
    }

    let seeded = args.data_dir.join("seeded");
    if args.seed && !seeded.exists() {
        if let Err(err) = crate::seed::seed(args.ports).await {
            supervisor.lock().await.stop_all().await;
            return Err(err.context("seeding demo data"));
        }
        std::fs::write(&seeded, "demo data written\n")?;
    }
    let live = Live::new(
        args.ports,
        Traffic::new(args.ports, args.otlp_endpoint.is_some(), DEMO_PASSWORD),
    );
    let page = tokio::spawn(live::serve(page, live.clone(), commands(&supervisor, &live)));
    let scraper = tokio::spawn(scrape(live.clone(), supervisor.clone()));
    print_banner(&args);

    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    let control = tokio::spawn(serve_control(listener, supervisor.clone(), live.clone()));
    let watch = tokio::spawn(watch(supervisor.clone()));
    service_kit::server::shutdown_signal().await;
    println!("[chirp] stopping…");
    live.traffic.stop();
    scraper.abort();
    page.abort();
    // The watcher first, so nothing is restarted behind the stop; a restart
    // it is in the middle of is dropped, and with it (kill_on_drop) the
    // process it was starting.
    watch.abort();
    let _ = watch.await;
    control.abort();
    let _ = std::fs::remove_file(&socket);
    supervisor.lock().await.stop_all().await;
    println!("[chirp] stopped");
    Ok(())
}

/// As root, PostgreSQL runs as `postgres`, which must be able to walk down
/// to the data directory.
fn reachable_by_others(dir: &Path) -> anyhow::Result<()> {
    let dir = dir.canonicalize()?;
    for ancestor in dir.ancestors() {
        let mode = std::fs::metadata(ancestor)?.permissions().mode();
        if mode & 0o001 == 0 {
            bail!(
                "{} is not reachable by the postgres user ({} is mode {:o}); \
                 pick a --data-dir outside it, e.g. /var/lib/chirp",
                dir.display(),
                ancestor.display(),
                mode & 0o777
            );
        }
    }
    Ok(())
}

fn read_or_create(path: &Path, make: impl FnOnce() -> anyhow::Result<String>) -> anyhow::Result<String> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        return Ok(existing.trim().to_owned());
    }
    let value = make()?;
    write_private(path, value.as_bytes())?;
    Ok(value)
}

/// Finds every binary first, so a missing one is named before anything runs.
fn preflight(external: &External, bin_dir: &Path) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    if external.postgres.is_none() && pg_binary("initdb").is_none() {
        missing.push("PostgreSQL server (initdb, postgres): apt-get install postgresql".to_owned());
    }
    if external.redis.is_none() && which("redis-server").is_none() {
        missing.push("redis-server: apt-get install redis-server".to_owned());
    }
    if external.mongodb.is_none() && which("secantusd-rs").is_none() {
        missing.push(format!(
            "secantusd-rs (MongoDB wire protocol): apt-get install cmake && \
             cargo install secantus-mdb --version {SECANTUS_VERSION} --ignore-rust-version"
        ));
    }
    for part in Part::SERVICES {
        if !bin_dir.join(part.name()).is_file() {
            missing.push(format!(
                "{} binary next to chirp in {}: cargo build --workspace",
                part.name(),
                bin_dir.display()
            ));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        bail!("missing:\n  - {}", missing.join("\n  - "))
    }
}

impl Supervisor {
    /// The port the services reach a part on: its proxy's, with proxies on.
    fn reach(&self, at: impl Into<Instance>) -> u16 {
        let at = at.into();
        if self.switches.contains_key(&at) {
            self.args.ports.proxy(at)
        } else {
            self.args.ports.of(at)
        }
    }

    fn database_urls(&self) -> (String, String, String) {
        let postgres = self.external.postgres.clone().unwrap_or_else(|| {
            format!(
                "postgres://postgres@127.0.0.1:{}/chirp_users",
                self.reach(Part::Postgres)
            )
        });
        let redis = self
            .external
            .redis
            .clone()
            .unwrap_or_else(|| format!("redis://127.0.0.1:{}", self.reach(Part::Redis)));
        let mongodb = self.external.mongodb.clone().unwrap_or_else(|| {
            format!(
                "mongodb://127.0.0.1:{}/?directConnection=true",
                self.reach(Part::Mongodb)
            )
        });
        (postgres, redis, mongodb)
    }

    /// Every replica of a peer, for its callers to balance across.
    fn peer_urls(&self, part: Part) -> String {
        (1..=self.args.replicas.of(part))
            .map(|replica| format!("http://127.0.0.1:{}", self.reach(Instance { part, replica })))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `slow`, `flaky` or `heal` on the way to `at`.
    fn set_fault(&mut self, at: Instance, fault: Fault) -> (bool, String) {
        let Some(switch) = self.switches.get(&at) else {
            return (
                false,
                format!(
                    "{} has no fault proxy (an external store, or `chirp up --direct`)",
                    at.name()
                ),
            );
        };
        switch.set(fault);
        let message = match fault {
            Fault::None => format!("{} healed", at.name()),
            fault => format!("the way to {} is now {fault}", at.name()),
        };
        println!("[chirp] {message}");
        (true, message)
    }

    /// Clears every fault.
    fn heal_all(&mut self) -> (bool, String) {
        for switch in self.switches.values() {
            switch.set(Fault::None);
        }
        println!("[chirp] every fault healed");
        (true, "every fault healed".to_owned())
    }

    /// The page's view of the processes and their faults.
    fn view(&mut self) -> live::Parts {
        live::Parts {
            parts: self.states(),
            faults: self
                .switches
                .iter()
                .filter_map(|(at, switch)| {
                    let fault = switch.get();
                    (fault != Fault::None).then(|| (at.name(), fault.to_string()))
                })
                .collect(),
        }
    }

    /// Starts a process that is not running (whatever the reason), and
    /// waits for a store to listen.
    async fn start(&mut self, instance: Instance) -> anyhow::Result<()> {
        let part = instance.part;
        let slot = self.slots.entry(instance).or_default();
        if matches!(slot.life, Life::Running { .. }) || self.external.url(part).is_some() {
            return Ok(());
        }
        let ports = self.args.ports;
        let data = self.args.data_dir.clone();
        let port = ports.of(instance).to_string();
        let (postgres_url, redis_url, mongodb_uri) = self.database_urls();
        let mut run_as = None;
        let mut command = match part {
            Part::Postgres => {
                let dir = data.join("postgres");
                run_as = process::postgres_user()?;
                if let Some(user) = run_as {
                    std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid))?;
                }
                if !dir.join("cluster").join("PG_VERSION").exists() {
                    let initdb = pg_binary("initdb").context("initdb not found")?;
                    let mut init = Command::new(initdb);
                    init.args(["--auth=trust", "--username=postgres", "--encoding=UTF8", "-D"])
                        .arg(dir.join("cluster"))
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped());
                    set_user(&mut init, run_as);
                    let output = init.output().await?;
                    if !output.status.success() {
                        bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr));
                    }
                }
                let mut c = Command::new(pg_binary("postgres").context("postgres not found")?);
                c.arg("-D")
                    .arg(dir.join("cluster"))
                    .args(["-p", &port, "-c", "listen_addresses=127.0.0.1"])
                    .arg("-c")
                    .arg(format!("unix_socket_directories={}", dir.display()));
                c
            }
            Part::Redis if self.args.replicas.redis_cluster() => {
                let dir = data.join("redis-cluster").join(instance.replica.to_string());
                private_dirs(&dir)?;
                crate::redis_cluster::node_command(ports, instance, &dir)
            }
            Part::Redis => {
                let mut c = Command::new("redis-server");
                // AOF: an acknowledged comment survives a restart.
                c.args([
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--appendonly",
                    "yes",
                    "--save",
                    "",
                ])
                .arg("--dir")
                .arg(data.join("redis"));
                c
            }
            Part::Mongodb => {
                let mut c = Command::new("secantusd-rs");
                c.args(["--port", &port, "--cache-size", "256M", "--log-level", "WARNING"])
                    // Flush its log at each commit, as mongod does for a
                    // j:true write: without it a crash loses acknowledged writes.
                    .arg("--sync-on-commit")
                    .arg("--storage-path")
                    .arg(data.join("mongodb"));
                c
            }
            service => {
                let mut c = Command::new(self.bin_dir.join(service.name()));
                c.env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
                    .env("METRICS_ADDR", format!("127.0.0.1:{}", ports.metrics(instance)))
                    .env("LOG_FORMAT", "pretty")
                    .env("NO_COLOR", "1")
                    .env("INGEST_TOKEN", &self.ingest_token)
                    .env("BACKUP_DIR", crate::backup::backup_dir(&data))
                    // Replicas share the service's name; the instance id
                    // tells them apart in a trace.
                    .env("OTEL_SERVICE_NAME", part.name())
                    .env(
                        "OTEL_RESOURCE_ATTRIBUTES",
                        format!("service.instance.id={}", instance.name()),
                    )
                    // With replicas, a replica told to stop keeps serving
                    // (health NOT_SERVING) until its callers' discovery
                    // (every second) has taken it out, so none of their
                    // calls meets a closing connection.
                    .env(
                        "SHUTDOWN_DELAY",
                        if self.args.replicas.of(part) > 1 { "2s" } else { "0s" },
                    )
                    .env(
                        "OTEL_EXPORTER_OTLP_ENDPOINT",
                        self.args.otlp_endpoint.as_deref().unwrap_or_default(),
                    )
                    .env("USER_SERVICE_URL", self.peer_urls(Part::UserService))
                    .env("MESSAGE_SERVICE_URL", self.peer_urls(Part::MessageService))
                    .env("COMMENT_SERVICE_URL", self.peer_urls(Part::CommentService))
                    .env("ANALYTICS_SERVICE_URL", self.peer_urls(Part::AnalyticsService))
                    // Each service is given only its own store's settings.
                    .env_remove("DATABASE_URL")
                    .env_remove("REDIS_URL")
                    .env_remove("REDIS_CLUSTER_URLS")
                    .env_remove("MONGODB_URI");
                match service {
                    Part::UserService => {
                        c.env("DATABASE_URL", &postgres_url)
                            .env("JWT_SIGNING_KEY_FILE", data.join("keys").join("signing.pem"))
                            .env("ADMIN_USERNAME", ADMIN)
                            .env("ADMIN_PASSWORD", ADMIN_PASSWORD)
                            // Every client of a local mesh is 127.0.0.1 and
                            // logs in as a few demo users: the production
                            // limits would throttle the demo, not an attacker.
                            .env("AUTH_REQUESTS_PER_ADDRESS_PER_MINUTE", "600")
                            .env("LOGIN_ATTEMPTS_PER_USERNAME_PER_MINUTE", "120");
                    }
                    Part::MessageService => {
                        c.env("MONGODB_URI", &mongodb_uri);
                    }
                    Part::CommentService if self.args.replicas.redis_cluster() => {
                        c.env("REDIS_CLUSTER_URLS", crate::redis_cluster::urls(ports));
                    }
                    Part::CommentService => {
                        c.env("REDIS_URL", &redis_url);
                    }
                    _ => {
                        c.env(
                            "DATABASE_URL",
                            format!("sqlite://{}", data.join("analytics.db").display()),
                        );
                    }
                }
                c
            }
        };
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        set_user(&mut command, run_as);
        let name = instance.name();
        let mut child = command.spawn().with_context(|| format!("starting {name}"))?;
        stream_logs(&name, &mut child);
        if !part.is_service() {
            wait_listening(ports.of(instance), &mut child, part).await?;
        }
        if part == Part::Postgres {
            wait_postgres(ports.of(part)).await?;
            create_database(ports.of(part)).await?;
        }
        println!("[chirp] {name} started (pid {})", child.id().unwrap_or(0));
        self.slots.entry(instance).or_default().life = Life::Running {
            child,
            since: Instant::now(),
        };
        Ok(())
    }

    /// Notes every process that has ended on its own since the last look,
    /// says so once in the log, and schedules its restart per the policy.
    fn reap(&mut self) {
        let policy = self.args.restart;
        for (instance, slot) in &mut self.slots {
            let Life::Running { child, since } = &mut slot.life else {
                continue;
            };
            let cause = match child.try_wait() {
                Ok(None) => continue,
                Ok(Some(status)) => format!("died: {}", restart::describe(status)),
                Err(err) => format!("died: cannot be waited for: {err}"),
            };
            if since.elapsed() >= restart::STABLE_AFTER {
                slot.failures = 0;
            }
            slot.failed(&instance.name(), Death::now(cause), policy);
        }
    }

    /// Starts again what is due to be; a start that fails counts as a
    /// death of its own.
    async fn restart_due(&mut self) {
        let now = Instant::now();
        let due: Vec<Instance> = self
            .slots
            .iter()
            .filter(|(_, slot)| matches!(slot.life, Life::Dead { retry_at: Some(at) } if at <= now))
            .map(|(instance, _)| *instance)
            .collect();
        for instance in due {
            if let Some(slot) = self.slots.get_mut(&instance) {
                slot.restarts += 1;
            }
            if let Err(err) = self.start(instance).await {
                let policy = self.args.restart;
                if let Some(slot) = self.slots.get_mut(&instance) {
                    slot.failed(
                        &instance.name(),
                        Death::now(format!("could not start: {err:#}")),
                        policy,
                    );
                }
            }
        }
    }

    /// Stops a process and keeps it down until `start`; whether it was
    /// running.
    async fn stop(&mut self, instance: Instance) -> bool {
        let Some(child) = self.signal_stop(instance) else {
            return false;
        };
        finish_stop(instance, child).await;
        true
    }

    /// Asks a running process to stop (PostgreSQL's fast shutdown is
    /// SIGINT, everyone else's graceful one SIGTERM) and marks it stopped;
    /// the process, to wait for.
    fn signal_stop(&mut self, instance: Instance) -> Option<Child> {
        let slot = self.slots.entry(instance).or_default();
        let Life::Running { child, .. } = std::mem::take(&mut slot.life) else {
            return None;
        };
        let signal = if instance.part == Part::Postgres {
            Signal::SIGINT
        } else {
            Signal::SIGTERM
        };
        if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
            // Our own child, not reaped yet: the pid is still its.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
        Some(child)
    }

    /// Services all at once (each may keep serving for its shutdown delay),
    /// then the stores, last started first.
    async fn stop_all(&mut self) {
        let (services, stores): (Vec<Instance>, Vec<Instance>) = self
            .args
            .replicas
            .instances()
            .into_iter()
            .rev()
            .partition(|i| i.part.is_service());
        let stopping: Vec<_> = services
            .into_iter()
            .filter_map(|instance| Some((instance, self.signal_stop(instance)?)))
            .collect();
        futures::future::join_all(
            stopping
                .into_iter()
                .map(|(instance, child)| finish_stop(instance, child)),
        )
        .await;
        for instance in stores {
            self.stop(instance).await;
        }
    }

    /// `chaos stop`: down until `chaos start`, whatever it was doing.
    async fn stop_on_request(&mut self, at: Instance) -> String {
        self.reap();
        let before = self.slots.get(&at).map(Slot::state).unwrap_or("stopped");
        if self.stop(at).await {
            format!("{} stopped", at.name())
        } else {
            format!(
                "{} was not running ({before}); it stays down until `chirp chaos start {}`",
                at.name(),
                at.name()
            )
        }
    }

    /// `chaos start`: starts a part that is not running, whatever stopped
    /// it, with a fresh count of failures.
    async fn start_on_request(&mut self, at: Instance) -> (bool, String) {
        self.reap();
        let slot = self.slots.entry(at).or_default();
        if let Some(pid) = slot.pid() {
            return (true, format!("{} is already running (pid {pid})", at.name()));
        }
        slot.failures = 0;
        match self.start(at).await {
            Ok(()) => (true, format!("{} started", at.name())),
            Err(err) => {
                let cause = format!("could not start: {err:#}");
                if let Some(slot) = self.slots.get_mut(&at) {
                    slot.life = Life::Dead { retry_at: None };
                    slot.last_death = Some(Death::now(cause.clone()));
                }
                println!("[chirp] {} {cause}", at.name());
                (false, format!("{} {cause}", at.name()))
            }
        }
    }

    fn states(&mut self) -> Vec<PartState> {
        self.reap();
        let ports = self.args.ports;
        let stopped = Slot::default();
        self.args
            .replicas
            .instances()
            .into_iter()
            .map(|instance| {
                let part = instance.part;
                let external = self.external.url(part).map(str::to_owned);
                let slot = self.slots.get(&instance).unwrap_or(&stopped);
                let pid = slot.pid();
                PartState {
                    part,
                    replica: instance.replica,
                    name: instance.name(),
                    running: pid.is_some() || external.is_some(),
                    state: if external.is_some() { "external" } else { slot.state() }.to_owned(),
                    pid,
                    restarts: slot.restarts,
                    last_death: slot.last_death.clone(),
                    address: external
                        .clone()
                        .unwrap_or_else(|| format!("127.0.0.1:{}", ports.of(instance))),
                    managed: external.is_none(),
                }
            })
            .collect()
    }

    /// A name a control command gave, if it names a process of this mesh.
    fn instance(&self, name: &str) -> Option<Instance> {
        Instance::parse(name).filter(|i| i.replica <= self.args.replicas.of(i.part))
    }
}

/// Waits (boundedly) for a process asked to stop; kills it past the bound.
async fn finish_stop(instance: Instance, mut child: Child) {
    if tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    println!("[chirp] {} stopped", instance.name());
}

/// Notices deaths (a few times a second, so `chirp status` and the log
/// know within a second) and carries out the restarts they scheduled.
async fn watch(supervisor: Arc<Mutex<Supervisor>>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut sup = supervisor.lock().await;
        sup.reap();
        sup.restart_due().await;
    }
}

async fn serve_control(listener: UnixListener, supervisor: Arc<Mutex<Supervisor>>, live: Arc<Live>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (supervisor, live) = (supervisor.clone(), live.clone());
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(read).read_line(&mut line).await.is_err() {
                return;
            }
            let reply = dispatch(&line, &supervisor, &live).await;
            if let Ok(json) = serde_json::to_string(&reply) {
                let _ = write.write_all(format!("{json}\n").as_bytes()).await;
            }
        });
    }
}

/// One control command, from the socket (`chirp chaos`, `chirp load`,
/// `chirp status`) or from the page's buttons.
async fn dispatch(line: &str, supervisor: &Mutex<Supervisor>, live: &Live) -> Reply {
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut sup = supervisor.lock().await;
    let named = words.get(1).and_then(|name| sup.instance(name));
    let (ok, message) = match (words.as_slice(), named) {
        (["ps"], _) => (true, String::new()),
        (["load", "start", rest @ ..], _) => {
            match rest
                .first()
                .map_or(Ok(live::traffic::DEFAULT_RATE), |r| r.parse::<f64>())
            {
                Ok(rate) if rate > 0.0 && rate <= 200.0 => {
                    live.traffic.start(rate);
                    (true, format!("traffic started: {rate} requests a second"))
                }
                _ => (false, "a rate from 0 to 200 requests a second".to_owned()),
            }
        }
        (["load", "stop"], _) => {
            live.traffic.stop();
            (true, "traffic stopped".to_owned())
        }
        (["heal"], _) => sup.heal_all(),
        ([kind @ ("slow" | "flaky" | "heal"), _, value @ ..], Some(at)) => {
            match Fault::parse(kind, value.first().copied().unwrap_or_default()) {
                Ok(fault) => sup.set_fault(at, fault),
                Err(err) => (false, err),
            }
        }
        (["stop", _], Some(at)) if sup.external.url(at.part).is_none() => (true, sup.stop_on_request(at).await),
        (["start", _], Some(at)) if sup.external.url(at.part).is_none() => sup.start_on_request(at).await,
        (["stop" | "start", _], Some(at)) => (false, format!("{} is external; chirp does not run it", at.name())),
        (["stop" | "start" | "slow" | "flaky" | "heal", name, ..], None) => {
            (false, format!("this mesh has no part `{name}`"))
        }
        _ => (false, format!("unknown command: {}", line.trim())),
    };
    let reply = Reply {
        ok,
        message,
        parts: sup.states(),
        port_base: sup.args.ports.base,
    };
    live.kick();
    reply
}

/// The page's buttons run the same commands as the control socket.
fn commands(supervisor: &Arc<Mutex<Supervisor>>, live: &Arc<Live>) -> live::Commands {
    let (supervisor, live) = (supervisor.clone(), live.clone());
    Arc::new(move |line: String| {
        let (supervisor, live) = (supervisor.clone(), live.clone());
        Box::pin(async move {
            let reply = dispatch(&line, &supervisor, &live).await;
            (reply.ok, reply.message)
        })
    })
}

/// Feeds the page every second. The supervisor is asked only briefly: while
/// it holds its lock (starting a store can take seconds) the page keeps
/// going with what it last knew of the processes.
async fn scrape(live: Arc<Live>, supervisor: Arc<Mutex<Supervisor>>) {
    let mut tick = tokio::time::interval(live::EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last: Option<live::Parts> = None;
    loop {
        live.next(&mut tick).await;
        if let Ok(mut sup) = tokio::time::timeout(Duration::from_millis(100), supervisor.lock()).await {
            last = Some(sup.view());
        }
        if let Some(parts) = &last {
            live.scrape(parts).await;
        }
    }
}

/// A fault proxy in front of every part chirp runs, listening before the
/// parts start so the services find them from their first connection.
async fn start_proxies(args: &UpArgs, external: &External) -> anyhow::Result<HashMap<Instance, faults::Switch>> {
    let mut switches = HashMap::new();
    for at in args.replicas.instances() {
        // A cluster's nodes tell clients where to go (MOVED): a proxy in
        // front of one would be bypassed, so the nodes are reached directly.
        if external.url(at.part).is_some() || (at.part == Part::Redis && args.replicas.redis_cluster()) {
            continue;
        }
        let port = args.ports.proxy(at);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("the fault proxy of {} on port {port}", at.name()))?;
        let switch = faults::Switch::default();
        tokio::spawn(faults::proxy(listener, args.ports.of(at), switch.clone()));
        switches.insert(at, switch);
    }
    Ok(switches)
}

/// Prints a child's output line by line, prefixed with its name.
fn stream_logs(name: &str, child: &mut Child) {
    let name: Arc<str> = name.into();
    if let Some(out) = child.stdout.take() {
        let name = name.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                println!("[{name}] {line}");
            }
        });
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                println!("[{name}] {line}");
            }
        });
    }
}

async fn wait_listening(port: u16, child: &mut Child, part: Part) -> anyhow::Result<()> {
    for _ in 0..600 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{} exited before listening ({status}); its log is above", part.name());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{} is not listening on port {port} after 30 s", part.name())
}

async fn wait_postgres(port: u16) -> anyhow::Result<()> {
    let pg_isready = pg_binary("pg_isready").context("pg_isready not found")?;
    for _ in 0..600 {
        let ready = Command::new(&pg_isready)
            .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-p", &port.to_string()])
            .status()
            .await
            .is_ok_and(|s| s.success());
        if ready {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("PostgreSQL does not accept sessions after 30 s")
}

async fn create_database(port: u16) -> anyhow::Result<()> {
    let createdb = pg_binary("createdb").context("createdb not found")?;
    let output = Command::new(createdb)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "chirp_users",
        ])
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() || stderr.contains("already exists") {
        Ok(())
    } else {
        bail!("createdb failed: {stderr}")
    }
}

/// Waits until a service's API reports SERVING.
///
/// # Errors
/// When it does not within `timeout`.
pub async fn wait_serving(ports: Ports, at: impl Into<Instance>, timeout: Duration) -> anyhow::Result<()> {
    let at = at.into();
    let deadline = tokio::time::Instant::now() + timeout;
    while crate::status::health(ports, at).await != Some(true) {
        if tokio::time::Instant::now() > deadline {
            bail!("{} is not SERVING after {timeout:?}; its log is above", at.name());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn print_banner(args: &UpArgs) {
    let p = args.ports;
    let services: String = args
        .replicas
        .instances()
        .into_iter()
        .filter(|i| i.part.is_service())
        .map(|i| {
            format!(
                "[chirp]   {:<18} 127.0.0.1:{}   metrics http://127.0.0.1:{}/metrics\n",
                i.name(),
                p.of(i),
                p.metrics(i)
            )
        })
        .collect();
    println!(
        "
[chirp] the mesh is up (data in {data})
[chirp] watch it live: http://{page}/
{services}[chirp] demo users: alice, bob, carol (moderator), password {DEMO_PASSWORD}; admin: {ADMIN} / {ADMIN_PASSWORD}
[chirp] try:
  grpcurl -plaintext 127.0.0.1:{u} list
  TOKEN=$(grpcurl -plaintext -d '{{\"username\":\"alice\",\"password\":\"{DEMO_PASSWORD}\"}}' 127.0.0.1:{u} chirp.user.v1.UserService/Login | jq -r .accessToken)
  grpcurl -plaintext -H \"authorization: Bearer $TOKEN\" -d '{{}}' 127.0.0.1:{m} chirp.message.v2.MessageService/HomeTimeline
  chirp login alice && chirp timeline --api v2
  chirp chaos stop redis   # then: chirp status, chirp timeline, chirp chaos start redis
  chirp load start && chirp chaos slow redis 300ms   # then watch the page; chirp chaos heal
[chirp] Ctrl-C stops everything.
",
        data = args.data_dir.display(),
        page = args.page,
        u = p.of(Part::UserService),
        m = p.of(Part::MessageService),
    );
}

/// Runs `command` as `run_as` (PostgreSQL's user when chirp is root), tied
/// to chirp: if chirp dies without stopping its children, they get SIGTERM.
fn set_user(command: &mut Command, run_as: Option<RunAs>) {
    process::tie(command.as_std_mut(), run_as, Signal::SIGTERM);
}

fn pg_binary(name: &str) -> Option<PathBuf> {
    process::pg_binary(name).ok()
}

fn which(name: &str) -> Option<PathBuf> {
    which::which(name).ok()
}
