//! Library errors as gRPC statuses: the edge where typed errors meet the wire.

use tonic::Status;

use crate::catalog::CatalogError;

/// Longest name or id (architecture, zoo model, denoiser, job) a request
/// may send. Error messages quote the names they refuse; a longer one is
/// refused without being quoted, so no status outgrows a client's metadata
/// limit.
pub const MAX_NAME_CHARS: usize = 256;

/// Checks a required name or id: present and at most `MAX_NAME_CHARS`.
pub fn checked_name(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field}: required")));
    }
    bounded_name(field, value)
}

/// Checks an optional name or id: at most `MAX_NAME_CHARS`.
pub fn bounded_name(field: &str, value: &str) -> Result<(), Status> {
    let chars = value.chars().count();
    if chars > MAX_NAME_CHARS {
        return Err(Status::invalid_argument(format!(
            "{field}: {chars} characters, at most {MAX_NAME_CHARS}"
        )));
    }
    Ok(())
}

/// The status a catalog error maps to: the field and reason for bad input,
/// NOT_FOUND / FAILED_PRECONDITION for missing or contended rows, and
/// INTERNAL / UNAVAILABLE for the store itself (logged, not leaked).
pub fn catalog_status(error: CatalogError) -> Status {
    match error {
        CatalogError::NotFound { .. } => Status::not_found(error.to_string()),
        CatalogError::InvalidArgument { .. } => Status::invalid_argument(error.to_string()),
        CatalogError::Conflict(_) => Status::failed_precondition(error.to_string()),
        CatalogError::Unavailable(_) => {
            tracing::warn!(%error, "catalog unavailable");
            Status::unavailable(error.to_string())
        }
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
    fn long_names_are_refused_without_being_quoted() {
        let long = "x".repeat(100_000);
        let s = checked_name("task.architecture", &long).unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "task.architecture: 100000 characters, at most 256"
        );
        assert_eq!(
            checked_name("id", "").unwrap_err().message(),
            "id: required"
        );
        assert!(checked_name("id", &"é".repeat(256)).is_ok());
        assert!(bounded_name("denoiser_id", "").is_ok());
    }

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
