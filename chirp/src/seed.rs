//! Demo data for a new mesh: users with roles, follows, messages, comments.

use chirp_proto::{
    comment::v1::{comment_service_client::CommentServiceClient, AddCommentRequest},
    message::v1::{message_service_client::MessageServiceClient, PostMessageRequest},
    user::v1::{self as upb, user_service_client::UserServiceClient},
};
use tonic::transport::Channel;

use crate::{
    layout::{Part, Ports},
    up::{ADMIN, ADMIN_PASSWORD, DEMO_PASSWORD},
};

fn channel(ports: Ports, part: Part) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(ports.url(part))?.connect_lazy())
}

fn authed<T>(message: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

/// Writes the demo data through the public APIs, as a user would.
///
/// # Errors
/// When a service refuses.
pub async fn seed(ports: Ports) -> anyhow::Result<()> {
    let mut users = UserServiceClient::new(channel(ports, Part::UserService)?);
    let mut messages = MessageServiceClient::new(channel(ports, Part::MessageService)?);
    let mut comments = CommentServiceClient::new(channel(ports, Part::CommentService)?);
    let login = |username: &str, password: &str| upb::LoginRequest {
        username: username.into(),
        password: password.into(),
    };

    let mut ids = Vec::new();
    let mut tokens = Vec::new();
    for (name, display) in [
        ("alice", "Alice Liddell"),
        ("bob", "Bob the Builder"),
        ("carol", "Carol Danvers"),
    ] {
        let user = users
            .register(upb::RegisterRequest {
                username: name.into(),
                password: DEMO_PASSWORD.into(),
                display_name: display.into(),
            })
            .await?
            .into_inner()
            .user
            .ok_or_else(|| anyhow::anyhow!("no user in the reply"))?;
        ids.push(user.id);
    }
    let admin = users
        .login(login(ADMIN, ADMIN_PASSWORD))
        .await?
        .into_inner()
        .access_token;
    users
        .set_role(authed(
            upb::SetRoleRequest {
                user_id: ids[2].clone(),
                role: upb::Role::Moderator.into(),
            },
            &admin,
        )?)
        .await?;
    for name in ["alice", "bob", "carol"] {
        tokens.push(users.login(login(name, DEMO_PASSWORD)).await?.into_inner().access_token);
    }
    for (who, whom) in [(0, 1), (0, 2), (1, 0), (2, 0)] {
        users
            .follow(authed(
                upb::FollowRequest {
                    user_id: ids[whom].clone(),
                },
                &tokens[who],
            )?)
            .await?;
    }
    let posts = [
        (
            0,
            "Curiouser and curiouser! Chirp keeps each service's data in its own store.",
        ),
        (1, "Can we fix it? Yes: stop a store and watch only its owner degrade."),
        (
            2,
            "Moderating with a ban: comments purged, messages hidden, even if a service is down.",
        ),
        (
            0,
            "Timestamps are Unix seconds in v1 and RFC 3339 in v2, from one collection.",
        ),
    ];
    let mut posted = Vec::new();
    for (who, body) in posts {
        let message = messages
            .post_message(authed(PostMessageRequest { body: body.into() }, &tokens[who])?)
            .await?
            .into_inner()
            .message
            .ok_or_else(|| anyhow::anyhow!("no message in the reply"))?;
        posted.push(message.id);
    }
    for (who, on, body) in [
        (1, 0, "Welcome to Chirp!"),
        (2, 0, "Nice."),
        (0, 1, "Can we? Yes we can."),
    ] {
        comments
            .add_comment(authed(
                AddCommentRequest {
                    message_id: posted[on].clone(),
                    body: body.into(),
                },
                &tokens[who],
            )?)
            .await?;
    }
    println!("[chirp] demo data written: 3 users (+ admin), 4 follows, 4 messages, 3 comments");
    Ok(())
}
