//! Code generated from `proto/weightgen/v1/*.proto` (with protox, so no
//! `protoc` is needed) and the encoded descriptor set used by reflection.

/// Messages and services of the `weightgen.v1` package.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("weightgen.v1");
}

/// The encoded `FileDescriptorSet` of every weightgen proto file.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/weightgen_descriptor.bin"));

/// Fully qualified names of the weightgen services, as health and reflection
/// report them.
pub const SERVICE_NAMES: [&str; 3] = [
    v1::generation_service_server::SERVICE_NAME,
    v1::catalog_service_server::SERVICE_NAME,
    v1::job_service_server::SERVICE_NAME,
];
