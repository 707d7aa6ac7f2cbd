//! The workspace's only build script: every generated type comes from here, so
//! all services agree on one compiled contract.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "chirp/user/v1/user.proto",
    "chirp/message/v1/message.proto",
    "chirp/message/v2/message.proto",
    "chirp/comment/v1/comment.proto",
    "chirp/analytics/v1/analytics.proto",
    "chirp/events/v1/events.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("chirp_descriptor.bin"))
        .compile_protos(PROTOS, &["."])?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
