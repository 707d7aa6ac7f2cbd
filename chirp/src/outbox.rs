//! `chirp outbox list|retry <service>`: the dead letters of a service's
//! outboxes, through the operator endpoints on its metrics port, opened with
//! the mesh's ingest token. A retry sends them back to the outbox; the relay
//! delivers them again, and sets aside again any its consumer still rejects.

use std::path::Path;

use anyhow::Context as _;

use crate::{control, layout::Part, status::operator_call};

pub async fn run(data_dir: &Path, action: &str, service: &str, json: bool) -> anyhow::Result<()> {
    let part = Part::parse(service)
        .filter(|p| matches!(p, Part::UserService | Part::MessageService | Part::CommentService))
        .ok_or_else(|| {
            anyhow::anyhow!("`{service}` has no outbox: one of user-service, message-service, comment-service")
        })?;
    // The running mesh knows its own ports.
    let ports = control::ports(data_dir).await?;
    let (method, path) = match action {
        "retry" => ("POST", "/outbox/retry"),
        _ => ("GET", "/outbox/dead-letters"),
    };
    let body = operator_call(data_dir, ports, part, method, path).await?;
    let reply: serde_json::Value = serde_json::from_str(&body).context("the service's answer")?;
    if json {
        println!("{reply}");
        return Ok(());
    }
    let Some(destinations) = reply.as_object() else {
        anyhow::bail!("unexpected answer: {body}");
    };
    for (destination, value) in destinations {
        if action == "retry" {
            println!("{destination}: {value} sent back to the outbox");
            continue;
        }
        let letters = value.as_array().map(Vec::as_slice).unwrap_or_default();
        println!("{destination}: {} dead letter(s)", letters.len());
        for letter in letters {
            let field = |name: &str| letter[name].as_str().unwrap_or("-").to_owned();
            println!(
                "  {:<40} {:<38} {}  {}",
                field("position"),
                field("event_id"),
                field("failed_at"),
                field("reason")
            );
        }
    }
    Ok(())
}
