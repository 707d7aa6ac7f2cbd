//! The chirp CLI. `chirp up` runs the whole mesh on this machine; the other
//! commands talk to it as a user or an operator would.
//!
//! Exit codes: 0 success, 1 any other failure, 2 bad usage, 3 not
//! authenticated or not allowed, 4 not found, 5 a service is unavailable or
//! too slow, 6 invalid input.

mod backup;
mod bench;
mod client;
mod control;
mod faults;
mod layout;
mod live;
mod outbox;
mod redis_cluster;
mod restart;
mod seed;
mod status;
mod up;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use layout::{Instance, Part, Ports};

#[derive(Parser)]
#[command(name = "chirp", version, about = "Chirp: the Database-per-Service pattern, runnable")]
struct Cli {
    /// Print JSON instead of tables
    #[arg(long, global = true)]
    json: bool,

    /// First port of the mesh's block (services on base+1..base+4)
    #[arg(long, global = true, env = "CHIRP_PORT_BASE", default_value_t = layout::DEFAULT_PORT_BASE)]
    port_base: u16,

    /// Where `chirp up` keeps its stores, keys and control socket
    /// [default: the user's data directory, then chirp]
    #[arg(long, global = true, env = "CHIRP_DATA_DIR")]
    data_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Api {
    V1,
    V2,
}

#[derive(Subcommand)]
enum Command {
    /// Start the four stores and four services, seed demo data, stream logs;
    /// Ctrl-C stops everything. DATABASE_URL, REDIS_URL and MONGODB_URI use
    /// external stores instead of private ones
    Up {
        /// Do not write demo data
        #[arg(long)]
        no_seed: bool,
        /// Run several replicas of services, e.g.
        /// `message-service=2,comment-service=2`: replica N listens 100×(N−1)
        /// ports above the first, and every caller balances across them
        #[arg(long, default_value = "", hide_default_value = true)]
        replicas: up::Replicas,
        /// What happens to a part that dies on its own: started again with
        /// backoff (0.25 s doubling to 8 s; left down after 5 failures in a
        /// row), or left down until `chirp chaos start`
        #[arg(long, value_enum, default_value_t = restart::Policy::OnFailure)]
        restart: restart::Policy,
        /// Export every service's traces over OTLP/gRPC to this collector
        /// (e.g. http://127.0.0.1:4317, Jaeger's); none are exported without it
        #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
        otlp_endpoint: Option<String>,
        /// Where the live page listens [default: 127.0.0.1:<port base>]
        #[arg(long, env = "CHIRP_PAGE_ADDR")]
        page_addr: Option<std::net::SocketAddr>,
        /// Services reach their stores and peers directly, not through the
        /// fault proxies (`chirp chaos slow|flaky` then have nothing to act
        /// on); what `chirp bench --fresh` runs, since a proxy adds a copy
        /// to every hop
        #[arg(long)]
        direct: bool,
        /// comment-service's store as a six-node Redis Cluster (three
        /// masters, three replicas: `redis`, `redis-2` … `redis-6`, each
        /// stoppable with `chirp chaos stop redis-N`) instead of one Redis
        #[arg(long)]
        redis_cluster: bool,
    },
    /// Health of every service and store, circuit breakers, outbox depths,
    /// dead letters, erasures in progress
    Status,
    /// A service's outbox dead letters: events its consumers rejected or it
    /// could not read, set aside so the events behind them flow
    Outbox {
        #[arg(value_parser = ["list", "retry"])]
        action: String,
        #[arg(value_parser = ["user-service", "message-service", "comment-service"])]
        service: String,
    },
    /// Break a part of a running `chirp up`, or mend it: `stop`/`start` the
    /// process; `slow <part> 300ms` holds every reply on the way to it;
    /// `flaky <part> 20%` cuts that share of connections and requests on
    /// the way to it; `heal [part]` clears those faults (all without a part)
    Chaos {
        #[arg(value_parser = ["stop", "start", "slow", "flaky", "heal"])]
        action: String,
        /// postgres, mongodb, redis, user-service, message-service,
        /// comment-service or analytics-service; `<service>-N` for the N-th
        /// replica of a service run with `chirp up --replicas`
        part: Option<String>,
        /// The latency (`slow`) or the error rate (`flaky`)
        value: Option<String>,
    },
    /// Gentle mixed traffic from a running `chirp up` against its own mesh
    /// (what the page's traffic button does), so its edges move
    Load {
        #[arg(value_parser = ["start", "stop"])]
        action: String,
        /// Requests a second
        #[arg(long, default_value_t = live::traffic::DEFAULT_RATE)]
        rate: f64,
    },
    /// Back up a service's store from a running `chirp up`: a consistent,
    /// timestamped directory with a manifest (schema version, counts,
    /// checksums) per service
    Backup {
        /// user-service, message-service, comment-service, analytics-service or all
        service: String,
        /// Where the backup directories go [default: <data dir>/backups]
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// Replace a service's store with a backup: the service loads and
    /// checks it beside the live data first (a damaged backup, or one newer
    /// than the service's data, is refused and nothing changes), then every
    /// replica turns NOT_SERVING for the switch (its peers degrade as when
    /// its store is down) while the rest keep serving. The replaced data is
    /// kept until `--confirm`; `--undo` puts it back
    Restore {
        service: String,
        #[arg(required_unless_present_any = ["confirm", "undo"], conflicts_with_all = ["confirm", "undo"])]
        backup: Option<PathBuf>,
        /// Drop the data the last restore replaced
        #[arg(long, conflicts_with = "undo")]
        confirm: bool,
        /// Put back the data the last restore replaced
        #[arg(long)]
        undo: bool,
    },
    /// Put a service in maintenance (NOT_SERVING, its store left alone) or
    /// take it out, by hand
    Maintenance {
        service: String,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Create an account
    Register {
        username: String,
        #[arg(long, env = "CHIRP_PASSWORD", hide_env_values = true)]
        password: String,
        #[arg(long)]
        display_name: Option<String>,
    },
    /// Log in; the token is kept in the user's config directory
    Login {
        username: String,
        #[arg(long, env = "CHIRP_PASSWORD", hide_env_values = true, default_value = up::DEMO_PASSWORD)]
        password: String,
    },
    /// Post a message
    Post { body: String },
    /// Show one message with its author and comments
    Get {
        message_id: String,
        #[arg(long, value_enum, default_value_t = Api::V2)]
        api: Api,
    },
    /// Your home timeline
    Timeline {
        #[arg(long, value_enum, default_value_t = Api::V2)]
        api: Api,
        #[arg(long, default_value_t = 20)]
        page_size: i32,
    },
    /// Comment on a message
    Comment { message_id: String, body: String },
    /// Follow a user (id, or the username of someone you follow or who follows you)
    Follow { user: String },
    /// Ban a user (moderators and admins)
    Ban {
        user: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Engagement numbers of a user (yourself by default)
    Stats { user: Option<String> },
    /// Measure the mesh: each RPC against a bare gRPC call and each store
    /// driven directly, in one run (see BENCHMARKS.md)
    Bench(bench::BenchArgs),
    /// The bare gRPC server `chirp bench` measures as its baseline
    #[command(hide = true)]
    BenchEcho {
        #[arg(long)]
        port: u16,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // `chirp up` hands the endpoint to the services; every other command
    // traces its own calls when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let telemetry = if matches!(cli.command, Command::Up { .. }) {
        None
    } else {
        Some(service_kit::telemetry::Telemetry::for_tool("chirp"))
    };
    let command = cli.command.name();
    let span = if service_kit::telemetry::exporting() {
        tracing::info_span!(target: "chirp::cli", "command", otel.name = format!("chirp {command}"))
    } else {
        tracing::Span::none()
    };
    let code = tracing::Instrument::instrument(run(cli), span).await;
    if let Some(telemetry) = telemetry {
        telemetry.shutdown_async().await;
    }
    code
}

async fn run(cli: Cli) -> ExitCode {
    let ports = Ports { base: cli.port_base };
    let data_dir = layout::data_dir(cli.data_dir.as_deref());
    let client = client::Client::new(ports, cli.json);
    let result = match cli.command {
        Command::Up {
            no_seed,
            replicas,
            restart,
            otlp_endpoint,
            page_addr,
            direct,
            redis_cluster,
        } => {
            up::run(up::UpArgs {
                data_dir,
                ports,
                seed: !no_seed,
                replicas: if redis_cluster {
                    replicas.with_redis_cluster()
                } else {
                    replicas
                },
                restart,
                otlp_endpoint: otlp_endpoint.filter(|e| !e.trim().is_empty()),
                page: page_addr.unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], ports.base))),
                proxies: !direct,
            })
            .await
        }
        Command::Status => print_status(&data_dir, cli.json).await,
        Command::Chaos { action, part, value } => {
            chaos(&data_dir, &action, part.as_deref(), value.as_deref(), cli.json).await
        }
        Command::Backup { service, to } => backup::backup(&data_dir, &service, to.as_deref(), cli.json).await,
        Command::Restore {
            service,
            backup,
            confirm,
            undo,
        } => {
            let what = match (&backup, confirm, undo) {
                (Some(dir), _, _) => backup::Restore::From(dir),
                (None, true, _) => backup::Restore::Confirm,
                (None, _, _) => backup::Restore::Undo,
            };
            backup::restore(&data_dir, &service, what, cli.json).await
        }
        Command::Maintenance { service, state } => backup::switch(&data_dir, &service, state == "on").await,
        Command::Load { action, rate } => {
            let command = if action == "start" {
                format!("load start {rate}")
            } else {
                "load stop".to_owned()
            };
            say(&data_dir, &command, cli.json).await
        }
        Command::Outbox { action, service } => outbox::run(&data_dir, &action, &service, cli.json).await,
        Command::Register {
            username,
            password,
            display_name,
        } => client.register(&username, &password, display_name.as_deref()).await,
        Command::Login { username, password } => client.login(&username, &password).await,
        Command::Post { body } => client.post(&body).await,
        Command::Get { message_id, api } => client.get(&message_id, matches!(api, Api::V1)).await,
        Command::Timeline { api, page_size } => client.timeline(matches!(api, Api::V1), page_size).await,
        Command::Comment { message_id, body } => client.comment(&message_id, &body).await,
        Command::Follow { user } => client.follow(&user).await,
        Command::Ban { user, reason } => client.ban(&user, &reason).await,
        Command::Stats { user } => client.stats(user.as_deref()).await,
        Command::Bench(args) => bench::run(&data_dir, args, cli.json).await,
        Command::BenchEcho { port } => bench::echo_server(port).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("chirp: {err:#}");
            ExitCode::from(exit_code(&err))
        }
    }
}

impl Command {
    /// The subcommand as typed, for span names.
    fn name(&self) -> &'static str {
        match self {
            Self::Up { .. } => "up",
            Self::Status => "status",
            Self::Outbox { .. } => "outbox",
            Self::Chaos { .. } => "chaos",
            Self::Load { .. } => "load",
            Self::Backup { .. } => "backup",
            Self::Restore { .. } => "restore",
            Self::Maintenance { .. } => "maintenance",
            Self::Register { .. } => "register",
            Self::Login { .. } => "login",
            Self::Post { .. } => "post",
            Self::Get { .. } => "get",
            Self::Timeline { .. } => "timeline",
            Self::Comment { .. } => "comment",
            Self::Follow { .. } => "follow",
            Self::Ban { .. } => "ban",
            Self::Stats { .. } => "stats",
            Self::Bench(_) => "bench",
            Self::BenchEcho { .. } => "bench-echo",
        }
    }
}

fn exit_code(err: &anyhow::Error) -> u8 {
    use tonic::Code;
    match err.downcast_ref::<tonic::Status>().map(tonic::Status::code) {
        Some(Code::Unauthenticated | Code::PermissionDenied) => 3,
        Some(Code::NotFound) => 4,
        Some(Code::Unavailable | Code::DeadlineExceeded) => 5,
        Some(Code::InvalidArgument) => 6,
        _ => 1,
    }
}

async fn chaos(
    data_dir: &std::path::Path,
    action: &str,
    part: Option<&str>,
    value: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let Some(part) = part else {
        anyhow::ensure!(action == "heal", "`chirp chaos {action}` needs a part");
        return say(data_dir, "heal", json).await;
    };
    let at = Instance::parse(part).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown part `{part}`: one of {}, or <service>-N for a replica",
            Part::ALL.map(Part::name).join(", ")
        )
    })?;
    let value = match (action, value) {
        ("slow" | "flaky", None) => anyhow::bail!(
            "`chirp chaos {action} {part}` needs a {}",
            if action == "slow" {
                "latency, e.g. 300ms"
            } else {
                "rate, e.g. 20%"
            }
        ),
        (_, value) => value.unwrap_or_default(),
    };
    say(data_dir, format!("{action} {} {value}", at.name()).trim(), json).await
}

/// Sends a control command to the running `chirp up` and prints its answer.
async fn say(data_dir: &std::path::Path, command: &str, json: bool) -> anyhow::Result<()> {
    let reply = control::send(data_dir, command).await?;
    if json {
        println!("{}", serde_json::json!({"ok": true, "message": reply.message}));
    } else {
        println!("{}", reply.message);
    }
    Ok(())
}

async fn print_status(data_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let processes = control::send(data_dir, "ps").await?;
    // The running mesh knows its own ports, whatever this command was given.
    let ports = Ports {
        base: processes.port_base,
    };
    let mut reports = Vec::new();
    for p in processes.parts.iter().filter(|p| p.part.is_service()) {
        reports.push(
            status::report(
                ports,
                Instance {
                    part: p.part,
                    replica: p.replica,
                },
            )
            .await,
        );
    }
    if json {
        println!("{}", serde_json::json!({"parts": processes.parts, "services": reports}));
        return Ok(());
    }
    println!(
        "{:<18} {:<11} {:<8} {:<9} {:<16} LAST DEATH",
        "PART", "PROCESS", "PID", "RESTARTS", "ADDRESS"
    );
    for p in &processes.parts {
        println!(
            "{:<18} {:<11} {:<8} {:<9} {:<16} {}",
            p.name,
            p.state,
            p.pid.map(|pid| pid.to_string()).unwrap_or_else(|| "-".into()),
            p.restarts,
            p.address,
            p.last_death
                .as_ref()
                .map_or_else(|| "-".to_owned(), |d| format!("{} ({})", d.cause, d.at))
        );
    }
    println!();
    println!(
        "{:<18} {:<12} {:<8} {:<40} {:<9} {:<34} DEAD LETTERS",
        "SERVICE", "API", "STORE", "CIRCUITS", "ERASURES", "OUTBOX"
    );
    for r in &reports {
        let yes_no = |v: Option<bool>, yes: &str, no: &str| match v {
            Some(true) => yes.to_owned(),
            Some(false) => no.to_owned(),
            None => "unreachable".to_owned(),
        };
        let erasures = r.erasures_pending.map_or_else(|| "-".to_owned(), |n| n.to_string());
        println!(
            "{:<18} {:<12} {:<8} {:<40} {:<9} {:<34} {}",
            r.service,
            yes_no(r.serving, "SERVING", "NOT_SERVING"),
            yes_no(r.store_up, "up", "down"),
            pairs(&r.circuits),
            erasures,
            pairs(&r.outbox),
            pairs(&r.dead_letters)
        );
    }
    Ok(())
}

/// `name=value name=value`, or `-` for none.
fn pairs<T: std::fmt::Display>(pairs: &[(String, T)]) -> String {
    if pairs.is_empty() {
        return "-".to_owned();
    }
    pairs
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}
