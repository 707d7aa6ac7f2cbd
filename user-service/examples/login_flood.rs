//! The login-flood benchmark against a bare user-service (no mesh): many
//! clients send wrong passwords while another reads a user, and the server's
//! memory is read from /proc. `chirp bench --only login-flood` measures the
//! same against a whole mesh; this one needs only PostgreSQL:
//!
//! ```sh
//! cargo build --release -p user-service --example login_flood
//! ./target/release/user-service --database-url … &
//! ./target/release/examples/login_flood --pid $! --address http://127.0.0.1:50051
//! ```
//!
//! It registers one account, floods it, and prints the answers by code,
//! GetUser's p50/p99 during the flood, and the server's RSS before, at its
//! peak, and after the burst.

use std::time::{Duration, Instant};

use chirp_proto::user::v1::{self as pb, user_service_client::UserServiceClient};
use clap::Parser;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// user-service's gRPC address
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    address: String,
    /// The server's process id, to read its memory
    #[arg(long)]
    pid: u32,
    /// Wrong logins in flight at once
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How long the flood lasts, in seconds
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// How long to wait after the flood before reading memory again, in seconds
    #[arg(long, default_value_t = 10)]
    settle: u64,
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix(" kB")?.parse().ok())
        .unwrap_or_default();
    kib / 1024.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let channel = Channel::from_shared(args.address.clone())?.connect().await?;
    let username = format!("flood_{}", std::process::id());
    let user = UserServiceClient::new(channel.clone())
        .register(pb::RegisterRequest {
            username: username.clone(),
            password: "the real password".into(),
            display_name: String::new(),
        })
        .await?
        .into_inner()
        .user
        .ok_or_else(|| anyhow::anyhow!("no user in the reply"))?;
    let before = rss_mib(args.pid);

    let stop = Instant::now() + Duration::from_secs(args.seconds);
    let flood: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let mut client = UserServiceClient::new(channel.clone());
            let username = username.clone();
            tokio::spawn(async move {
                let mut codes = std::collections::BTreeMap::<String, u64>::new();
                while Instant::now() < stop {
                    let code = match client
                        .login(pb::LoginRequest {
                            username: username.clone(),
                            password: "a wrong password".into(),
                        })
                        .await
                    {
                        Ok(_) => "OK".to_owned(),
                        Err(status) => format!("{:?}", status.code()),
                    };
                    *codes.entry(code).or_default() += 1;
                }
                codes
            })
        })
        .collect();
    // A reader on its own connection, and the server's memory, meanwhile.
    let reader_channel = Channel::from_shared(args.address.clone())?.connect().await?;
    let mut reader = UserServiceClient::new(reader_channel);
    let (mut latencies, mut peak) = (Vec::new(), before);
    while Instant::now() < stop {
        let asked = Instant::now();
        reader
            .get_user(pb::GetUserRequest {
                user_id: user.id.clone(),
            })
            .await?;
        latencies.push(asked.elapsed());
        peak = peak.max(rss_mib(args.pid));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut codes = std::collections::BTreeMap::<String, u64>::new();
    for client in flood {
        for (code, n) in client.await? {
            *codes.entry(code).or_default() += n;
        }
    }
    peak = peak.max(rss_mib(args.pid));
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let after = rss_mib(args.pid);

    latencies.sort();
    let at = |q: f64| {
        let i = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies.get(i).copied().unwrap_or_default()
    };
    println!(
        "login flood: {} in flight for {} s: {codes:?}",
        args.concurrency, args.seconds
    );
    println!(
        "GetUser during the flood: {} calls, p50 {:.1} ms, p99 {:.1} ms",
        latencies.len(),
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3
    );
    println!(
        "user-service RSS: {before:.1} MiB before, {peak:.1} MiB peak, {after:.1} MiB {} s after",
        args.settle
    );
    Ok(())
}
