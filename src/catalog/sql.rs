//! The SQL both backends run, as a macro that implements [`super::Catalog`]
//! for a type holding a `sqlx::Pool` of one concrete database. Only the
//! unit claim differs (PostgreSQL adds `FOR UPDATE SKIP LOCKED`); everything
//! else is the same text, with `$N` parameters in order of first use.

use serde::de::DeserializeOwned;

use super::records::Cursor;
use super::{CatalogError, Page};

pub(crate) const ZOO_MODEL_COLUMNS: &str = "id, zoo, architecture, family, source, task_json, seed, \
     metrics_json, training_config_json, sha256, size_bytes, created_at_ms";
pub(crate) const DENOISER_COLUMNS: &str =
    "id, architecture, sha256, size_bytes, config_json, summary_json, active, created_at_ms";

/// The claim without row locking (SQLite serializes writers).
pub(crate) const CLAIM_UNIT: &str = "UPDATE zoo_units \
     SET state = 'claimed', worker = $2, claimed_at_ms = $3, attempts = attempts + 1 \
     WHERE zoo = $1 AND unit = (SELECT unit FROM zoo_units WHERE zoo = $1 \
       AND (state = 'pending' OR (state = 'claimed' AND claimed_at_ms < $4)) \
       ORDER BY unit LIMIT 1 {LOCK}) \
     RETURNING unit, spec_json, attempts";

/// Parses a JSON column, reporting the row on failure.
pub(crate) fn parse_json<T: DeserializeOwned>(
    text: &str,
    id: &str,
    column: &str,
) -> Result<T, CatalogError> {
    serde_json::from_str(text).map_err(|e| CatalogError::Corrupt {
        id: id.to_owned(),
        reason: format!("{column}: {e}"),
    })
}

/// Checks a lowercase hex SHA-256.
pub(crate) fn check_sha256(sha256: &str) -> Result<(), CatalogError> {
    if sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(CatalogError::InvalidArgument {
            field: "sha256",
            reason: format!("{sha256:?} is not 64 lowercase hex digits"),
        })
    }
}

/// Checks that an id is usable as a key.
pub(crate) fn check_id(field: &'static str, id: &str) -> Result<(), CatalogError> {
    if id.is_empty() || id.len() > 200 || id.chars().any(char::is_control) {
        Err(CatalogError::InvalidArgument {
            field,
            reason: format!("{id:?} must be 1 to 200 printable characters"),
        })
    } else {
        Ok(())
    }
}

/// Splits `limit + 1` fetched rows into a page and its next token.
pub(crate) fn paged<T>(
    mut items: Vec<T>,
    limit: i64,
    total: i64,
    key: impl Fn(&T) -> Cursor,
) -> Page<T> {
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let next_token = match items.last() {
        Some(last) if more => key(last).token(),
        _ => String::new(),
    };
    Page {
        items,
        next_token,
        total: total as u64,
    }
}

fn json_text<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> String {
    json_text(value)
}

/// Implements `Catalog` for `$ty` (a struct with `pool: sqlx::Pool<$db>`),
/// with `$lock` appended to the claim's inner SELECT.
macro_rules! impl_catalog {
    ($ty:ty, $db:ty, backend = $backend:literal, lock = $lock:literal) => {
        use sqlx::Row as _;

        use crate::catalog::sql::{
            CLAIM_UNIT, DENOISER_COLUMNS, ZOO_MODEL_COLUMNS, check_id, check_sha256, paged,
            parse_json, to_json,
        };
        use crate::catalog::records::Cursor;
        use crate::catalog::{
            Catalog, CatalogError, DenoiserRecord, InsertedModel, ModelSource, Page, PageRequest,
            Snapshot, WorkUnit, ZooModelFilter, ZooModelRecord, ZooPlan, ZooProgress, now_ms,
        };
        use crate::weights::ArchSpec;

        type DbRow = <$db as sqlx::Database>::Row;

        fn zoo_model_from_row(row: &DbRow) -> Result<ZooModelRecord, CatalogError> {
            let id: String = row.try_get("id")?;
            Ok(ZooModelRecord {
                zoo: row.try_get("zoo")?,
                architecture: row.try_get("architecture")?,
                family: row.try_get("family")?,
                source: ModelSource::parse(&row.try_get::<String, _>("source")?, &id)?,
                task: parse_json(&row.try_get::<String, _>("task_json")?, &id, "task_json")?,
                seed: row.try_get::<i64, _>("seed")? as u64,
                metrics: parse_json(&row.try_get::<String, _>("metrics_json")?, &id, "metrics_json")?,
                training_config: parse_json(
                    &row.try_get::<String, _>("training_config_json")?,
                    &id,
                    "training_config_json",
                )?,
                sha256: row.try_get("sha256")?,
                size_bytes: row.try_get::<i64, _>("size_bytes")? as u64,
                created_at_ms: row.try_get("created_at_ms")?,
                id,
            })
        }

        fn denoiser_from_row(row: &DbRow) -> Result<DenoiserRecord, CatalogError> {
            let id: String = row.try_get("id")?;
            Ok(DenoiserRecord {
                architecture: row.try_get("architecture")?,
                sha256: row.try_get("sha256")?,
                size_bytes: row.try_get::<i64, _>("size_bytes")? as u64,
                config: parse_json(&row.try_get::<String, _>("config_json")?, &id, "config_json")?,
                summary: crate::figures::present(parse_json(&row.try_get::<String, _>("summary_json")?, &id, "summary_json")?),
                active: row.try_get("active")?,
                created_at_ms: row.try_get("created_at_ms")?,
                id,
            })
        }

        fn arch_from_row(row: &DbRow) -> Result<ArchSpec, CatalogError> {
            let name: String = row.try_get("name")?;
            parse_json(&row.try_get::<String, _>("spec_json")?, &name, "spec_json")
        }

        fn model_cursor(m: &ZooModelRecord) -> Cursor {
            Cursor { created_at_ms: m.created_at_ms, id: m.id.clone() }
        }

        fn denoiser_cursor(d: &DenoiserRecord) -> Cursor {
            Cursor { created_at_ms: d.created_at_ms, id: d.id.clone() }
        }

        fn write_error(what: &'static str, key: &str) -> impl FnOnce(sqlx::Error) -> CatalogError {
            let key = key.to_owned();
            move |e| match &e {
                sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                    CatalogError::InvalidArgument {
                        field: "architecture",
                        reason: format!("{what} {key:?} refers to an unregistered architecture or zoo"),
                    }
                }
                _ => CatalogError::from_write(e, || format!("{what} {key:?} already exists with different content")),
            }
        }

        async fn insert_model_in<'c, E>(
            executor: E,
            model: &ZooModelRecord,
        ) -> Result<u64, CatalogError>
        where
            E: sqlx::Executor<'c, Database = $db>,
        {
            let sql = format!(
                "INSERT INTO zoo_models ({ZOO_MODEL_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
                 ON CONFLICT (architecture, sha256) DO NOTHING"
            );
            Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(&model.id)
                .bind(&model.zoo)
                .bind(&model.architecture)
                .bind(&model.family)
                .bind(model.source.as_str())
                .bind(to_json(&model.task))
                .bind(model.seed as i64)
                .bind(to_json(&model.metrics))
                .bind(to_json(&model.training_config))
                .bind(&model.sha256)
                .bind(model.size_bytes as i64)
                .bind(model.created_at_ms)
                .execute(executor)
                .await
                .map_err(write_error("zoo model", &model.id))?
                .rows_affected())
        }

        async fn model_by_file<'c, E>(
            executor: E,
            architecture: &str,
            sha256: &str,
        ) -> Result<ZooModelRecord, CatalogError>
        where
            E: sqlx::Executor<'c, Database = $db>,
        {
            let sql = format!(
                "SELECT {ZOO_MODEL_COLUMNS} FROM zoo_models WHERE architecture = $1 AND sha256 = $2"
            );
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(architecture)
                .bind(sha256)
                .fetch_one(executor)
                .await?;
            zoo_model_from_row(&row)
        }

        fn validate_model(model: &ZooModelRecord) -> Result<ZooModelRecord, CatalogError> {
            check_id("id", &model.id)?;
            check_id("zoo", &model.zoo)?;
            check_sha256(&model.sha256)?;
            if let Some((name, value)) = model.metrics.iter().find(|(_, v)| !v.is_finite()) {
                return Err(CatalogError::InvalidArgument {
                    field: "metrics",
                    reason: format!("{name} is {value}, not a finite number"),
                });
            }
            let mut stamped = model.clone();
            stamped.created_at_ms = now_ms();
            Ok(stamped)
        }

        #[async_trait::async_trait]
        impl Catalog for $ty {
            fn backend(&self) -> &'static str {
                $backend
            }

            async fn ping(&self) -> Result<(), CatalogError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn register_architecture(&self, spec: &ArchSpec) -> Result<bool, CatalogError> {
                check_id("architecture", &spec.name)?;
                spec.validate().map_err(|e| CatalogError::InvalidArgument {
                    field: "architecture",
                    reason: e.to_string(),
                })?;
                let inserted = sqlx::query(
                    "INSERT INTO architectures (name, family, spec_json, num_parameters, created_at_ms) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
                )
                .bind(&spec.name)
                .bind(&spec.family)
                .bind(to_json(spec))
                .bind(spec.num_parameters() as i64)
                .bind(now_ms())
                .execute(&self.pool)
                .await?
                .rows_affected();
                if inserted == 1 {
                    return Ok(true);
                }
                match self.architecture(&spec.name).await? {
                    Some(existing) if &existing == spec => Ok(false),
                    _ => Err(CatalogError::Conflict(format!(
                        "architecture {:?} is registered with a different spec",
                        spec.name
                    ))),
                }
            }

            async fn architecture(&self, name: &str) -> Result<Option<ArchSpec>, CatalogError> {
                sqlx::query("SELECT name, spec_json FROM architectures WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await?
                    .as_ref()
                    .map(arch_from_row)
                    .transpose()
            }

            async fn architectures(&self, family: Option<&str>) -> Result<Vec<ArchSpec>, CatalogError> {
                sqlx::query(
                    "SELECT name, spec_json FROM architectures \
                     WHERE ($1 IS NULL OR family = $1) ORDER BY name",
                )
                .bind(family)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(arch_from_row)
                .collect()
            }

            async fn insert_zoo_model(
                &self,
                model: &ZooModelRecord,
            ) -> Result<InsertedModel, CatalogError> {
                let model = validate_model(model)?;
                let mut tx = self.pool.begin().await?;
                let inserted = insert_model_in(&mut *tx, &model).await?;
                let stored = model_by_file(&mut *tx, &model.architecture, &model.sha256).await?;
                tx.commit().await?;
                Ok(InsertedModel { model: stored, deduplicated: inserted == 0 })
            }

            async fn zoo_model(&self, id: &str) -> Result<Option<ZooModelRecord>, CatalogError> {
                let sql = format!("SELECT {ZOO_MODEL_COLUMNS} FROM zoo_models WHERE id = $1");
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?
                    .as_ref()
                    .map(zoo_model_from_row)
                    .transpose()
            }

            async fn zoo_models(
                &self,
                filter: &ZooModelFilter,
                page: &PageRequest,
            ) -> Result<Page<ZooModelRecord>, CatalogError> {
                let limit = page.limit()?;
                let cursor = page.cursor()?;
                let filters = "($1 IS NULL OR zoo = $1) AND ($2 IS NULL OR architecture = $2) \
                               AND ($3 IS NULL OR family = $3)";
                let sql = format!(
                    "SELECT {ZOO_MODEL_COLUMNS} FROM zoo_models WHERE {filters} \
                     AND ($4 IS NULL OR created_at_ms < $4 OR (created_at_ms = $4 AND id < $5)) \
                     ORDER BY created_at_ms DESC, id DESC LIMIT $6"
                );
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(filter.zoo.as_deref())
                    .bind(filter.architecture.as_deref())
                    .bind(filter.family.as_deref())
                    .bind(cursor.as_ref().map(|c| c.created_at_ms))
                    .bind(cursor.as_ref().map(|c| c.id.as_str()).unwrap_or(""))
                    .bind(limit + 1)
                    .fetch_all(&self.pool)
                    .await?;
                let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM zoo_models WHERE {filters}")))
                    .bind(filter.zoo.as_deref())
                    .bind(filter.architecture.as_deref())
                    .bind(filter.family.as_deref())
                    .fetch_one(&self.pool)
                    .await?;
                let items = rows.iter().map(zoo_model_from_row).collect::<Result<Vec<_>, _>>()?;
                Ok(paged(items, limit, total, model_cursor))
            }

            async fn add_snapshot(&self, snapshot: &Snapshot) -> Result<(), CatalogError> {
                check_sha256(&snapshot.sha256)?;
                sqlx::query(
                    "INSERT INTO zoo_model_snapshots (model_id, epoch, sha256, size_bytes) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (model_id, epoch) DO NOTHING",
                )
                .bind(&snapshot.model_id)
                .bind(snapshot.epoch as i64)
                .bind(&snapshot.sha256)
                .bind(snapshot.size_bytes as i64)
                .execute(&self.pool)
                .await
                .map_err(|e| match &e {
                    sqlx::Error::Database(db) if db.is_foreign_key_violation() => CatalogError::NotFound {
                        what: "zoo model",
                        id: snapshot.model_id.clone(),
                    },
                    _ => CatalogError::Database(e),
                })?;
                Ok(())
            }

            async fn snapshots(&self, model_id: &str) -> Result<Vec<Snapshot>, CatalogError> {
                let rows = sqlx::query(
                    "SELECT model_id, epoch, sha256, size_bytes FROM zoo_model_snapshots \
                     WHERE model_id = $1 ORDER BY epoch",
                )
                .bind(model_id)
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok(Snapshot {
                            model_id: row.try_get("model_id")?,
                            epoch: row.try_get::<i64, _>("epoch")? as u64,
                            sha256: row.try_get("sha256")?,
                            size_bytes: row.try_get::<i64, _>("size_bytes")? as u64,
                        })
                    })
                    .collect()
            }

            async fn plan_zoo(
                &self,
                plan: &ZooPlan,
                unit_specs: &[serde_json::Value],
            ) -> Result<(), CatalogError> {
                check_id("zoo", &plan.name)?;
                if plan.num_models == 0 || unit_specs.len() as u64 != plan.num_models {
                    return Err(CatalogError::InvalidArgument {
                        field: "num_models",
                        reason: format!(
                            "{} models planned with {} unit specs (both must be equal and positive)",
                            plan.num_models,
                            unit_specs.len()
                        ),
                    });
                }
                let mut tx = self.pool.begin().await?;
                sqlx::query(
                    "INSERT INTO zoos (name, family, architecture, config_json, num_models, created_at_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
                )
                .bind(&plan.name)
                .bind(&plan.family)
                .bind(&plan.architecture)
                .bind(to_json(&plan.config))
                .bind(plan.num_models as i64)
                .bind(now_ms())
                .execute(&mut *tx)
                .await
                .map_err(write_error("zoo", &plan.name))?;
                let row = sqlx::query(
                    "SELECT name, family, architecture, config_json, num_models FROM zoos WHERE name = $1",
                )
                .bind(&plan.name)
                .fetch_one(&mut *tx)
                .await?;
                let stored = zoo_from_row(&row)?;
                if &stored != plan {
                    return Err(CatalogError::Conflict(format!(
                        "zoo {:?} already exists with a different plan: {}",
                        plan.name,
                        plan_differences(&stored, plan)
                    )));
                }
                for (unit, spec) in unit_specs.iter().enumerate() {
                    sqlx::query(
                        "INSERT INTO zoo_units (zoo, unit, spec_json) VALUES ($1, $2, $3) \
                         ON CONFLICT (zoo, unit) DO NOTHING",
                    )
                    .bind(&plan.name)
                    .bind(unit as i64)
                    .bind(to_json(spec))
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn zoo(&self, name: &str) -> Result<Option<ZooPlan>, CatalogError> {
                sqlx::query(
                    "SELECT name, family, architecture, config_json, num_models FROM zoos WHERE name = $1",
                )
                .bind(name)
                .fetch_optional(&self.pool)
                .await?
                .as_ref()
                .map(zoo_from_row)
                .transpose()
            }

            async fn claim_unit(
                &self,
                zoo: &str,
                worker: &str,
                stale_before_ms: i64,
            ) -> Result<Option<WorkUnit>, CatalogError> {
                check_id("worker", worker)?;
                let sql = CLAIM_UNIT.replace("{LOCK}", $lock);
                let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(zoo)
                    .bind(worker)
                    .bind(now_ms())
                    .bind(stale_before_ms)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(|row| {
                    let unit = row.try_get::<i64, _>("unit")? as u64;
                    Ok(WorkUnit {
                        zoo: zoo.to_owned(),
                        unit,
                        spec: parse_json(
                            &row.try_get::<String, _>("spec_json")?,
                            &format!("{zoo}/{unit}"),
                            "spec_json",
                        )?,
                        attempts: row.try_get::<i64, _>("attempts")? as u64,
                    })
                })
                .transpose()
            }

            async fn complete_unit(
                &self,
                zoo: &str,
                unit: u64,
                worker: &str,
                model: &ZooModelRecord,
                snapshots: &[Snapshot],
            ) -> Result<InsertedModel, CatalogError> {
                let model = validate_model(model)?;
                for snapshot in snapshots {
                    check_sha256(&snapshot.sha256)?;
                }
                let mut tx = self.pool.begin().await?;
                let inserted = insert_model_in(&mut *tx, &model).await?;
                let stored = model_by_file(&mut *tx, &model.architecture, &model.sha256).await?;
                let marked = sqlx::query(
                    "UPDATE zoo_units SET state = 'done', model_id = $4 \
                     WHERE zoo = $1 AND unit = $2 AND state = 'claimed' AND worker = $3",
                )
                .bind(zoo)
                .bind(unit as i64)
                .bind(worker)
                .bind(&stored.id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if marked != 1 {
                    tx.rollback().await?;
                    return Err(CatalogError::Conflict(format!(
                        "unit {unit} of zoo {zoo:?} is not claimed by worker {worker:?}"
                    )));
                }
                for snapshot in snapshots {
                    sqlx::query(
                        "INSERT INTO zoo_model_snapshots (model_id, epoch, sha256, size_bytes) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (model_id, epoch) DO NOTHING",
                    )
                    .bind(&stored.id)
                    .bind(snapshot.epoch as i64)
                    .bind(&snapshot.sha256)
                    .bind(snapshot.size_bytes as i64)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(InsertedModel { model: stored, deduplicated: inserted == 0 })
            }

            async fn release_unit(&self, zoo: &str, unit: u64, worker: &str) -> Result<(), CatalogError> {
                sqlx::query(
                    "UPDATE zoo_units SET state = 'pending', worker = NULL, claimed_at_ms = NULL \
                     WHERE zoo = $1 AND unit = $2 AND state = 'claimed' AND worker = $3",
                )
                .bind(zoo)
                .bind(unit as i64)
                .bind(worker)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn release_claims_before(&self, zoo: &str, before_ms: i64) -> Result<u64, CatalogError> {
                Ok(sqlx::query(
                    "UPDATE zoo_units SET state = 'pending', worker = NULL, claimed_at_ms = NULL \
                     WHERE zoo = $1 AND state = 'claimed' AND claimed_at_ms < $2",
                )
                .bind(zoo)
                .bind(before_ms)
                .execute(&self.pool)
                .await?
                .rows_affected())
            }

            async fn zoo_progress(&self, zoo: &str) -> Result<ZooProgress, CatalogError> {
                let rows = sqlx::query(
                    "SELECT state, COUNT(*) AS n FROM zoo_units WHERE zoo = $1 GROUP BY state",
                )
                .bind(zoo)
                .fetch_all(&self.pool)
                .await?;
                let mut progress = ZooProgress { total: 0, done: 0, claimed: 0, pending: 0 };
                for row in &rows {
                    let n = row.try_get::<i64, _>("n")? as u64;
                    progress.total += n;
                    match row.try_get::<String, _>("state")?.as_str() {
                        "done" => progress.done += n,
                        "claimed" => progress.claimed += n,
                        _ => progress.pending += n,
                    }
                }
                Ok(progress)
            }

            async fn insert_denoiser(&self, denoiser: &DenoiserRecord) -> Result<(), CatalogError> {
                check_id("id", &denoiser.id)?;
                check_sha256(&denoiser.sha256)?;
                let sql = format!(
                    "INSERT INTO denoisers ({DENOISER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, FALSE, $7)"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(&denoiser.id)
                    .bind(&denoiser.architecture)
                    .bind(&denoiser.sha256)
                    .bind(denoiser.size_bytes as i64)
                    .bind(to_json(&denoiser.config))
                    .bind(to_json(&crate::figures::finite(&denoiser.summary)))
                    .bind(now_ms())
                    .execute(&self.pool)
                    .await
                    .map_err(write_error("denoiser", &denoiser.id))?;
                Ok(())
            }

            async fn denoiser(&self, id: &str) -> Result<Option<DenoiserRecord>, CatalogError> {
                let sql = format!("SELECT {DENOISER_COLUMNS} FROM denoisers WHERE id = $1");
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?
                    .as_ref()
                    .map(denoiser_from_row)
                    .transpose()
            }

            async fn denoisers(
                &self,
                architecture: Option<&str>,
                page: &PageRequest,
            ) -> Result<Page<DenoiserRecord>, CatalogError> {
                let limit = page.limit()?;
                let cursor = page.cursor()?;
                let sql = format!(
                    "SELECT {DENOISER_COLUMNS} FROM denoisers WHERE ($1 IS NULL OR architecture = $1) \
                     AND ($2 IS NULL OR created_at_ms < $2 OR (created_at_ms = $2 AND id < $3)) \
                     ORDER BY created_at_ms DESC, id DESC LIMIT $4"
                );
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(architecture)
                    .bind(cursor.as_ref().map(|c| c.created_at_ms))
                    .bind(cursor.as_ref().map(|c| c.id.as_str()).unwrap_or(""))
                    .bind(limit + 1)
                    .fetch_all(&self.pool)
                    .await?;
                let total: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM denoisers WHERE ($1 IS NULL OR architecture = $1)",
                )
                .bind(architecture)
                .fetch_one(&self.pool)
                .await?;
                let items = rows.iter().map(denoiser_from_row).collect::<Result<Vec<_>, _>>()?;
                Ok(paged(items, limit, total, denoiser_cursor))
            }

            async fn activate_denoiser(&self, id: &str) -> Result<DenoiserRecord, CatalogError> {
                let mut tx = self.pool.begin().await?;
                // Writing the architecture row first serializes activations of
                // one architecture on both backends (a row lock on PostgreSQL,
                // the write lock on SQLite).
                let locked = sqlx::query(
                    "UPDATE architectures SET name = name \
                     WHERE name = (SELECT architecture FROM denoisers WHERE id = $1)",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if locked == 0 {
                    return Err(CatalogError::NotFound { what: "denoiser", id: id.to_owned() });
                }
                sqlx::query(
                    "UPDATE denoisers SET active = FALSE WHERE active AND id <> $1 \
                     AND architecture = (SELECT architecture FROM denoisers WHERE id = $1)",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?;
                sqlx::query("UPDATE denoisers SET active = TRUE WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                let sql = format!("SELECT {DENOISER_COLUMNS} FROM denoisers WHERE id = $1");
                let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_one(&mut *tx).await?;
                tx.commit().await?;
                denoiser_from_row(&row)
            }

            async fn active_denoiser(
                &self,
                architecture: &str,
            ) -> Result<Option<DenoiserRecord>, CatalogError> {
                let sql = format!(
                    "SELECT {DENOISER_COLUMNS} FROM denoisers WHERE architecture = $1 AND active"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(architecture)
                    .fetch_optional(&self.pool)
                    .await?
                    .as_ref()
                    .map(denoiser_from_row)
                    .transpose()
            }

            async fn referenced_blobs(&self) -> Result<Vec<String>, CatalogError> {
                Ok(sqlx::query_scalar(
                    "SELECT sha256 FROM zoo_models UNION SELECT sha256 FROM zoo_model_snapshots \
                     UNION SELECT sha256 FROM denoisers ORDER BY 1",
                )
                .fetch_all(&self.pool)
                .await?)
            }
        }

        fn zoo_from_row(row: &DbRow) -> Result<ZooPlan, CatalogError> {
            let name: String = row.try_get("name")?;
            Ok(ZooPlan {
                family: row.try_get("family")?,
                architecture: row.try_get("architecture")?,
                config: parse_json(&row.try_get::<String, _>("config_json")?, &name, "config_json")?,
                num_models: row.try_get::<i64, _>("num_models")? as u64,
                name,
            })
        }

        fn plan_differences(stored: &ZooPlan, asked: &ZooPlan) -> String {
            let mut out = Vec::new();
            if stored.family != asked.family {
                out.push(format!("family {:?} ≠ {:?}", stored.family, asked.family));
            }
            if stored.architecture != asked.architecture {
                out.push(format!("architecture {:?} ≠ {:?}", stored.architecture, asked.architecture));
            }
            if stored.num_models != asked.num_models {
                out.push(format!("num_models {} ≠ {}", stored.num_models, asked.num_models));
            }
            if stored.config != asked.config {
                out.push(format!("config {} ≠ {}", stored.config, asked.config));
            }
            out.join("; ")
        }
    };
}

pub(crate) use impl_catalog;
