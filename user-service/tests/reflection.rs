//! What grpcurl sees: reflection (v1 and v1alpha) lists and describes the
//! service, and a client that knows nothing but what reflection tells it can
//! Register, Login and GetUser with the token, speaking JSON as grpcurl does.

mod common;

use std::collections::HashSet;

use common::{TestApp, SERVICE};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
    Status,
};
use tonic_health::pb::health_check_response::ServingStatus;

/// The calls grpcurl makes, for one reflection version.
macro_rules! reflection_client {
    ($module:ident, $pb:path) => {
        mod $module {
            use prost::Message as _;
            use prost_reflect::DescriptorPool;
            use std::collections::{BTreeSet, HashSet};
            use tonic::transport::Channel;
            use $pb as pb;

            async fn ask(
                channel: &Channel,
                request: pb::server_reflection_request::MessageRequest,
            ) -> pb::server_reflection_response::MessageResponse {
                let mut client = pb::server_reflection_client::ServerReflectionClient::new(channel.clone());
                let request = pb::ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(request),
                };
                let mut replies = client
                    .server_reflection_info(tokio_stream::once(request))
                    .await
                    .expect("reflection answers")
                    .into_inner();
                replies
                    .message()
                    .await
                    .expect("a reflection reply")
                    .and_then(|r| r.message_response)
                    .expect("a reflection reply body")
            }

            pub async fn list_services(channel: &Channel) -> Vec<String> {
                match ask(
                    channel,
                    pb::server_reflection_request::MessageRequest::ListServices(String::new()),
                )
                .await
                {
                    pb::server_reflection_response::MessageResponse::ListServicesResponse(list) => {
                        list.service.into_iter().map(|s| s.name).collect()
                    }
                    other => panic!("unexpected reply {other:?}"),
                }
            }

            pub async fn file_containing_symbol(channel: &Channel, symbol: &str) -> Vec<Vec<u8>> {
                files(
                    ask(
                        channel,
                        pb::server_reflection_request::MessageRequest::FileContainingSymbol(symbol.into()),
                    )
                    .await,
                )
            }

            pub async fn file_by_filename(channel: &Channel, name: &str) -> Vec<Vec<u8>> {
                files(
                    ask(
                        channel,
                        pb::server_reflection_request::MessageRequest::FileByFilename(name.into()),
                    )
                    .await,
                )
            }

            /// Fetches the file defining `symbol` and, as grpcurl does, every file it
            /// imports, then builds a descriptor pool from them.
            pub async fn describe(channel: &Channel, symbol: &str) -> DescriptorPool {
                let mut files: Vec<prost_types::FileDescriptorProto> = file_containing_symbol(channel, symbol)
                    .await
                    .iter()
                    .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).expect("a file descriptor"))
                    .collect();
                loop {
                    let known: HashSet<String> = files.iter().map(|f| f.name().to_owned()).collect();
                    let missing: BTreeSet<String> = files
                        .iter()
                        .flat_map(|f| f.dependency.iter().cloned())
                        .filter(|d| !known.contains(d))
                        .collect();
                    if missing.is_empty() {
                        break;
                    }
                    for name in missing {
                        for bytes in file_by_filename(channel, &name).await {
                            files.push(
                                prost_types::FileDescriptorProto::decode(bytes.as_slice()).expect("a file descriptor"),
                            );
                        }
                    }
                }
                let mut pool = DescriptorPool::new();
                pool.add_file_descriptor_protos(super::dedup(files))
                    .expect("a consistent set of files");
                pool
            }

            fn files(reply: pb::server_reflection_response::MessageResponse) -> Vec<Vec<u8>> {
                match reply {
                    pb::server_reflection_response::MessageResponse::FileDescriptorResponse(files) => {
                        files.file_descriptor_proto
                    }
                    other => panic!("unexpected reply {other:?}"),
                }
            }
        }
    };
}

reflection_client!(v1, tonic_reflection::pb::v1);
reflection_client!(v1alpha, tonic_reflection::pb::v1alpha);

fn dedup(files: Vec<prost_types::FileDescriptorProto>) -> Vec<prost_types::FileDescriptorProto> {
    let mut seen = HashSet::new();
    files.into_iter().filter(|f| seen.insert(f.name().to_owned())).collect()
}

/// Encodes and decodes raw message bytes: the dynamic client's codec.
#[derive(Default)]
struct RawCodec;
struct RawCoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCoder;
    type Decoder = RawCoder;
    fn encoder(&mut self) -> RawCoder {
        RawCoder
    }
    fn decoder(&mut self) -> RawCoder {
        RawCoder
    }
}

impl Encoder for RawCoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use bytes_buf::BufMut as _;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        use bytes_buf::Buf as _;
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

mod bytes_buf {
    pub use prost::bytes::{Buf, BufMut};
}

/// Like `grpcurl -d '<json>' [-H authorization:...] addr service/method`.
async fn call_json(channel: &Channel, method: &MethodDescriptor, json: &str, token: Option<&str>) -> serde_json::Value {
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let request = DynamicMessage::deserialize(method.input(), &mut deserializer).expect("the JSON fits the request");
    let mut request = tonic::Request::new(request.encode_to_vec());
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("the channel is ready");
    let reply = grpc
        .unary(request, path.parse().unwrap(), RawCodec)
        .await
        .unwrap_or_else(|status| panic!("{path} failed: {status:?}"))
        .into_inner();
    let reply = DynamicMessage::decode(method.output(), reply.as_slice()).expect("a reply of the declared type");
    serde_json::to_value(&reply).expect("JSON")
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_the_api_health_and_reflection() {
    let app = TestApp::spawn().await;
    let expected = [
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    for services in [
        v1::list_services(&app.channel).await,
        v1alpha::list_services(&app.channel).await,
    ] {
        for name in expected {
            assert!(services.iter().any(|s| s == name), "{name} missing from {services:?}");
        }
        assert!(
            !services.iter().any(|s| s.contains("MessageService")),
            "only what this server serves is advertised: {services:?}"
        );
    }
    let alpha_file = v1alpha::file_containing_symbol(&app.channel, SERVICE).await;
    assert_eq!(alpha_file, v1::file_containing_symbol(&app.channel, SERVICE).await);
}

#[tokio::test]
async fn reflection_describes_the_service_exactly_as_compiled() {
    let app = TestApp::spawn().await;
    let pool = v1::describe(&app.channel, SERVICE).await;
    let service = pool.get_service_by_name(SERVICE).expect("the service is described");
    let methods: Vec<String> = service.methods().map(|m| m.name().to_owned()).collect();
    assert_eq!(
        methods,
        [
            "Register",
            "Login",
            "GetUser",
            "BatchGetUsers",
            "Follow",
            "Unfollow",
            "ListFollowing",
            "ListFollowers",
            "SetRole",
            "BanUser",
            "UnbanUser",
            "DeleteUser",
            "ChangePassword",
            "GetPublicKeys",
            "ListRevocations"
        ]
    );
    let compiled = DescriptorPool::decode(chirp_proto::FILE_DESCRIPTOR_SET).expect("the compiled set");
    let served = pool.get_file_by_name("chirp/user/v1/user.proto").unwrap();
    let built = compiled.get_file_by_name("chirp/user/v1/user.proto").unwrap();
    assert_eq!(served.file_descriptor_proto(), built.file_descriptor_proto());
}

#[tokio::test]
async fn a_client_knowing_only_reflection_registers_logs_in_and_reads_with_the_token() {
    let app = TestApp::spawn().await;
    for (version, pool) in [
        ("v1", v1::describe(&app.channel, SERVICE).await),
        ("v1alpha", v1alpha::describe(&app.channel, SERVICE).await),
    ] {
        register_login_and_get(&app, &pool, &format!("grpcurl_{version}")).await;
    }
}

async fn register_login_and_get(app: &TestApp, pool: &DescriptorPool, username: &str) {
    let service = pool.get_service_by_name(SERVICE).unwrap();
    let method = |name: &str| service.methods().find(|m| m.name() == name).unwrap();

    let registered = call_json(
        &app.channel,
        &method("Register"),
        &format!(r#"{{"username": "{username}", "password": "from-the-shell-1", "displayName": "Grp Curl"}}"#),
        None,
    )
    .await;
    let id = registered["user"]["id"].as_str().expect("an id").to_owned();
    assert_eq!(registered["user"]["role"], "ROLE_USER");

    let login = call_json(
        &app.channel,
        &method("Login"),
        &format!(r#"{{"username": "{username}", "password": "from-the-shell-1"}}"#),
        None,
    )
    .await;
    let token = login["accessToken"].as_str().expect("a token").to_owned();
    assert!(
        login["expireTime"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{login}"
    );

    let fetched = call_json(
        &app.channel,
        &method("GetUser"),
        &format!(r#"{{"userId": "{id}"}}"#),
        Some(&token),
    )
    .await;
    assert_eq!(fetched["user"]["displayName"], "Grp Curl");

    let followed = call_json(
        &app.channel,
        &method("ListFollowing"),
        &format!(r#"{{"userId": "{id}"}}"#),
        Some(&token),
    )
    .await;
    assert_eq!(
        followed,
        serde_json::json!({}),
        "an empty page is an empty object in JSON"
    );
}

#[tokio::test]
async fn health_reports_the_api_and_the_server_as_serving() {
    let app = TestApp::spawn().await;
    assert_eq!(app.health("").await, Some(ServingStatus::Serving));
    assert_eq!(app.health(SERVICE).await, Some(ServingStatus::Serving));
    assert_eq!(
        app.health("no.such.Service").await,
        None,
        "unknown services are NOT_FOUND"
    );
}
