//! The external services tests use: a PostgreSQL database per test (inside
//! the server `DATABASE_URL` names) and an S3 prefix per test (inside the
//! bucket `WEIGHTGEN_TEST_S3_URL` names). scripts/test.sh starts both; a test
//! run without them fails and says so, it never skips.

use sqlx::{Connection, Executor, PgConnection};

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests through scripts/test.sh, which starts PostgreSQL and SeaweedFS")
    })
}

fn unique(tag: &str) -> String {
    format!("{tag}_{}_{:08x}", std::process::id(), rand::random::<u32>())
}

/// `url` with its database name replaced.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{database}{query}", &base[..host_end])
}

/// A database created for one test and dropped when it goes out of scope.
pub struct TestDatabase {
    /// Connection URL of the new database.
    pub url: String,
    admin_url: String,
    name: String,
}

impl TestDatabase {
    /// Creates an empty database named after `tag`.
    pub async fn create(tag: &str) -> Self {
        let admin_url = required_env("DATABASE_URL");
        let name = unique(&format!("wg_{tag}")).to_lowercase();
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("connect to DATABASE_URL");
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .await
            .expect("create the test database");
        admin.close().await.ok();
        Self {
            url: with_database(&admin_url, &name),
            admin_url,
            name,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs outside any runtime: use a small one on its own thread.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&admin_url).await.ok()?;
                admin
                    .execute(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .await
                    .ok()?;
                admin.close().await.ok()
            })
        })
        .join();
    }
}

/// An S3 URL (`s3://bucket/prefix`) no other test uses.
pub fn s3_prefix(tag: &str) -> String {
    format!("{}/{}", required_env("WEIGHTGEN_TEST_S3_URL"), unique(tag))
}

#[test]
fn database_names_are_replaced_in_urls() {
    assert_eq!(
        with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
        "postgres://postgres@127.0.0.1:5432/x"
    );
    assert_eq!(
        with_database("postgres://u:p@h:1/db?sslmode=disable", "y"),
        "postgres://u:p@h:1/y?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h:1", "z"), "postgres://h:1/z");
}
