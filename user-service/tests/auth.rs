//! The auth matrix: every RPC that acts for someone refuses a missing,
//! forged or expired token, and every privileged one refuses a weaker role.

mod common;

use chirp_proto::user::v1 as pb;
use common::{authed, TestApp};
use service_kit::auth::{Claims, Role, TokenSigner, ISSUER};
use tonic::{Code, Request, Status};

/// Calls the protected RPC `rpc` on `target`, as whoever `request` says.
async fn call(app: &TestApp, rpc: &str, target: &str, mut request: Request<()>) -> Status {
    let metadata = std::mem::take(request.metadata_mut());
    let mut client = app.client();
    macro_rules! send {
        ($method:ident, $message:expr) => {{
            let mut r = Request::new($message);
            *r.metadata_mut() = metadata;
            match client.$method(r).await {
                Ok(_) => Status::ok(""),
                Err(status) => status,
            }
        }};
    }
    let user_id = target.to_owned();
    match rpc {
        "Follow" => send!(follow, pb::FollowRequest { user_id }),
        "Unfollow" => send!(unfollow, pb::UnfollowRequest { user_id }),
        "SetRole" => send!(
            set_role,
            pb::SetRoleRequest {
                user_id,
                role: pb::Role::Moderator.into()
            }
        ),
        "BanUser" => send!(
            ban_user,
            pb::BanUserRequest {
                user_id,
                reason: String::new()
            }
        ),
        "UnbanUser" => send!(unban_user, pb::UnbanUserRequest { user_id }),
        "DeleteUser" => send!(delete_user, pb::DeleteUserRequest { user_id }),
        other => panic!("no such RPC {other}"),
    }
}

const PROTECTED: [&str; 6] = ["Follow", "Unfollow", "SetRole", "BanUser", "UnbanUser", "DeleteUser"];

fn with_token(token: &str) -> Request<()> {
    authed((), token)
}

#[tokio::test]
async fn protected_rpcs_refuse_missing_forged_and_expired_tokens() {
    let app = TestApp::spawn().await;
    let target = app.register("target").await;
    let (someone, _) = app.user("someone").await;

    let forger = TokenSigner::generate(std::time::Duration::from_secs(60)).unwrap();
    let now = chrono::Utc::now().timestamp();
    let admin_claims = |iat: i64, exp: i64| Claims {
        sub: someone.id.clone(),
        role: Role::Admin,
        iss: ISSUER.into(),
        iat,
        exp,
        scope: None,
    };
    let forged = forger.sign(&admin_claims(now, now + 600)).unwrap();
    let expired = app.signer.sign(&admin_claims(now - 7200, now - 3600)).unwrap();
    let tampered = {
        // A real token whose payload was swapped for one claiming admin.
        let real = app.login_as("someone", common::PASSWORD).await;
        let fake = forger.sign(&admin_claims(now, now + 600)).unwrap();
        let real: Vec<&str> = real.split('.').collect();
        let fake: Vec<&str> = fake.split('.').collect();
        format!("{}.{}.{}", real[0], fake[1], real[2])
    };

    for rpc in PROTECTED {
        let cases = [
            ("no token", Request::new(())),
            ("not a bearer token", {
                let mut r = Request::new(());
                r.metadata_mut()
                    .insert("authorization", "Basic dXNlcjpwdw==".parse().unwrap());
                r
            }),
            ("garbage", with_token("a.b.c")),
            ("another key's token", with_token(&forged)),
            ("tampered payload", with_token(&tampered)),
            ("expired", with_token(&expired)),
        ];
        for (case, request) in cases {
            let status = call(&app, rpc, &target.id, request).await;
            assert_eq!(status.code(), Code::Unauthenticated, "{rpc} with {case}: {status:?}");
        }
    }
    assert!(
        !app.client()
            .get_user(pb::GetUserRequest {
                user_id: target.id.clone()
            })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap()
            .banned
    );
}

#[tokio::test]
async fn privileged_rpcs_refuse_callers_without_the_role() {
    let app = TestApp::spawn().await;
    let (_, user_token) = app.user("plain").await;
    let (moderator, mod_token) = app.moderator("moe").await;
    let (other_mod, _) = app.moderator("max").await;
    let victim = app.register("victim").await;
    let admin_token = app.admin_token().await;
    let admin = service_kit::auth::TokenVerifier::with_keys(&[app.signer.public_key()])
        .verify(&admin_token)
        .await
        .unwrap();

    let denied = [
        ("a user setting roles", "SetRole", &user_token, victim.id.clone()),
        ("a moderator setting roles", "SetRole", &mod_token, victim.id.clone()),
        ("a user banning", "BanUser", &user_token, victim.id.clone()),
        ("a user unbanning", "UnbanUser", &user_token, victim.id.clone()),
        (
            "a moderator banning a moderator",
            "BanUser",
            &mod_token,
            other_mod.id.clone(),
        ),
        (
            "a moderator banning the admin",
            "BanUser",
            &mod_token,
            admin.user_id.to_string(),
        ),
        (
            "a moderator banning themself",
            "BanUser",
            &mod_token,
            moderator.id.clone(),
        ),
        (
            "a user deleting someone else",
            "DeleteUser",
            &user_token,
            victim.id.clone(),
        ),
        (
            "a moderator deleting someone else",
            "DeleteUser",
            &mod_token,
            victim.id.clone(),
        ),
        (
            "an admin changing their own role",
            "SetRole",
            &admin_token,
            admin.user_id.to_string(),
        ),
    ];
    for (case, rpc, token, target) in denied {
        let status = call(&app, rpc, &target, with_token(token)).await;
        assert_eq!(status.code(), Code::PermissionDenied, "{case}: {status:?}");
    }
    assert_eq!(app.user_count().await, 5, "nobody was deleted");
    let victim_now = app
        .client()
        .get_user(pb::GetUserRequest { user_id: victim.id })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(!victim_now.banned);
    assert_eq!(victim_now.role(), pb::Role::User);
}

#[tokio::test]
async fn public_reads_need_no_token() {
    let app = TestApp::spawn().await;
    let user = app.register("public").await;
    let mut client = app.client();
    client
        .get_user(pb::GetUserRequest {
            user_id: user.id.clone(),
        })
        .await
        .unwrap();
    client
        .batch_get_users(pb::BatchGetUsersRequest {
            user_ids: vec![user.id.clone()],
        })
        .await
        .unwrap();
    client
        .list_following(pb::ListFollowingRequest {
            user_id: user.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    client.get_public_keys(pb::GetPublicKeysRequest {}).await.unwrap();
}

/// Every `TokensRevoked` user-service has written to its outbox, as the
/// other services will hold them.
async fn revocations_sent(app: &TestApp) -> std::sync::Arc<service_kit::revocation::Revocations> {
    use service_kit::events::{Event, Payload};
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(&app.database_url).await.unwrap();
    let events: Vec<String> = sqlx::query_scalar("SELECT event FROM outbox ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let revocations = service_kit::revocation::Revocations::new();
    let sent = events
        .iter()
        .filter_map(|json| match Event::from_json(json).unwrap().payload {
            Payload::TokensRevoked {
                user_id,
                issued_before,
                reason,
            } => Some(service_kit::revocation::Revocation {
                user_id,
                issued_before,
                reason,
            }),
            _ => None,
        })
        .collect();
    revocations.load(sent, chrono::Utc::now());
    revocations
}

#[tokio::test]
async fn a_token_issued_between_two_revocations_in_the_same_second_dies_with_the_second() {
    // Promote, log in, demote: all within a second or so. Token `iat`s are
    // whole seconds, so the second revocation must reach past the first.
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let (carol, _) = app.user("carol").await;
    let set_role = |role: pb::Role| {
        let mut client = app.client();
        let request = authed(
            pb::SetRoleRequest {
                user_id: carol.id.clone(),
                role: role.into(),
            },
            &admin,
        );
        async move { client.set_role(request).await.expect("the admin sets the role") }
    };
    set_role(pb::Role::Admin).await;
    let promoted = app.login_as("carol", common::PASSWORD).await;
    set_role(pb::Role::User).await;

    // user-service, from its own database.
    let (victim, _) = app.user("victim").await;
    let status = call(&app, "SetRole", &victim.id, with_token(&promoted)).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // Every other service, from the revocations user-service sent them.
    let verifier = service_kit::auth::TokenVerifier::with_keys(&[app.signer.public_key()])
        .with_revocations(revocations_sent(&app).await);
    assert!(
        matches!(
            verifier.verify(&promoted).await,
            Err(service_kit::auth::AuthError::Revoked)
        ),
        "the promoted token outlived the demotion elsewhere"
    );
    // A login after the demotion is valid everywhere, as a user.
    let fresh = app.login_as("carol", common::PASSWORD).await;
    let caller = verifier.verify(&fresh).await.expect("a fresh token verifies");
    assert_eq!(caller.role, Role::User);
}

#[tokio::test]
async fn list_revocations_pages_through_every_live_revocation_for_holders_of_the_ingest_token_only() {
    let app = TestApp::spawn_on_fresh(&["--ingest-token=the-ingest-token"]).await;
    let admin = app.admin_token().await;
    let mut banned = Vec::new();
    for name in ["rev_a", "rev_b", "rev_c"] {
        let user = app.register(name).await;
        app.client()
            .ban_user(authed(
                pb::BanUserRequest {
                    user_id: user.id.clone(),
                    reason: String::new(),
                },
                &admin,
            ))
            .await
            .unwrap();
        banned.push(user.id);
    }
    let page = |token: &'static str, page_token: String| {
        let mut client = app.client();
        let mut request = Request::new(pb::ListRevocationsRequest {
            page_size: 2,
            page_token,
        });
        request
            .metadata_mut()
            .insert("x-chirp-ingest-token", token.parse().unwrap());
        async move { client.list_revocations(request).await.map(tonic::Response::into_inner) }
    };
    let status = page("not-the-token", String::new()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let first = page("the-ingest-token", String::new()).await.unwrap();
    assert_eq!(first.revocations.len(), 2);
    assert!(!first.next_page_token.is_empty());
    let second = page("the-ingest-token", first.next_page_token).await.unwrap();
    assert_eq!(second.revocations.len(), 1);
    assert!(second.next_page_token.is_empty());
    let mut listed: Vec<String> = first
        .revocations
        .iter()
        .chain(&second.revocations)
        .map(|r| r.user_id.clone())
        .collect();
    listed.sort();
    banned.sort();
    assert_eq!(listed, banned);
    assert!(first
        .revocations
        .iter()
        .all(|r| r.reason == chirp_proto::events::v1::RevocationReason::Banned as i32));
}
