//! Support for tests that need a real PostgreSQL: where the server is, and
//! a fresh schema per store so parallel tests and runs never see each
//! other's rows or notifications.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::PgConfig;

/// Environment variable naming the test database.
pub const DATABASE_URL_VAR: &str = "BATCHD_TEST_DATABASE_URL";

/// Used when [`DATABASE_URL_VAR`] is unset: the local server's `test`
/// database.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Prefix of the schemas tests create.
const SCHEMA_PREFIX: &str = "batchd_test_";

/// Schemas older than this are left over from earlier runs and dropped.
const STALE_AFTER_SECS: u64 = 60 * 60;

/// Returns the test database's URL.
pub fn database_url() -> String {
    std::env::var(DATABASE_URL_VAR).unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// Returns a new schema name, unique to this call. The name contains its
/// creation time, so [`drop_stale_schemas`] can recognize old leftovers.
pub fn unique_schema() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{SCHEMA_PREFIX}{secs}_{}", &random[..12])
}

/// Returns a config for the test database on a schema of its own.
pub fn isolated_config() -> PgConfig {
    PgConfig::new(database_url()).schema(unique_schema())
}

/// Drops test schemas created more than an hour ago, so the test database
/// does not grow without bound. No running test uses a schema that old.
pub async fn drop_stale_schemas() -> Result<u64, tokio_postgres::Error> {
    let config: tokio_postgres::Config = database_url().parse()?;
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    let rows = client
        .query(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1",
            &[&format!("{SCHEMA_PREFIX}%")],
        )
        .await?;
    let mut dropped = 0;
    for row in rows {
        let name: String = row.get(0);
        let created = name
            .strip_prefix(SCHEMA_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        if created.is_some_and(|created| now.saturating_sub(created) > STALE_AFTER_SECS) {
            client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                .await?;
            dropped += 1;
        }
    }
    drop(client);
    driver.abort();
    Ok(dropped)
}

/// Drops one schema and everything in it, on the test database.
pub async fn drop_schema(schema: &str) -> Result<(), tokio_postgres::Error> {
    drop_schema_on(&database_url(), schema).await
}

/// Drops one schema and everything in it, on the database at `url`.
pub async fn drop_schema_on(url: &str, schema: &str) -> Result<(), tokio_postgres::Error> {
    let config: tokio_postgres::Config = url.parse()?;
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
    let quoted = schema.replace('"', "\"\"");
    let result = client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{quoted}\" CASCADE"))
        .await;
    drop(client);
    driver.abort();
    result
}
