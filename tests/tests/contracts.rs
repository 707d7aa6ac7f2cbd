//! What each running service advertises is the compiled contract, and each
//! service's clients agree with the real providers they call.

use std::sync::Arc;

use chirp_mesh_tests::{Mesh, Service};
use chirp_proto::{comment::v1 as cpb, message::v1 as mpb};
use prost::Message as _;
use service_kit::{
    client::{Peer, PeerConfig},
    events::{Event, Payload},
    relay::Destination as _,
};
use test_support::grpc::authed;
use tonic::transport::Channel;
use tonic_reflection::pb::v1::{
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse, ServerReflectionRequest,
};

async fn reflect(channel: Channel, request: MessageRequest) -> MessageResponse {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection answers")
        .into_inner()
        .message()
        .await
        .expect("a reply")
        .and_then(|r| r.message_response)
        .expect("a reply body")
}

fn channel(mesh: &Mesh, service: Service) -> Channel {
    Channel::from_shared(format!("http://{}", mesh.addr(service)))
        .unwrap()
        .connect_lazy()
}

#[tokio::test]
async fn every_service_advertises_exactly_its_apis_as_compiled() {
    let mesh = Mesh::start().await;
    let compiled = prost_types::FileDescriptorSet::decode(chirp_proto::FILE_DESCRIPTOR_SET).unwrap();
    for (service, apis) in [
        (Service::User, vec!["chirp.user.v1.UserService"]),
        (
            Service::Message,
            vec!["chirp.message.v1.MessageService", "chirp.message.v2.MessageService"],
        ),
        (Service::Comment, vec!["chirp.comment.v1.CommentService"]),
        (Service::Analytics, vec!["chirp.analytics.v1.AnalyticsService"]),
    ] {
        let MessageResponse::ListServicesResponse(list) =
            reflect(channel(&mesh, service), MessageRequest::ListServices(String::new())).await
        else {
            panic!("not a service list");
        };
        let mut listed: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        listed.retain(|name| name.starts_with("chirp."));
        listed.sort();
        let mut want: Vec<String> = apis.iter().map(|s| (*s).to_owned()).collect();
        want.sort();
        assert_eq!(listed, want, "{service:?} advertises only its own APIs");

        for api in apis {
            let MessageResponse::FileDescriptorResponse(files) = reflect(
                channel(&mesh, service),
                MessageRequest::FileContainingSymbol(api.into()),
            )
            .await
            else {
                panic!("no file for {api}");
            };
            let served = prost_types::FileDescriptorProto::decode(files.file_descriptor_proto[0].as_slice()).unwrap();
            let built = compiled
                .file
                .iter()
                .find(|f| f.name == served.name)
                .unwrap_or_else(|| panic!("{:?} is not a compiled file", served.name));
            assert_eq!(&served, built, "{api}: what grpcurl sees is the compiled contract");
        }
    }
}

#[tokio::test]
async fn each_services_clients_agree_with_the_real_providers() {
    let mesh = Mesh::start().await;
    let (alice, alice_token) = mesh.user("alice").await;
    let (bob, bob_token) = mesh.user("bob").await;
    mesh.follow(&alice_token, &bob).await;
    let posted = mesh
        .messages_v1()
        .post_message(authed(
            mpb::PostMessageRequest {
                body: "contract".into(),
            },
            &alice_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();
    mesh.comments()
        .add_comment(authed(
            cpb::AddCommentRequest {
                message_id: posted.id.clone(),
                body: "agreed".into(),
            },
            &bob_token,
        ))
        .await
        .unwrap();
    let peer = |name, service| {
        Arc::new(Peer::connect_lazy(PeerConfig::new(name, format!("http://{}", mesh.addr(service)))).unwrap())
    };

    // message-service's clients against user- and comment-service.
    let users = message_service::clients::UserClient::new(peer("user-service", Service::User));
    let alice_id = message_service::domain::UserId::parse("id", &alice).unwrap();
    let bob_id = message_service::domain::UserId::parse("id", &bob).unwrap();
    let authors = users.authors(&[alice_id, bob_id]).await.unwrap();
    assert_eq!(authors[&alice_id].username, "alice");
    assert_eq!(authors[&bob_id].username, "bob");
    assert_eq!(users.following(alice_id).await.unwrap(), [bob_id]);
    let comments = message_service::clients::CommentClient::new(peer("comment-service", Service::Comment));
    let message_id = message_service::domain::MessageId::parse("id", &posted.id).unwrap();
    assert_eq!(comments.counts(&[message_id]).await.unwrap()[&message_id], 1);
    let (count, preview) = comments.preview(message_id, 3).await.unwrap();
    assert_eq!(
        (
            count,
            preview.len(),
            preview[0].body.as_str(),
            preview[0].author_id.as_str()
        ),
        (1, 1, "agreed", bob.as_str())
    );

    // comment-service's client against message-service.
    let messages = comment_service::clients::MessageClient::new(peer("message-service", Service::Message));
    let author = messages
        .author_of(comment_service::domain::MessageId::parse("id", &posted.id).unwrap())
        .await
        .unwrap();
    assert_eq!(author.map(|a| a.to_string()), Some(alice.clone()));
    let missing = messages
        .author_of(comment_service::domain::MessageId::parse("id", &uuid::Uuid::now_v7().to_string()).unwrap())
        .await
        .unwrap();
    assert_eq!(missing, None);

    // Every producer's relay destination against analytics-service.
    let analytics =
        service_kit::relay::Analytics::new(peer("analytics-service", Service::Analytics), mesh.ingest_token()).unwrap();
    let someone = uuid::Uuid::new_v4();
    let event = Event::new(
        "contract-test",
        Payload::MessagePosted {
            message_id: uuid::Uuid::now_v7(),
            author_id: someone,
        },
    );
    analytics.deliver(std::slice::from_ref(&event)).await.unwrap();
    analytics.deliver(&[event]).await.expect("redelivery is accepted");
    let stats = mesh
        .analytics()
        .get_user_stats(authed(
            chirp_proto::analytics::v1::GetUserStatsRequest {
                user_id: someone.to_string(),
            },
            &alice_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.message_count, 1, "delivered twice, counted once");
}
