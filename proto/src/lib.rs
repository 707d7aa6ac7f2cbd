//! Chirp's gRPC contracts, compiled from `proto/chirp/**.proto`.
//!
//! Only a service's `grpc` and `clients` modules (and tests) should name these
//! types; domain code converts to and from them at the edge.

#![allow(clippy::all, clippy::pedantic)]

pub mod user {
    pub mod v1 {
        tonic::include_proto!("chirp.user.v1");
    }
}

pub mod message {
    pub mod v1 {
        tonic::include_proto!("chirp.message.v1");
    }
    pub mod v2 {
        tonic::include_proto!("chirp.message.v2");
    }
}

pub mod comment {
    pub mod v1 {
        tonic::include_proto!("chirp.comment.v1");
    }
}

pub mod analytics {
    pub mod v1 {
        tonic::include_proto!("chirp.analytics.v1");
    }
}

pub mod events {
    pub mod v1 {
        tonic::include_proto!("chirp.events.v1");
    }
}

/// The encoded `FileDescriptorSet` of every Chirp proto file, for server
/// reflection: what grpcurl sees is exactly what was compiled.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("chirp_descriptor");
