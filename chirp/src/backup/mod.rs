//! `chirp backup`, `chirp restore` and `chirp maintenance`: orchestration
//! only. Each service reads and writes its own store (its
//! `store::maintenance`, reached through the operator routes of its metrics
//! port; see `service_kit::maintenance`); this module asks the services,
//! moves the backup directories, switches maintenance on every replica and
//! shows what happened. It never connects to a store.
//!
//! A restore:
//!
//! 1. the backup is handed to the service (copied into its `BACKUP_DIR` if
//!    it is elsewhere), which verifies it and loads it beside the live data
//!    while it keeps serving; a backup that does not load is refused here
//!    and nothing has changed;
//! 2. every replica of the service goes into maintenance (NOT_SERVING, its
//!    RPCs fail fast, its relays and jobs wait, its peers degrade as when
//!    the store is stopped), and the restore waits until each one says so;
//! 3. the service switches to the loaded data, keeping the replaced data;
//! 4. every replica leaves maintenance and prepares its store again;
//! 5. `chirp restore <service> --confirm` drops the kept data, `--undo`
//!    puts it back (through maintenance again).

mod copy;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::{
    control,
    layout::{Instance, Part, Ports},
    status,
};

/// Longest a service may take to write a backup, or to load or switch
/// one: as long as its store is big.
const STEP_LIMIT: Duration = Duration::from_secs(30 * 60);

/// `user-service` … or `all`.
fn services(which: &str) -> anyhow::Result<Vec<Part>> {
    if which == "all" {
        return Ok(Part::SERVICES.to_vec());
    }
    Part::parse(which)
        .filter(|p| p.is_service())
        .map(|p| vec![p])
        .ok_or_else(|| {
            anyhow::anyhow!(
                "`{which}`: a service (user-service, message-service, comment-service, analytics-service) or all"
            )
        })
}

/// Where the services of `chirp up` keep their backups (their
/// `BACKUP_DIR`).
#[must_use]
pub fn backup_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("backups")
}

/// The running mesh's ports and every replica of `service` it runs.
async fn replicas(data_dir: &Path, service: Part) -> anyhow::Result<(Ports, Vec<Instance>)> {
    let reply = control::send(data_dir, "ps").await?;
    let mut replicas: Vec<Instance> = reply
        .parts
        .iter()
        .filter(|p| p.part == service)
        .map(|p| Instance {
            part: p.part,
            replica: p.replica,
        })
        .collect();
    replicas.sort_by_key(|r| r.replica);
    if replicas.is_empty() {
        bail!("the running mesh has no {}", service.name());
    }
    Ok((Ports { base: reply.port_base }, replicas))
}

/// A step the service refused (409): it changed nothing.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// One operator step on `at`: the JSON of a 200 answer, or the service's
/// reason ([`Refused`] for a refusal).
async fn step(data_dir: &Path, ports: Ports, at: Instance, path: &str) -> anyhow::Result<Value> {
    let (code, body) = status::operator_request(data_dir, ports, at, "POST", path, STEP_LIMIT).await?;
    let json: Value = serde_json::from_str(&body).unwrap_or(Value::String(body.clone()));
    if code != 200 {
        let reason = json.get("error").and_then(Value::as_str).unwrap_or(&body);
        let text = format!("{} answered {path} with {code}: {reason}", at.name());
        if code == 409 {
            return Err(Refused(text).into());
        }
        bail!(text);
    }
    Ok(json)
}

fn counts_text(counts: &Value) -> String {
    counts
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(name, n)| format!("{name}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// `chirp backup <service|all> [--to DIR]`: each service writes its backup
/// into its `BACKUP_DIR`; with `--to`, the directory is moved there.
///
/// # Errors
/// When no mesh runs, a service refuses or fails, or the move fails.
pub async fn backup(data_dir: &Path, which: &str, to: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let mut taken = Vec::new();
    for service in services(which)? {
        let (ports, replicas) = replicas(data_dir, service).await?;
        let start = Instant::now();
        let name = service_kit::maintenance::command::backup_name(service.name());
        let manifest = step(data_dir, ports, replicas[0], &format!("/backups/{name}"))
            .await
            .with_context(|| format!("backing up {}", service.name()))?;
        let mut dir = backup_dir(data_dir).join(&name);
        let elsewhere = to.filter(|to| to.canonicalize().ok() != backup_dir(data_dir).canonicalize().ok());
        if let Some(to) = elsewhere {
            let target = to.join(&name);
            copy::move_dir(&dir, &target).with_context(|| format!("moving the backup to {}", target.display()))?;
            dir = target;
        }
        let bytes = copy::dir_size(&dir)?;
        let took = start.elapsed();
        if !json {
            println!(
                "{} backed up to {} in {:.2} s ({} bytes): {}",
                service.name(),
                dir.display(),
                took.as_secs_f64(),
                bytes,
                counts_text(&manifest["counts"])
            );
        }
        taken.push(serde_json::json!({
            "service": service.name(), "dir": dir, "seconds": took.as_secs_f64(),
            "bytes": bytes, "manifest": manifest,
        }));
    }
    if json {
        println!("{}", Value::Array(taken));
    }
    Ok(())
}

/// What `chirp restore` is asked to do.
pub enum Restore<'a> {
    /// Restore the backup in this directory.
    From(&'a Path),
    /// Drop what the last restore replaced.
    Confirm,
    /// Put back what the last restore replaced.
    Undo,
}

/// `chirp restore <service> <backup>`, `--confirm` or `--undo`.
///
/// # Errors
/// When the backup is refused (nothing is changed then), or a step fails
/// (the error says where the service was left).
pub async fn restore(data_dir: &Path, which: &str, what: Restore<'_>, json: bool) -> anyhow::Result<()> {
    let [service] = services(which)?[..] else {
        bail!("restore one service at a time");
    };
    let (ports, replicas) = replicas(data_dir, service).await?;
    let start = Instant::now();
    match what {
        Restore::Confirm => {
            step(data_dir, ports, replicas[0], "/restore/confirm").await?;
            if json {
                println!("{}", serde_json::json!({"service": service.name(), "confirmed": true}));
            } else {
                println!("{}: the data the last restore replaced is dropped", service.name());
            }
            Ok(())
        }
        Restore::Undo => {
            let done = in_maintenance(data_dir, ports, &replicas, async || {
                step(data_dir, ports, replicas[0], "/restore/undo").await
            })
            .await?;
            report(service, start, &done, json, None);
            Ok(())
        }
        Restore::From(from) => {
            let (name, copied) = hand_over(data_dir, from)?;
            let restored = restore_from(data_dir, ports, service, &replicas, &name).await;
            if let Some(copied) = copied {
                let _ = std::fs::remove_dir_all(copied);
            }
            report(service, start, &restored?, json, Some(from));
            Ok(())
        }
    }
}

async fn restore_from(
    data_dir: &Path,
    ports: Ports,
    service: Part,
    replicas: &[Instance],
    name: &str,
) -> anyhow::Result<Maintained> {
    step(data_dir, ports, replicas[0], &format!("/restore/{name}/load"))
        .await
        .context("nothing was changed")?;
    let switched = in_maintenance(data_dir, ports, replicas, async || {
        step(data_dir, ports, replicas[0], "/restore/switch").await
    })
    .await;
    // A refused switch changed nothing: drop the loaded backup. A failed
    // one may have moved part of it in; it is kept for a second try.
    if let Err(err) = &switched {
        if err.chain().any(|e| e.downcast_ref::<Refused>().is_some()) {
            let _ = step(data_dir, ports, replicas[0], "/restore/discard").await;
        }
    }
    switched.with_context(|| format!("restoring {}", service.name()))
}

/// How long one replica was NOT_SERVING.
struct Window {
    replica: String,
    not_serving: Duration,
    /// When it was seen serving again.
    serving_at: chrono::DateTime<chrono::Utc>,
}

/// What a step done in maintenance answered, and when the service was out.
struct Maintained {
    reply: Value,
    windows: Vec<Window>,
    /// When every replica had said NOT_SERVING.
    all_down: chrono::DateTime<chrono::Utc>,
    /// When the step done in maintenance (the switch, the undo) returned.
    done_at: chrono::DateTime<chrono::Utc>,
    /// When every replica served again.
    all_up: chrono::DateTime<chrono::Utc>,
}

/// Which process each replica of `service` is: a replica the supervisor
/// restarted comes back out of maintenance, so a change here means the
/// service is not wholly in maintenance any more.
async fn processes(data_dir: &Path, service: Part) -> anyhow::Result<Vec<(u8, Option<u32>, u32)>> {
    let reply = control::send(data_dir, "ps").await?;
    Ok(reply
        .parts
        .iter()
        .filter(|p| p.part == service)
        .map(|p| (p.replica, p.pid, p.restarts))
        .collect())
}

/// Every replica out of maintenance and serving again, as far as they
/// answer: after a refusal, nothing was replaced.
async fn all_serve_again(data_dir: &Path, ports: Ports, replicas: &[Instance]) {
    for &replica in replicas {
        let _ = status::operator_call(data_dir, ports, replica, "POST", "/maintenance/off").await;
    }
    for &replica in replicas {
        let _ = wait_health(ports, replica, true).await;
    }
}

/// Puts one replica in maintenance; it answers once the store operations
/// it had under way are done (up to ten seconds).
async fn enter(data_dir: &Path, ports: Ports, replica: Instance) -> anyhow::Result<()> {
    let (code, reply) = status::operator_request(
        data_dir,
        ports,
        replica,
        "POST",
        "/maintenance/on",
        Duration::from_secs(15),
    )
    .await?;
    let drained = serde_json::from_str::<Value>(&reply)
        .ok()
        .and_then(|r| r["drained"].as_bool());
    if code != 200 || drained != Some(true) {
        bail!(
            "{} did not finish its store operations under way within ten seconds of maintenance ({code}: {reply})",
            replica.name()
        );
    }
    wait_health(ports, replica, false).await
}

/// Puts every replica in maintenance, waits until each says NOT_SERVING,
/// runs `work`, and brings every replica back, waiting until each serves.
/// When `work` fails the replicas stay in maintenance: the store may be
/// half switched, and the error says how to go on. Anything that goes
/// wrong before `work` brings every replica back: nothing was changed.
async fn in_maintenance(
    data_dir: &Path,
    ports: Ports,
    replicas: &[Instance],
    work: impl AsyncFnOnce() -> anyhow::Result<Value>,
) -> anyhow::Result<Maintained> {
    let service = replicas[0].part;
    let before = processes(data_dir, service).await?;
    let mut since = Vec::new();
    for &replica in replicas {
        if let Err(err) = enter(data_dir, ports, replica).await {
            all_serve_again(data_dir, ports, replicas).await;
            return Err(err.context("nothing was changed"));
        }
        since.push(Instant::now());
    }
    if processes(data_dir, service).await? != before {
        all_serve_again(data_dir, ports, replicas).await;
        bail!(
            "a replica of {} restarted while the others went into maintenance; nothing was changed, try again",
            service.name()
        );
    }
    let all_down = chrono::Utc::now();
    let reply = match work().await {
        Ok(reply) => reply,
        Err(err) => {
            if err.downcast_ref::<Refused>().is_some() {
                all_serve_again(data_dir, ports, replicas).await;
                return Err(err.context("nothing was changed"));
            }
            return Err(err.context(format!(
                "{service} stays in maintenance (NOT_SERVING); fix the cause, then `chirp restore {service} \
                 --undo` to go back to the data before the restore, or `chirp maintenance {service} off` to \
                 serve what the store holds now",
                service = service.name()
            )));
        }
    };
    let done_at = chrono::Utc::now();
    let restarted = processes(data_dir, service).await? != before;
    for &replica in replicas {
        status::operator_call(data_dir, ports, replica, "POST", "/maintenance/off").await?;
    }
    let mut windows = Vec::new();
    for (&replica, since) in replicas.iter().zip(since) {
        wait_health(ports, replica, true).await?;
        windows.push(Window {
            replica: replica.name(),
            not_serving: since.elapsed(),
            serving_at: chrono::Utc::now(),
        });
    }
    if restarted {
        bail!(
            "a replica of {service} restarted during the switch and may have served out of maintenance: \
             check its data; `chirp restore {service} --undo` puts back what was replaced",
            service = service.name()
        );
    }
    Ok(Maintained {
        reply,
        windows,
        all_down,
        done_at,
        all_up: chrono::Utc::now(),
    })
}

/// The backup's name in the services' `BACKUP_DIR`, copying it there
/// (and returning the copy, to remove after) when it is elsewhere.
fn hand_over(data_dir: &Path, from: &Path) -> anyhow::Result<(String, Option<PathBuf>)> {
    let root = backup_dir(data_dir);
    let from = from
        .canonicalize()
        .with_context(|| format!("{} is not a backup directory", from.display()))?;
    if let (Some(parent), Some(name)) = (from.parent(), from.file_name().and_then(|n| n.to_str())) {
        if root.canonicalize().is_ok_and(|r| r == parent) && service_kit::maintenance::plain_name(name).is_ok() {
            return Ok((name.to_owned(), None));
        }
    }
    let name = format!("incoming-{}", chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"));
    let copy = root.join(&name);
    copy::copy_backup(&from, &copy)?;
    Ok((name, Some(copy)))
}

fn stamp(at: chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn report(service: Part, start: Instant, done: &Maintained, json: bool, from: Option<&Path>) {
    let took = start.elapsed();
    let (reply, windows) = (&done.reply, &done.windows);
    if json {
        let windows: Vec<Value> = windows
            .iter()
            .map(|w| {
                serde_json::json!({"replica": w.replica, "not_serving_seconds": w.not_serving.as_secs_f64(),
                                   "serving_at": stamp(w.serving_at)})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"service": service.name(), "seconds": took.as_secs_f64(),
                               "before": reply["before"]["counts"], "after": reply["after"]["counts"],
                               "backup": reply["backup"]["counts"], "replicas": windows,
                               "all_not_serving_at": stamp(done.all_down), "switched_at": stamp(done.done_at),
                               "all_serving_at": stamp(done.all_up)})
        );
        return;
    }
    match from {
        Some(from) => println!(
            "{} restored from {} in {:.2} s\n  before:    {}\n  backup:    {}\n  after:     {}",
            service.name(),
            from.display(),
            took.as_secs_f64(),
            counts_text(&reply["before"]["counts"]),
            counts_text(&reply["backup"]["counts"]),
            counts_text(&reply["after"]["counts"])
        ),
        None => println!(
            "{}: the last restore is undone in {:.2} s\n  now:       {}",
            service.name(),
            took.as_secs_f64(),
            counts_text(&reply["after"]["counts"])
        ),
    }
    for window in windows {
        println!(
            "  {}: NOT_SERVING for {:.2} s",
            window.replica,
            window.not_serving.as_secs_f64()
        );
    }
    if from.is_some() {
        println!(
            "  the replaced data is kept: `chirp restore {service} --confirm` drops it, `chirp restore {service} --undo` puts it back",
            service = service.name()
        );
        println!(
            "  events: what waited in the outbox at {} is sent again (consumers deduplicate by event id); \
             events written since then are gone with the writes that made them, and what other services \
             applied from them stays applied",
            reply["backup"]["created_at"].as_str().unwrap_or("the backup moment")
        );
    }
}

/// `chirp maintenance <service> on|off`: by hand, for a restore that
/// stopped halfway or for work of one's own on a store. Every replica.
///
/// # Errors
/// When a replica cannot be asked.
pub async fn switch(data_dir: &Path, which: &str, on: bool) -> anyhow::Result<()> {
    let [service] = services(which)?[..] else {
        bail!("one service at a time");
    };
    let (ports, replicas) = replicas(data_dir, service).await?;
    let path = if on { "/maintenance/on" } else { "/maintenance/off" };
    for replica in replicas {
        status::operator_call(data_dir, ports, replica, "POST", path).await?;
        println!("{} maintenance {}", replica.name(), if on { "on" } else { "off" });
    }
    Ok(())
}

/// Waits (up to a minute) for a replica's API to say `serving`, looking
/// every 20 ms: the time a replica is NOT_SERVING is read from here.
async fn wait_health(ports: Ports, at: Instance, serving: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while status::health(ports, at).await != Some(serving) {
        if Instant::now() > deadline {
            bail!(
                "{} is not {} after a minute",
                at.name(),
                if serving { "SERVING" } else { "NOT_SERVING" }
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
