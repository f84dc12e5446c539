//! The catalog's row types and paging.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{CatalogError, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};

/// Where a zoo model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSource {
    /// Trained by the zoo builder.
    Built,
    /// A user's checkpoint.
    Ingested,
}

impl ModelSource {
    /// Its name in the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Built => "built",
            Self::Ingested => "ingested",
        }
    }

    pub(crate) fn parse(text: &str, id: &str) -> Result<Self, CatalogError> {
        match text {
            "built" => Ok(Self::Built),
            "ingested" => Ok(Self::Ingested),
            other => Err(CatalogError::Corrupt {
                id: id.to_owned(),
                reason: format!("unknown source {other:?}"),
            }),
        }
    }
}

/// A zoo model: its task, training and metrics, and the stored file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZooModelRecord {
    /// Unique id.
    pub id: String,
    /// The zoo it belongs to.
    pub zoo: String,
    /// Its architecture's name.
    pub architecture: String,
    /// Task family ("" for users' models without one).
    pub family: String,
    /// Built or ingested.
    pub source: ModelSource,
    /// The task descriptor, as the featurizer wrote it.
    pub task: serde_json::Value,
    /// Training seed (0 when unknown).
    pub seed: u64,
    /// Final metrics, e.g. "test_accuracy".
    pub metrics: BTreeMap<String, f64>,
    /// Training configuration.
    pub training_config: serde_json::Value,
    /// Lowercase hex SHA-256 of the safetensors file.
    pub sha256: String,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// When the row was added (set by the catalog).
    pub created_at_ms: i64,
}

/// What `insert_zoo_model` did.
#[derive(Debug, Clone, PartialEq)]
pub struct InsertedModel {
    /// The stored row (the existing one when deduplicated).
    pub model: ZooModelRecord,
    /// True when an identical file was already stored.
    pub deduplicated: bool,
}

/// A training snapshot of a zoo model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The model.
    pub model_id: String,
    /// Epoch (or step) it was taken at.
    pub epoch: u64,
    /// Blob hash.
    pub sha256: String,
    /// Size in bytes.
    pub size_bytes: u64,
}

/// Filters of a zoo model listing (all optional).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ZooModelFilter {
    /// Only this zoo.
    pub zoo: Option<String>,
    /// Only this architecture.
    pub architecture: Option<String>,
    /// Only this family.
    pub family: Option<String>,
}

/// A page request: size (0 = default) and the token of the previous page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PageRequest {
    /// Rows wanted (at most [`MAX_PAGE_SIZE`]).
    pub size: u32,
    /// `next_token` of the previous page; empty for the first.
    pub token: String,
}

/// Where a page starts: rows strictly after (created_at_ms, id) in
/// newest-first order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Cursor {
    pub created_at_ms: i64,
    pub id: String,
}

impl PageRequest {
    /// The first page of `size` rows.
    pub fn first(size: u32) -> Self {
        Self {
            size,
            token: String::new(),
        }
    }

    /// The validated page size.
    pub(crate) fn limit(&self) -> Result<i64, CatalogError> {
        match self.size {
            0 => Ok(i64::from(DEFAULT_PAGE_SIZE)),
            // Larger sizes are clamped, as the proto documents.
            n => Ok(i64::from(n.min(MAX_PAGE_SIZE))),
        }
    }

    /// The decoded token ("" = from the start).
    pub(crate) fn cursor(&self) -> Result<Option<Cursor>, CatalogError> {
        if self.token.is_empty() {
            return Ok(None);
        }
        let invalid = || CatalogError::InvalidArgument {
            field: "page_token",
            reason: format!("{:?} is not a token this server issued", self.token),
        };
        let (ms, id) = self.token.split_once('.').ok_or_else(invalid)?;
        let created_at_ms = ms.parse::<i64>().map_err(|_| invalid())?;
        let id = hex_decode(id).ok_or_else(invalid)?;
        Ok(Some(Cursor { created_at_ms, id }))
    }
}

impl Cursor {
    /// The token that resumes after this row.
    pub(crate) fn token(&self) -> String {
        let hex: String = self.id.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{}.{hex}", self.created_at_ms)
    }
}

fn hex_decode(text: &str) -> Option<String> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// One page of rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// The rows.
    pub items: Vec<T>,
    /// Token of the next page; empty on the last.
    pub next_token: String,
    /// Rows matching the filters in all.
    pub total: u64,
}

impl<T> Page<T> {
    /// The same page with each row transformed.
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            items: self.items.into_iter().map(f).collect(),
            next_token: self.next_token,
            total: self.total,
        }
    }

    /// Keeps the leading rows whose `size`s add up to at most `budget` bytes
    /// (always at least one row); when rows are cut, the next token resumes
    /// after the last row kept (`key`: its creation time and id), so paging
    /// still visits every row once.
    pub fn fit_bytes(
        mut self,
        budget: usize,
        size: impl Fn(&T) -> usize,
        key: impl Fn(&T) -> (i64, &str),
    ) -> Self {
        let mut used = 0usize;
        let keep = self
            .items
            .iter()
            .take_while(|item| {
                used = used.saturating_add(size(item));
                used <= budget
            })
            .count()
            .max(1);
        if keep < self.items.len() {
            self.items.truncate(keep);
            let (created_at_ms, id) = key(&self.items[keep - 1]);
            self.next_token = Cursor {
                created_at_ms,
                id: id.to_owned(),
            }
            .token();
        }
        self
    }
}

/// A zoo's build plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZooPlan {
    /// Unique zoo name.
    pub name: String,
    /// Task family.
    pub family: String,
    /// Architecture of every model.
    pub architecture: String,
    /// Build configuration (shared init, epochs, …).
    pub config: serde_json::Value,
    /// Number of models.
    pub num_models: u64,
}

/// A unit of zoo building: one model to train.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkUnit {
    /// The zoo.
    pub zoo: String,
    /// Index in the zoo.
    pub unit: u64,
    /// What to build (task, seed).
    pub spec: serde_json::Value,
    /// Claims so far, this one included.
    pub attempts: u64,
}

/// Build progress of a zoo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZooProgress {
    /// Units in all.
    pub total: u64,
    /// Units with a model.
    pub done: u64,
    /// Units a worker holds.
    pub claimed: u64,
    /// Units nobody holds yet.
    pub pending: u64,
}

/// A denoiser version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DenoiserRecord {
    /// Unique id.
    pub id: String,
    /// Architecture it generates.
    pub architecture: String,
    /// Blob hash of its checkpoint.
    pub sha256: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Its configuration.
    pub config: serde_json::Value,
    /// Training summary.
    pub summary: BTreeMap<String, f64>,
    /// Whether it serves its architecture.
    pub active: bool,
    /// When it was added (set by the catalog).
    pub created_at_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_name_the_field() {
        let cursor = Cursor {
            created_at_ms: 1_700_000_000_123,
            id: "zoo/7.é".into(),
        };
        let page = PageRequest {
            size: 5,
            token: cursor.token(),
        };
        assert_eq!(page.cursor().unwrap(), Some(cursor));
        for bad in ["x", "12.zz", "12.abc", "notanumber.00"] {
            let page = PageRequest {
                size: 5,
                token: bad.into(),
            };
            let err = page.cursor().unwrap_err().to_string();
            assert!(err.starts_with("page_token:"), "{err}");
        }
        assert_eq!(
            PageRequest::first(MAX_PAGE_SIZE + 1).limit().unwrap(),
            i64::from(MAX_PAGE_SIZE)
        );
        // A page cut to its byte budget resumes after its last row.
        let page = Page {
            items: vec![(3, "c"), (2, "b"), (1, "a")],
            next_token: String::new(),
            total: 3,
        };
        let cut = page.clone().fit_bytes(25, |_| 10, |&(ms, id)| (ms, id));
        assert_eq!(cut.items, [(3, "c"), (2, "b")]);
        let resume = PageRequest {
            size: 10,
            token: cut.next_token,
        };
        assert_eq!(
            resume.cursor().unwrap(),
            Some(Cursor {
                created_at_ms: 2,
                id: "b".into()
            })
        );
        assert_eq!(
            page.clone()
                .fit_bytes(5, |_| 10, |&(ms, id)| (ms, id))
                .items
                .len(),
            1
        );
        assert_eq!(
            page.fit_bytes(30, |_| 10, |&(ms, id)| (ms, id)).next_token,
            ""
        );
        assert_eq!(PageRequest::first(0).limit().unwrap(), 100);
    }
}
