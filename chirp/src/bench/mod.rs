//! `chirp bench`: how fast the mesh is, as ratios to what the same machine
//! does with a bare gRPC call and with each store driven directly, measured
//! in the same run. Runs against a running `chirp up`, or `--fresh` starts
//! one in a temporary directory and stops it afterwards.

mod hops;
mod load;
pub mod procfs;
mod sink;
mod targets;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use serde::Serialize;
use targets::{Ctx, Endpoints, GraphSize, Target};

use crate::{
    control,
    layout::{Part, Ports},
};

#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// What to run; every baseline and RPC by default
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Target>,
    /// Requests in flight (closed loop), or at most in flight (open loop)
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections per service
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Measured time per target
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured time before it
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Open loop: this many requests a second on schedule, latency counted
    /// from when each was due (coordinated omission corrected)
    #[arg(long)]
    pub rate: Option<f64>,
    /// Start a mesh of its own in a temporary directory, and stop it after
    #[arg(long)]
    pub fresh: bool,
    /// With --fresh: comment-service's store is a six-node Redis Cluster
    /// (`chirp up --redis-cluster`); run the comment targets beside echo to
    /// compare with a run on one Redis
    #[arg(long, requires = "fresh")]
    pub redis_cluster: bool,
    /// With --fresh: every service exports its traces (to a counting OTLP
    /// receiver in this process), sampling this share of requests (0 to 1);
    /// compare with a run without it for tracing's cost
    #[arg(long)]
    pub tracing: Option<f64>,
    /// Users in the seeded graph
    #[arg(long, default_value_t = 50)]
    pub users: usize,
    /// Users each one follows
    #[arg(long, default_value_t = 10)]
    pub follows: usize,
    /// Messages each user posts
    #[arg(long, default_value_t = 5)]
    pub messages: usize,
    /// Comments on each message
    #[arg(long, default_value_t = 2)]
    pub comments: usize,
    /// After login-flood: how long to wait before reading user-service's
    /// memory again (whether the burst's memory went back)
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub settle: Duration,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, "s"), |i| text.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 8s or 500ms"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("`{text}`: use ms, s or m")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

/// One target's figures.
#[derive(Debug, Serialize)]
struct Row {
    target: Target,
    requests_per_second: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    /// CPU microseconds per request, per process that did work.
    cpu_us_per_request: BTreeMap<String, f64>,
    /// Highest RSS of each service during the run, in MiB.
    peak_rss_mib: BTreeMap<String, f64>,
    /// login-flood: the reads made beside it, and user-service's RSS
    /// `--settle` after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    beside: Option<Beside>,
    /// What each hop between services cost during the run, by
    /// `caller→callee`.
    hops: BTreeMap<String, hops::Hop>,
    /// Throughput over the reference baseline's, when the target names one.
    ratio: Option<f64>,
    /// What the ratio should reach.
    goal: Option<f64>,
    reference: Option<String>,
}

/// GetUser beside a login flood, and memory after it.
#[derive(Debug, Serialize)]
struct Beside {
    get_user_calls: u64,
    get_user_p50_ms: f64,
    get_user_p99_ms: f64,
    user_service_rss_after_mib: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    mode: String,
    concurrency: usize,
    connections: usize,
    duration_s: f64,
    graph: GraphSize,
    idle_rss_mib: BTreeMap<String, f64>,
    rows: Vec<Row>,
}

/// A mesh `chirp bench` started, stopped when dropped.
struct FreshMesh {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for FreshMesh {
    fn drop(&mut self) {
        // SIGINT: `chirp up` stops every part it started.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // Our own child, not reaped yet: the pid is still its.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGINT);
        }
        let _ = self.child.wait();
    }
}

/// A bare tonic server (health only) in its own process: the cost of one
/// gRPC unary call on this machine, nothing else.
struct EchoServer {
    child: std::process::Child,
    url: String,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves grpc.health.v1 on `port` until killed (`chirp bench` runs it).
pub async fn echo_server(port: u16) -> anyhow::Result<()> {
    let (_reporter, health) = tonic_health::server::health_reporter();
    tonic::transport::Server::builder()
        .add_service(health)
        .serve(([127, 0, 0, 1], port).into())
        .await?;
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn start_echo() -> anyhow::Result<EchoServer> {
    let port = free_port()?;
    let child = std::process::Command::new(std::env::current_exe()?)
        .args(["bench-echo", "--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting the echo server")?;
    let server = EchoServer {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(server);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the echo server did not start")
}

async fn start_fresh(otlp: Option<(&str, f64)>, redis_cluster: bool) -> anyhow::Result<(FreshMesh, PathBuf, Ports)> {
    let dir = tempfile::Builder::new().prefix("chirp-bench").tempdir()?;
    // PostgreSQL may run as another user, who must reach the data directory.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let base = loop {
        let candidate = 20_000 + rand::random::<u16>() % 30_000;
        // A cluster's nodes are 100 apart, each with its bus port 50 above.
        let nodes = if redis_cluster { 1..6 } else { 0..0 };
        let ports = (0..40).chain(nodes.flat_map(|n| [22 + 100 * n, 72 + 100 * n]));
        if candidate < 65_000 - 600
            && ports
                .into_iter()
                .all(|i| std::net::TcpListener::bind(("127.0.0.1", candidate + i)).is_ok())
        {
            break candidate;
        }
    };
    let log = std::fs::File::create(dir.path().join("up.log"))?;
    let mut up = std::process::Command::new(std::env::current_exe()?);
    // Direct: the fault proxies would add a copy to every hop measured.
    up.args(["up", "--no-seed", "--direct"])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    if redis_cluster {
        up.arg("--redis-cluster");
    }
    if let Some((endpoint, ratio)) = otlp {
        up.args(["--otlp-endpoint", endpoint])
            .env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
            .env("OTEL_TRACES_SAMPLER_ARG", ratio.to_string());
    }
    let child = up
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--port-base")
        .arg(base.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting chirp up")?;
    let data_dir = dir.path().to_path_buf();
    let mesh = FreshMesh { child, _dir: dir };
    let ports = Ports { base };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while control::send(&data_dir, "ps").await.is_err() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "chirp up did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for part in Part::SERVICES {
        crate::up::wait_serving(ports, part, Duration::from_secs(120)).await?;
    }
    Ok((mesh, data_dir, ports))
}

/// Waits (up to 60 s) until no service has events waiting in an outbox.
async fn settle(ports: Ports) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let mut waiting = 0;
        for part in Part::SERVICES {
            let report = crate::status::report(ports, part).await;
            waiting += report.outbox.iter().map(|(_, n)| *n).sum::<i64>();
        }
        if waiting == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{cpus} CPUs, {model}")
}

fn mib(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 10.0).round() / 10.0
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

pub async fn run(data_dir: &Path, args: BenchArgs, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.tracing.is_none() || args.fresh,
        "--tracing needs --fresh (it starts the mesh with an exporter)"
    );
    anyhow::ensure!(
        args.tracing.is_none_or(|r| (0.0..=1.0).contains(&r)),
        "--tracing is a sampling ratio from 0 to 1"
    );
    let sink = match args.tracing {
        Some(_) => Some(sink::Sink::start().await?),
        None => None,
    };
    let (_fresh, data_dir, ports) = if args.fresh {
        let otlp = sink.as_ref().zip(args.tracing).map(|(s, r)| (s.endpoint.as_str(), r));
        let (mesh, dir, ports) = start_fresh(otlp, args.redis_cluster).await?;
        (Some(mesh), dir, ports)
    } else {
        let reply = control::send(data_dir, "ps")
            .await
            .context("start `chirp up` first, or pass --fresh")?;
        (None, data_dir.to_path_buf(), Ports { base: reply.port_base })
    };
    let processes: Vec<(String, u32)> = control::send(&data_dir, "ps")
        .await?
        .parts
        .iter()
        .filter_map(|p| Some((p.part.name().to_owned(), p.pid?)))
        .collect();
    let echo = start_echo().await?;
    let mut watched = processes.clone();
    watched.push(("echo".to_owned(), echo.child.id()));
    // The client itself: where the SQLite baseline runs, and what the load
    // costs to generate.
    watched.push(("bench".to_owned(), std::process::id()));

    let env = |name: &str, default: String| std::env::var(name).unwrap_or(default);
    let endpoints = Endpoints {
        service_url: Box::new(move |part| ports.url(part)),
        echo_url: echo.url.clone(),
        postgres_url: env(
            "DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{}/chirp_users", ports.of(Part::Postgres)),
        ),
        redis_url: env("REDIS_URL", format!("redis://127.0.0.1:{}", ports.of(Part::Redis))),
        redis_cluster: args.redis_cluster,
        mongodb_uri: env(
            "MONGODB_URI",
            format!("mongodb://127.0.0.1:{}/?directConnection=true", ports.of(Part::Mongodb)),
        ),
    };
    let size = GraphSize {
        users: args.users,
        follows: args.follows,
        messages: args.messages,
        comments: args.comments,
    };
    if !json {
        eprintln!(
            "seeding {} users, {} follows each, {} messages each, {} comments per message…",
            size.users, size.follows, size.messages, size.comments
        );
    }
    let ctx = Arc::new(Ctx::build(&endpoints, args.connections, size, "bench-password-1").await?);
    // Let the outboxes drain and the services settle before calling them idle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss_mib = processes
        .iter()
        .filter(|(name, _)| name.ends_with("-service"))
        .filter_map(|(name, pid)| Some((name.clone(), mib(procfs::rss_kib(*pid)?))))
        .collect();

    let targets: Vec<Target> = if args.only.is_empty() {
        Target::BASELINES.into_iter().chain(Target::RPCS).collect()
    } else {
        args.only.clone()
    };
    let mode = match args.rate {
        Some(rate) => load::Mode::Open {
            rate,
            max_in_flight: args.concurrency,
        },
        None => load::Mode::Closed {
            concurrency: args.concurrency,
        },
    };
    let bars = indicatif::MultiProgress::new();
    if json {
        bars.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let style = indicatif::ProgressStyle::with_template("{prefix:>15} [{bar:40}] {msg}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());

    let mut rows = Vec::new();
    for target in targets {
        // What the last target left in the outboxes would otherwise be
        // delivered, and its CPU counted, during this one.
        settle(ports).await;
        let bar = bars.add(indicatif::ProgressBar::new(1000));
        bar.set_style(style.clone());
        bar.set_prefix(target.name());
        // The client alone; a store server with the processes it forks.
        let cpu = |name: &str, pid: u32| procfs::cpu_micros(pid, name != "bench");
        let before: Vec<Option<u64>> = watched.iter().map(|(name, pid)| cpu(name, *pid)).collect();
        let peaks = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
        let sampler = {
            let (peaks, watched) = (peaks.clone(), processes.clone());
            tokio::spawn(async move {
                loop {
                    for (name, pid) in watched.iter().filter(|(n, _)| n.ends_with("-service")) {
                        if let (Some(rss), Ok(mut peaks)) = (procfs::rss_kib(*pid), peaks.lock()) {
                            let peak = peaks.entry(name.clone()).or_default();
                            *peak = (*peak).max(rss);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let metrics_before = hops::snapshot(ports).await;
        let tick_bar = bar.clone();
        let call_ctx = ctx.clone();
        let measured = load::run(
            mode,
            args.warmup,
            args.duration,
            move |worker, sequence| call_ctx.clone().call(target, worker, sequence),
            move |done| tick_bar.set_position((done * 1000.0) as u64),
        )
        .await;
        sampler.abort();
        let hops = hops::between(&metrics_before, &hops::snapshot(ports).await);
        let beside = if target == Target::LoginFlood {
            let (calls, p50, p99) = ctx.beside.lock().map_or((0, 0, 0), |mut h| {
                let read = (h.len(), h.value_at_quantile(0.5), h.value_at_quantile(0.99));
                h.reset();
                read
            });
            tokio::time::sleep(args.settle).await;
            let user_service = processes
                .iter()
                .find(|(name, _)| name == "user-service")
                .map(|(_, pid)| *pid);
            Some(Beside {
                get_user_calls: calls,
                get_user_p50_ms: ms(p50),
                get_user_p99_ms: ms(p99),
                user_service_rss_after_mib: user_service.and_then(procfs::rss_kib).map(mib),
            })
        } else {
            None
        };
        let calls = measured.latency.len() as f64;
        // CPU over warm-up and measurement, per request over both.
        let all_calls = calls * (args.warmup + args.duration).as_secs_f64() / args.duration.as_secs_f64().max(1e-9);
        let cpu_us_per_request = watched
            .iter()
            .zip(before)
            .filter_map(|((name, pid), before)| {
                let used = cpu(name, *pid)?.saturating_sub(before?);
                let per = used as f64 / all_calls.max(1.0);
                (per >= 1.0).then(|| (name.clone(), per.round()))
            })
            .collect();
        let latency = &measured.latency;
        let row = Row {
            target,
            requests_per_second: measured.throughput().round(),
            p50_ms: ms(latency.value_at_quantile(0.5)),
            p90_ms: ms(latency.value_at_quantile(0.9)),
            p99_ms: ms(latency.value_at_quantile(0.99)),
            max_ms: ms(latency.max()),
            ok: measured.ok,
            errors: measured.errors,
            cpu_us_per_request,
            peak_rss_mib: peaks
                .lock()
                .map(|p| p.iter().map(|(n, k)| (n.clone(), mib(*k))).collect())
                .unwrap_or_default(),
            beside,
            hops,
            ratio: None,
            goal: None,
            reference: None,
        };
        bar.finish_with_message(format!(
            "{:.0} req/s, p99 {:.2} ms",
            row.requests_per_second, row.p99_ms
        ));
        rows.push(row);
    }
    ctx.clean_up().await;

    // Ratios to the baselines measured in this run.
    let throughput: BTreeMap<String, f64> = rows.iter().map(|r| (r.target.name(), r.requests_per_second)).collect();
    for row in &mut rows {
        if let Some((references, goal)) = row.target.target() {
            let best = references
                .iter()
                .filter_map(|r| throughput.get(&r.name()).map(|t| (r.name(), *t)))
                .min_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((name, reference)) = best {
                row.ratio = Some((row.requests_per_second / reference.max(1e-9) * 100.0).round() / 100.0);
                row.goal = Some(goal);
                row.reference = Some(name);
            }
        }
    }

    let report = Report {
        machine: machine(),
        mode: match mode {
            load::Mode::Closed { concurrency } => format!("closed loop, {concurrency} in flight"),
            load::Mode::Open { rate, .. } => format!("open loop, {rate} req/s"),
        },
        concurrency: args.concurrency,
        connections: args.connections,
        duration_s: args.duration.as_secs_f64(),
        graph: size,
        idle_rss_mib,
        rows,
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    if let (Some(sink), Some(ratio)) = (&sink, args.tracing) {
        // The last batches leave within the exporters' schedule delay.
        tokio::time::sleep(Duration::from_secs(6)).await;
        eprintln!(
            "tracing: sampling {ratio}, {} spans exported to the receiver",
            sink.spans()
        );
    }
    Ok(())
}

fn print_table(report: &Report) {
    println!(
        "\n{} · {} · {} connections per service · {} s each",
        report.machine, report.mode, report.connections, report.duration_s
    );
    println!(
        "{:<15} {:>9} {:>8} {:>8} {:>8} {:>8} {:>22} {:<10} CPU µs/req",
        "TARGET", "REQ/S", "P50 ms", "P90 ms", "P99 ms", "MAX ms", "RATIO (goal)", "ERRORS"
    );
    for row in &report.rows {
        let ratio = match (row.ratio, row.goal, &row.reference) {
            (Some(ratio), Some(goal), Some(reference)) => format!(
                "{ratio:.2}×{reference} ({goal}){}",
                if ratio >= goal { "" } else { " ✗" }
            ),
            _ => "-".to_owned(),
        };
        let errors = if row.errors.is_empty() {
            "0".to_owned()
        } else {
            row.errors
                .iter()
                .map(|(c, n)| format!("{c}={n}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let cpu = row
            .cpu_us_per_request
            .iter()
            .map(|(p, us)| format!("{}={us}", p.trim_end_matches("-service")))
            .collect::<Vec<_>>()
            .join(" ");
        println!(
            "{:<15} {:>9} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>22} {:<10} {}",
            row.target.name(),
            row.requests_per_second,
            row.p50_ms,
            row.p90_ms,
            row.p99_ms,
            row.max_ms,
            ratio,
            errors,
            cpu
        );
    }
    for row in &report.rows {
        if let Some(beside) = &row.beside {
            println!(
                "\n{}: GetUser beside it {} calls, p50 {:.2} ms, p99 {:.2} ms; user-service RSS after it settled: {} MiB",
                row.target.name(),
                beside.get_user_calls,
                beside.get_user_p50_ms,
                beside.get_user_p99_ms,
                beside.user_service_rss_after_mib.map_or_else(|| "-".to_owned(), |m| m.to_string())
            );
        }
    }
    let with_hops: Vec<&Row> = report.rows.iter().filter(|r| !r.hops.is_empty()).collect();
    if !with_hops.is_empty() {
        println!(
            "\n{:<15} {:<36} {:>8} {:>22} {:>22} {:>18}",
            "HOPS", "CALLER→CALLEE", "CALLS", "CALLER p50/p99 ms", "CALLEE p50/p99 ms", "ADDED p50/p99 ms"
        );
        for row in with_hops {
            for (edge, hop) in &row.hops {
                println!(
                    "{:<15} {:<36} {:>8} {:>22} {:>22} {:>18}",
                    row.target.name(),
                    edge,
                    hop.calls,
                    format!("{:.3}/{:.3}", hop.caller_p50_ms, hop.caller_p99_ms),
                    format!("{:.3}/{:.3}", hop.callee_p50_ms, hop.callee_p99_ms),
                    format!("{:.3}/{:.3}", hop.added_p50_ms, hop.added_p99_ms)
                );
            }
        }
    }
    let rss = |m: &BTreeMap<String, f64>| {
        m.iter()
            .map(|(s, v)| format!("{}={v}", s.trim_end_matches("-service")))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("\nidle RSS MiB: {}", rss(&report.idle_rss_mib));
    let mut peak: BTreeMap<String, f64> = BTreeMap::new();
    for row in &report.rows {
        for (s, v) in &row.peak_rss_mib {
            let p = peak.entry(s.clone()).or_default();
            *p = p.max(*v);
        }
    }
    println!("peak RSS MiB: {}", rss(&peak));
}
