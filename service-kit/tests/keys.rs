//! Token keys as a verifying service holds them: fetched from user-service
//! under concurrency, rotated, retired, and never taken from the network
//! when the service was given key files.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use chirp_proto::user::v1::{self as pb, user_service_server::UserServiceServer};
use service_kit::{
    auth::{AuthError, Caller, KeyRefresh, PublicKey, Role, TokenSigner, TokenVerifier},
    client::DEFAULT_CALL_TIMEOUT,
};
use test_support::grpc::{not_faked, serve_fake, Behaviour};
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// user-service as a verifier sees it: the keys it publishes, slowly, so
/// that concurrent first requests really overlap the fetch.
#[derive(Clone, Default)]
struct FakeKeys {
    behaviour: Arc<Behaviour>,
    keys: Arc<Mutex<Vec<PublicKey>>>,
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl pb::user_service_server::UserService for FakeKeys {
    async fn get_public_keys(&self, _: Request<pb::GetPublicKeysRequest>) -> R<pb::GetPublicKeysResponse> {
        self.behaviour.enter("GetPublicKeys").await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(Response::new(pb::GetPublicKeysResponse {
            keys: self
                .keys
                .lock()
                .unwrap()
                .iter()
                .map(|k| pb::PublicKey {
                    key_id: k.key_id.clone(),
                    algorithm: "EdDSA".into(),
                    public_key: k.bytes.to_vec(),
                })
                .collect(),
        }))
    }
    async fn register(&self, _: Request<pb::RegisterRequest>) -> R<pb::RegisterResponse> {
        Err(not_faked())
    }
    async fn login(&self, _: Request<pb::LoginRequest>) -> R<pb::LoginResponse> {
        Err(not_faked())
    }
    async fn get_user(&self, _: Request<pb::GetUserRequest>) -> R<pb::GetUserResponse> {
        Err(not_faked())
    }
    async fn batch_get_users(&self, _: Request<pb::BatchGetUsersRequest>) -> R<pb::BatchGetUsersResponse> {
        Err(not_faked())
    }
    async fn follow(&self, _: Request<pb::FollowRequest>) -> R<pb::FollowResponse> {
        Err(not_faked())
    }
    async fn unfollow(&self, _: Request<pb::UnfollowRequest>) -> R<pb::UnfollowResponse> {
        Err(not_faked())
    }
    async fn list_following(&self, _: Request<pb::ListFollowingRequest>) -> R<pb::ListFollowingResponse> {
        Err(not_faked())
    }
    async fn list_followers(&self, _: Request<pb::ListFollowersRequest>) -> R<pb::ListFollowersResponse> {
        Err(not_faked())
    }
    async fn set_role(&self, _: Request<pb::SetRoleRequest>) -> R<pb::SetRoleResponse> {
        Err(not_faked())
    }
    async fn ban_user(&self, _: Request<pb::BanUserRequest>) -> R<pb::BanUserResponse> {
        Err(not_faked())
    }
    async fn unban_user(&self, _: Request<pb::UnbanUserRequest>) -> R<pb::UnbanUserResponse> {
        Err(not_faked())
    }
    async fn delete_user(&self, _: Request<pb::DeleteUserRequest>) -> R<pb::DeleteUserResponse> {
        Err(not_faked())
    }
    async fn change_password(&self, _: Request<pb::ChangePasswordRequest>) -> R<pb::ChangePasswordResponse> {
        Err(not_faked())
    }
    async fn list_revocations(&self, _: Request<pb::ListRevocationsRequest>) -> R<pb::ListRevocationsResponse> {
        Err(not_faked())
    }
}

async fn fake(keys: &[PublicKey]) -> (FakeKeys, Arc<service_kit::client::Peer>) {
    let fake = FakeKeys::default();
    *fake.keys.lock().unwrap() = keys.to_vec();
    let addr = serve_fake(UserServiceServer::new(fake.clone())).await;
    let peer = service_kit::client::peer("user-service", &format!("http://{addr}"), DEFAULT_CALL_TIMEOUT).unwrap();
    (fake, peer)
}

fn signer() -> TokenSigner {
    TokenSigner::generate(Duration::from_secs(600)).unwrap()
}

fn token(signer: &TokenSigner, role: Role) -> String {
    let caller = Caller {
        user_id: Uuid::new_v4(),
        role,
    };
    signer.issue(caller, chrono::Utc::now().timestamp()).unwrap().0
}

/// `n` verifications of `token` at once; how many failed, and how.
async fn burst(verifier: &Arc<TokenVerifier>, token: &str, n: usize) -> Vec<AuthError> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let verifier = verifier.clone();
            let token = token.to_owned();
            tokio::spawn(async move { verifier.verify(&token).await })
        })
        .collect();
    let mut failures = Vec::new();
    for task in tasks {
        if let Err(err) = task.await.unwrap() {
            failures.push(err);
        }
    }
    failures
}

#[tokio::test]
async fn sixty_four_concurrent_first_requests_all_verify_after_a_start_and_after_a_rotation() {
    let old = signer();
    let (fake, peer) = fake(&[old.public_key()]).await;
    let verifier = Arc::new(TokenVerifier::from_user_service_with(
        peer,
        KeyRefresh {
            min_interval: Duration::from_millis(100),
            max_age: Duration::from_secs(300),
        },
    ));

    // A fresh service: no key yet, 64 requests at once.
    let failures = burst(&verifier, &token(&old, Role::User), 64).await;
    assert!(failures.is_empty(), "after a start: {failures:?}");
    assert_eq!(fake.behaviour.calls("GetPublicKeys"), 1, "one fetch served them all");

    // user-service rotates: a new key signs, the old one still verifies.
    let new = signer();
    *fake.keys.lock().unwrap() = vec![new.public_key(), old.public_key()];
    tokio::time::sleep(Duration::from_millis(150)).await;
    let failures = burst(&verifier, &token(&new, Role::User), 64).await;
    assert!(failures.is_empty(), "after a rotation: {failures:?}");
    assert_eq!(fake.behaviour.calls("GetPublicKeys"), 2);
    assert!(verifier.verify(&token(&old, Role::User)).await.is_ok());
}

#[tokio::test]
async fn a_key_user_service_no_longer_publishes_stops_verifying_after_the_refresh_age() {
    let (old, new) = (signer(), signer());
    let (fake, peer) = fake(&[new.public_key(), old.public_key()]).await;
    let max_age = Duration::from_millis(300);
    let verifier = TokenVerifier::from_user_service_with(
        peer,
        KeyRefresh {
            min_interval: Duration::from_millis(100),
            max_age,
        },
    );
    let old_token = token(&old, Role::User);
    assert!(verifier.verify(&old_token).await.is_ok());

    // The old key is retired.
    *fake.keys.lock().unwrap() = vec![new.public_key()];
    tokio::time::sleep(max_age + Duration::from_millis(50)).await;
    assert!(
        matches!(verifier.verify(&old_token).await, Err(AuthError::UnknownKey)),
        "a retired key is refused once the keys were refreshed"
    );
    assert!(verifier.verify(&token(&new, Role::User)).await.is_ok());
}

#[tokio::test]
async fn a_spoofed_key_source_cannot_plant_a_key_in_a_service_given_key_files() {
    let real = signer();
    let attacker = signer();
    // The "user-service" on the network is the attacker's, publishing their
    // key; the service was deployed with the real key's file.
    let (fake, peer) = fake(&[attacker.public_key()]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwt-public.pem");
    std::fs::write(&file, real.public_key_pem().unwrap()).unwrap();
    let verifier = TokenVerifier::configured(&[file], peer).unwrap();

    let forged_admin = token(&attacker, Role::Admin);
    assert!(matches!(
        verifier.verify(&forged_admin).await,
        Err(AuthError::UnknownKey)
    ));
    assert_eq!(fake.behaviour.calls("GetPublicKeys"), 0, "the network was never asked");
    assert!(verifier.verify(&token(&real, Role::Admin)).await.is_ok());
}

#[tokio::test]
async fn a_service_token_is_not_a_user_and_a_user_token_is_not_a_service() {
    let signer = signer();
    let verifier = TokenVerifier::with_keys(&[signer.public_key()]);
    let service = signer
        .service_token(chrono::Utc::now().timestamp(), Duration::from_secs(60))
        .unwrap();
    assert!(matches!(verifier.verify(&service).await, Err(AuthError::WrongKind)));
    let admin = token(&signer, Role::Admin);
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert("authorization", format!("Bearer {admin}").parse().unwrap());
    assert!(matches!(
        verifier.authenticate_service(&metadata).await,
        Err(AuthError::WrongKind)
    ));
    metadata.insert("authorization", format!("Bearer {service}").parse().unwrap());
    assert!(verifier.authenticate_service(&metadata).await.is_ok());
}

#[tokio::test]
async fn a_key_file_may_hold_the_current_and_a_retired_key() {
    let (current, retired) = (signer(), signer());
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("current.pem"), dir.path().join("retired.pem"));
    std::fs::write(&a, current.public_key_pem().unwrap()).unwrap();
    std::fs::write(&b, retired.public_key_pem().unwrap()).unwrap();
    let verifier = TokenVerifier::from_pem_files(&[a, b]).unwrap();
    assert!(verifier.verify(&token(&current, Role::User)).await.is_ok());
    assert!(verifier.verify(&token(&retired, Role::User)).await.is_ok());
}
