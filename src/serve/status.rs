//! Library errors as gRPC statuses: the edge where typed errors meet the wire.

use tonic::Status;

use crate::catalog::CatalogError;

/// The status a catalog error maps to: the field and reason for bad input,
/// NOT_FOUND / FAILED_PRECONDITION for missing or contended rows, and
/// INTERNAL / UNAVAILABLE for the store itself (logged, not leaked).
pub fn catalog_status(error: CatalogError) -> Status {
    match error {
        CatalogError::NotFound { .. } => Status::not_found(error.to_string()),
        CatalogError::InvalidArgument { .. } => Status::invalid_argument(error.to_string()),
        CatalogError::Conflict(_) => Status::failed_precondition(error.to_string()),
        CatalogError::Corrupt { .. } => {
            tracing::error!(%error, "corrupt catalog row");
            Status::internal(error.to_string())
        }
        other => {
            tracing::error!(error = %other, "catalog unavailable");
            Status::unavailable("the catalog is unavailable; retry later")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_names_the_field() {
        let s = catalog_status(CatalogError::InvalidArgument {
            field: "page_size",
            reason: "too big".into(),
        });
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "page_size: too big");
        let s = catalog_status(CatalogError::NotFound {
            what: "job",
            id: "j1".into(),
        });
        assert_eq!(s.code(), tonic::Code::NotFound);
    }
}
