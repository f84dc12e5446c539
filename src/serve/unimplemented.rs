//! The answer of RPCs whose logic has not landed yet.

use tonic::Status;

/// UNIMPLEMENTED naming the RPC, e.g. for `"weightgen.v1.CatalogService/ListZooModels"`.
pub fn not_yet(method: &str) -> Status {
    Status::unimplemented(format!(
        "{method} is not implemented in weightgen {} yet",
        env!("CARGO_PKG_VERSION")
    ))
}
