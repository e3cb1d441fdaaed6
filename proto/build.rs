//! Generates Rust code for Sigil's protobuf APIs with a vendored `protoc`,
//! so a plain `cargo build` needs no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        std::path::PathBuf::from("proto/sigil/node/v1/node.proto"),
        "proto/sigil/admin/v1/admin.proto".into(),
        "proto/workload.proto".into(),
        "proto/grpc/health/v1/health.proto".into(),
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(
        config,
        &protos,
        &[
            std::path::PathBuf::from("proto"),
            protoc_bin_vendored::include_path()?,
        ],
    )?;
    Ok(())
}
