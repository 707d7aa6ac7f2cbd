//! Every RPC of every service refuses a request larger than its largest
//! valid one with RESOURCE_EXHAUSTED, at once, and the service stays
//! SERVING: nobody can make a Chirp server buffer tonic's default 4 MiB.

use std::time::{Duration, Instant};

use chirp_mesh_tests::{Mesh, Service};
use prost_reflect::DescriptorPool;
use tonic::{codegen::http::uri::PathAndQuery, transport::Channel, Code};
use tonic_health::pb::health_check_response::ServingStatus;

/// Each service's limit (its `grpc::MAX_REQUEST_BYTES`) and the gRPC
/// services it serves.
fn limits() -> [(Service, usize, &'static [&'static str]); 4] {
    [
        (
            Service::User,
            user_service::grpc::MAX_REQUEST_BYTES,
            &["chirp.user.v1.UserService"],
        ),
        (
            Service::Message,
            message_service::grpc::MAX_REQUEST_BYTES,
            &["chirp.message.v1.MessageService", "chirp.message.v2.MessageService"],
        ),
        (
            Service::Comment,
            comment_service::grpc::MAX_REQUEST_BYTES,
            &["chirp.comment.v1.CommentService"],
        ),
        (
            Service::Analytics,
            analytics_service::grpc::MAX_REQUEST_BYTES,
            &["chirp.analytics.v1.AnalyticsService"],
        ),
    ]
}

/// Sends `bytes` of payload (as one protobuf bytes field, so the framing is
/// valid) to `path`; the answer's code and how long it took.
async fn send(channel: Channel, path: &str, bytes: usize) -> (Code, Duration) {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("a ready channel");
    let started = Instant::now();
    let codec = tonic_prost::ProstCodec::<Vec<u8>, ()>::default();
    let path = PathAndQuery::try_from(path.to_owned()).expect("a method path");
    let code = match grpc.unary(tonic::Request::new(vec![7u8; bytes]), path, codec).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    };
    (code, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_limit_is_refused_by_every_rpc_and_the_service_keeps_serving() {
    let mesh = Mesh::start().await;
    let pool = DescriptorPool::decode(chirp_proto::FILE_DESCRIPTOR_SET).expect("the compiled contracts");
    for (service, limit, apis) in limits() {
        let channel = Channel::from_shared(format!("http://{}", mesh.addr(service)))
            .unwrap()
            .connect_lazy();
        let mut rpcs = 0;
        for api in apis {
            let descriptor = pool.get_service_by_name(api).expect("a compiled service");
            for method in descriptor.methods() {
                let path = format!("/{api}/{}", method.name());
                let (code, took) = send(channel.clone(), &path, limit + 1).await;
                assert_eq!(code, Code::ResourceExhausted, "{path} with {} bytes", limit + 1);
                assert!(took < Duration::from_secs(1), "{path} took {took:?} to refuse");
                rpcs += 1;
            }
        }
        // Within the limit, the framing is read and the request parsed (it
        // is not a valid request, so something other than RESOURCE_EXHAUSTED).
        let api = apis[0];
        let first = pool.get_service_by_name(api).unwrap().methods().next().unwrap();
        let (code, _) = send(channel.clone(), &format!("/{api}/{}", first.name()), limit / 2).await;
        assert_ne!(
            code,
            Code::ResourceExhausted,
            "{api} refused a request within its limit"
        );
        mesh.wait_for(service, ServingStatus::Serving).await;
        println!("{service:?}: {rpcs} RPCs refuse {} bytes (limit {limit})", limit + 1);
    }
}
