//! user-service's authorization matrix: every RPC, called by every kind of
//! caller, on accounts of every rank. Roles and standing are read from the
//! database, so each signed-in caller and each target is a fresh account
//! with the role it stands for.

mod common;

use chirp_proto::user::v1 as pb;
use common::{authed, TestApp, PASSWORD};
use service_kit::auth::Role;
use test_support::authz::{assert_matrix, cell, CALLERS};
use test_support::grpc::as_caller;
use tonic::Status;

/// Whose account a row acts on.
#[derive(Clone, Copy)]
enum Target {
    /// A fresh account with this role.
    Fresh(Role),
    /// A fresh account with this role, banned by the admin.
    Banned(Role),
    /// The caller's own account (for the unsigned columns, a fresh user).
    Own,
}

#[derive(Clone, Copy)]
enum Rpc {
    GetUser,
    Follow,
    Unfollow,
    SetRole,
    BanUser,
    UnbanUser,
    DeleteUser,
    ChangePassword,
    ListRevocations,
}

fn pb_role(role: Role) -> pb::Role {
    match role {
        Role::User => pb::Role::User,
        Role::Moderator => pb::Role::Moderator,
        Role::Admin => pb::Role::Admin,
    }
}

/// A fresh account with `role`, made by the configured admin; its id and a
/// token issued after its role was set (so not void by the change).
async fn fresh(app: &TestApp, role: Role) -> (String, String) {
    let name = format!("u{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let user = app.register(&name).await;
    if role != Role::User {
        app.client()
            .set_role(authed(
                pb::SetRoleRequest {
                    user_id: user.id.clone(),
                    role: pb_role(role).into(),
                },
                &app.admin_token().await,
            ))
            .await
            .expect("the admin sets the role");
    }
    (user.id, app.login_as(&name, PASSWORD).await)
}

async fn call(app: &TestApp, rpc: Rpc, token: Option<&str>, target: &str) -> Result<(), Status> {
    let mut client = app.client();
    let user_id = target.to_owned();
    match rpc {
        Rpc::GetUser => client
            .get_user(as_caller(pb::GetUserRequest { user_id }, token))
            .await
            .map(|_| ()),
        Rpc::Follow => client
            .follow(as_caller(pb::FollowRequest { user_id }, token))
            .await
            .map(|_| ()),
        Rpc::Unfollow => client
            .unfollow(as_caller(pb::UnfollowRequest { user_id }, token))
            .await
            .map(|_| ()),
        Rpc::SetRole => client
            .set_role(as_caller(
                pb::SetRoleRequest {
                    user_id,
                    role: pb::Role::Moderator.into(),
                },
                token,
            ))
            .await
            .map(|_| ()),
        Rpc::BanUser => client
            .ban_user(as_caller(
                pb::BanUserRequest {
                    user_id,
                    reason: String::new(),
                },
                token,
            ))
            .await
            .map(|_| ()),
        Rpc::UnbanUser => client
            .unban_user(as_caller(pb::UnbanUserRequest { user_id }, token))
            .await
            .map(|_| ()),
        Rpc::DeleteUser => client
            .delete_user(as_caller(pb::DeleteUserRequest { user_id }, token))
            .await
            .map(|_| ()),
        Rpc::ListRevocations => client
            .list_revocations(as_caller(pb::ListRevocationsRequest::default(), token))
            .await
            .map(|_| ()),
        Rpc::ChangePassword => client
            .change_password(as_caller(
                pb::ChangePasswordRequest {
                    current_password: PASSWORD.into(),
                    new_password: "another good passphrase".into(),
                },
                token,
            ))
            .await
            .map(|_| ()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_admits_exactly_the_callers_it_documents() {
    let app = TestApp::spawn().await;
    let (expired_of, _) = fresh(&app, Role::User).await;
    let id = |s: &str| uuid::Uuid::parse_str(s).unwrap();
    // The unsigned, expired, forged and service tokens; the signed-in
    // columns get a fresh account per cell.
    let mut fixed = service_kit::testing::matrix_tokens(&app.signer, id(&expired_of), id(&expired_of), id(&expired_of));
    fixed.truncate(CALLERS.len() - 3);
    let roles = [Role::User, Role::Moderator, Role::Admin];

    let rows: [(&str, Rpc, Target); 18] = [
        ("GetUser", Rpc::GetUser, Target::Fresh(Role::User)),
        // For Chirp's services, with the ingest token: no bearer token opens it.
        ("ListRevocations", Rpc::ListRevocations, Target::Fresh(Role::User)),
        ("Follow", Rpc::Follow, Target::Fresh(Role::User)),
        ("Unfollow", Rpc::Unfollow, Target::Fresh(Role::User)),
        ("SetRole of self", Rpc::SetRole, Target::Own),
        ("SetRole of a user", Rpc::SetRole, Target::Fresh(Role::User)),
        ("SetRole of a moderator", Rpc::SetRole, Target::Fresh(Role::Moderator)),
        ("SetRole of another admin", Rpc::SetRole, Target::Fresh(Role::Admin)),
        ("BanUser of self", Rpc::BanUser, Target::Own),
        ("BanUser of a user", Rpc::BanUser, Target::Fresh(Role::User)),
        ("BanUser of a moderator", Rpc::BanUser, Target::Fresh(Role::Moderator)),
        ("BanUser of another admin", Rpc::BanUser, Target::Fresh(Role::Admin)),
        ("UnbanUser of a user", Rpc::UnbanUser, Target::Banned(Role::User)),
        (
            "UnbanUser of a moderator",
            Rpc::UnbanUser,
            Target::Banned(Role::Moderator),
        ),
        ("DeleteUser of self", Rpc::DeleteUser, Target::Own),
        ("DeleteUser of a user", Rpc::DeleteUser, Target::Fresh(Role::User)),
        (
            "DeleteUser of another admin",
            Rpc::DeleteUser,
            Target::Fresh(Role::Admin),
        ),
        ("ChangePassword of self", Rpc::ChangePassword, Target::Own),
    ];
    let mut actual = Vec::new();
    for (name, rpc, target) in rows {
        // Accounts are made once per row and role, before the calls, so a
        // call's effect (a ban, a deletion) never touches another cell.
        let mut signed_in = Vec::new();
        for role in roles {
            signed_in.push(fresh(&app, role).await);
        }
        let mut cells = Vec::new();
        for column in 0..CALLERS.len() {
            let (token, own) = match column.checked_sub(fixed.len()) {
                None => (fixed[column].clone(), fresh(&app, Role::User).await.0),
                Some(i) => (Some(signed_in[i].1.clone()), signed_in[i].0.clone()),
            };
            let target = match target {
                Target::Own => own,
                Target::Fresh(role) => fresh(&app, role).await.0,
                Target::Banned(role) => {
                    let (target, _) = fresh(&app, role).await;
                    call(&app, Rpc::BanUser, Some(&app.admin_token().await), &target)
                        .await
                        .expect("the admin bans");
                    target
                }
            };
            cells.push(cell(&call(&app, rpc, token.as_deref(), &target).await));
        }
        actual.push((name.to_owned(), cells));
    }

    const U: &str = "UNAUTH";
    const D: &str = "DENIED";
    const OK: &str = "ok";
    assert_matrix(
        &actual,
        &[
            // no token, expired, forged, system, user, moderator, admin
            ("GetUser", [OK, OK, OK, OK, OK, OK, OK]),
            ("ListRevocations", [U, U, U, U, U, U, U]),
            ("Follow", [U, U, U, D, OK, OK, OK]),
            ("Unfollow", [U, U, U, D, OK, OK, OK]),
            ("SetRole of self", [U, U, U, D, D, D, D]),
            ("SetRole of a user", [U, U, U, D, D, D, OK]),
            ("SetRole of a moderator", [U, U, U, D, D, D, OK]),
            ("SetRole of another admin", [U, U, U, D, D, D, OK]),
            ("BanUser of self", [U, U, U, D, D, D, D]),
            ("BanUser of a user", [U, U, U, D, D, OK, OK]),
            ("BanUser of a moderator", [U, U, U, D, D, D, OK]),
            ("BanUser of another admin", [U, U, U, D, D, D, D]),
            ("UnbanUser of a user", [U, U, U, D, D, OK, OK]),
            ("UnbanUser of a moderator", [U, U, U, D, D, D, OK]),
            ("DeleteUser of self", [U, U, U, D, OK, OK, OK]),
            ("DeleteUser of a user", [U, U, U, D, D, D, OK]),
            ("DeleteUser of another admin", [U, U, U, D, D, D, OK]),
            ("ChangePassword of self", [U, U, U, D, OK, OK, OK]),
        ],
    );
}
