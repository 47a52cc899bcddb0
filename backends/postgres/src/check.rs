//! At start: create what `declare = true` creates, then check the table and the
//! dead-letter table (there, with the columns the statements use, and granted to this
//! login) and prepare every statement once, so that a mistake is one line at start
//! instead of a failing route.

use tokio_postgres::Client;
use tracing::warn;

use crate::conn::describe;
use crate::schema::{literal, Name, Sql, COLUMNS, DEAD_LETTER_COLUMNS, DONE_AT};
use crate::{DeadLetters, OnSuccess, PayloadType, PostgresConfig, PostgresError};

/// What a table that is not there is told.
const NOT_THERE: &str =
    "does not exist: create it with the DDL in the README, or set declare = true";

/// What one table is, as far as the checks need.
struct Found {
    /// Column names and their types (`format_type`).
    columns: Vec<(String, String)>,
    /// Privileges asked for that this login lacks.
    missing_privileges: Vec<&'static str>,
    /// Triggers other than the system's own.
    triggers: i64,
}

/// Runs the checks; returns the payload column's type.
pub(crate) async fn run(
    client: &Client,
    config: &PostgresConfig,
) -> Result<PayloadType, PostgresError> {
    let table_error = |detail: String| PostgresError::Table {
        table: config.table.clone(),
        detail,
    };
    let table = Name::parse(&config.table).sql();
    if config.declare {
        declare(client, config, &table).await?;
    }
    let found = find(client, &table, &["SELECT", "UPDATE", "DELETE"])
        .await
        .map_err(|e| table_error(describe(&e)))?
        .ok_or_else(|| table_error(NOT_THERE.to_owned()))?;
    let mut needed: Vec<&str> = COLUMNS.to_vec();
    if config.on_success == OnSuccess::Mark {
        needed.push(DONE_AT);
    }
    missing_columns(&found, &needed).map_err(table_error)?;
    let payload_type = found
        .columns
        .iter()
        .find(|(name, _)| name == "payload")
        .map(|(_, t)| t.clone())
        .unwrap_or_default();
    let payload = PayloadType::of(&payload_type).ok_or_else(|| {
        table_error(format!(
            "column payload is {payload_type}; ferry reads bytea, text, varchar, json or jsonb"
        ))
    })?;
    privileges(client, &found).await.map_err(table_error)?;
    if found.triggers == 0 {
        warn!(table = %config.table,
            "the table has no trigger: new rows are found by the poll (poll_interval), not by NOTIFY; see the DDL in the README");
    }
    if let DeadLetters::Table(dead) = &config.dead_letters {
        let dead_error = |detail: String| PostgresError::DeadLetterTable {
            table: dead.clone(),
            detail,
        };
        let found = find(client, &Name::parse(dead).sql(), &["INSERT"])
            .await
            .map_err(|e| dead_error(describe(&e)))?
            .ok_or_else(|| dead_error(NOT_THERE.to_owned()))?;
        missing_columns(&found, &DEAD_LETTER_COLUMNS).map_err(dead_error)?;
        privileges(client, &found).await.map_err(dead_error)?;
    }
    // Types that do not fit (a payload column of another type in the dead-letter
    // table, say) are found by preparing what will run.
    for (what, statement) in Sql::new(config, payload).all() {
        if let Err(e) = client.prepare(statement).await {
            let detail = format!("the {what} statement is refused: {}", describe(&e));
            return Err(match (&config.dead_letters, what) {
                (DeadLetters::Table(dead), "dead letter") => PostgresError::DeadLetterTable {
                    table: dead.clone(),
                    detail,
                },
                _ => table_error(detail),
            });
        }
    }
    Ok(payload)
}

/// Creates the tables, indexes and trigger in one transaction, under an advisory lock so
/// that replicas starting together do not race each other's `CREATE`s.
async fn declare(
    client: &Client,
    config: &PostgresConfig,
    table: &str,
) -> Result<(), PostgresError> {
    let failed = |e: tokio_postgres::Error| PostgresError::Declare {
        table: config.table.clone(),
        detail: describe(&e),
    };
    // A table that is already there keeps its payload type; the dead-letter table
    // gets the same.
    let existing: Option<String> = client
        .query_opt(
            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
             WHERE a.attrelid = to_regclass($1) AND a.attname = 'payload' AND NOT a.attisdropped",
            &[&table],
        )
        .await
        .map_err(failed)?
        .and_then(|row| row.try_get(0).ok());
    let payload = existing
        .as_deref()
        .and_then(PayloadType::of)
        .unwrap_or(config.payload_type);
    let script = format!(
        "BEGIN;\nSELECT pg_advisory_xact_lock(hashtext({}));\n{}COMMIT;",
        literal(&format!("ferry declare {table}")),
        crate::schema::ddl(config, payload)
    );
    if let Err(e) = client.batch_execute(&script).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(failed(e));
    }
    Ok(())
}

/// The table's columns, privileges and triggers; `None` when there is no such table.
async fn find(
    client: &Client,
    table: &str,
    privileges: &[&'static str],
) -> Result<Option<Found>, tokio_postgres::Error> {
    let exists: Option<String> = client
        .query_one("SELECT to_regclass($1)::text", &[&table])
        .await?
        .try_get(0)?;
    if exists.is_none() {
        return Ok(None);
    }
    let columns = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table],
        )
        .await?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect::<Result<Vec<(String, String)>, tokio_postgres::Error>>()?;
    let mut missing_privileges = Vec::new();
    for privilege in privileges {
        // One privilege a call: given several, has_table_privilege says whether any is held.
        let held: bool = client
            .query_one(
                "SELECT has_table_privilege(to_regclass($1), $2)",
                &[&table, privilege],
            )
            .await?
            .try_get(0)?;
        if !held {
            missing_privileges.push(*privilege);
        }
    }
    let triggers: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1) AND NOT tgisinternal",
            &[&table],
        )
        .await?
        .try_get(0)?;
    Ok(Some(Found {
        columns,
        missing_privileges,
        triggers,
    }))
}

fn missing_columns(found: &Found, needed: &[&str]) -> Result<(), String> {
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|c| !found.columns.iter().any(|(name, _)| name == c))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "has no column {} (see the DDL in the README)",
            missing.join(", ")
        ))
    }
}

async fn privileges(client: &Client, found: &Found) -> Result<(), String> {
    if found.missing_privileges.is_empty() {
        return Ok(());
    }
    let role: String = match client.query_one("SELECT current_user::text", &[]).await {
        Ok(row) => row.try_get(0).unwrap_or_default(),
        Err(_) => String::new(),
    };
    Err(format!(
        "role {role:?} lacks {} on it (GRANT {} ON ... TO {role})",
        found.missing_privileges.join(", "),
        found.missing_privileges.join(", "),
    ))
}
