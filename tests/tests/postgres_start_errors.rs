//! What stops a PostgreSQL route at start is one line naming the key: a table or column
//! that is not there, a missing grant, a missing dead-letter table or database (exit 2),
//! a server that cannot be reached (exit 1); never with the password.

use ferry_e2e::conformance::postgres::{table_name, url, PgTable, ADDR};
use ferry_e2e::ferry::{fatal_lines, run_cli, scratch, Route};

/// `ferry run` on `source`; its exit code and its one line.
fn start(source: &str) -> (Option<i32>, String) {
    let route = Route {
        source: source.to_owned(),
        sink_url: "http://127.0.0.1:9/x",
        sink: "",
        delivery: "",
    };
    let file = scratch("pg-start").join("ferry.toml");
    std::fs::write(&file, route.config(ferry_e2e::free_port())).expect("write config");
    let out = run_cli(&["run", "--config", &file.display().to_string()]);
    let lines = fatal_lines(&out);
    assert_eq!(
        lines.len(),
        1,
        "one line expected; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), lines[0].clone())
}

fn source(url: &str, table: &str, dead: &str) -> String {
    format!("type = \"postgres\"\nurl = \"{url}\"\ntable = \"{table}\"\ndead_letter_table = \"{dead}\"\n")
}

fn assert_line(got: &(Option<i32>, String), code: i32, needles: &[&str]) {
    let (status, line) = got;
    assert_eq!(*status, Some(code), "{line}");
    for needle in needles {
        assert!(line.contains(needle), "{needle:?} not in {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_column_grant_or_dead_letter_table_is_a_configuration_error() {
    let missing = table_name("missing");
    assert_line(
        &start(&source(&url(ADDR), &missing, "dead")),
        2,
        &[
            &format!("routes.r.source.table: {missing}: does not exist"),
            "declare = true",
        ],
    );

    let table = PgTable::create("nocolumn", false).await;
    let missing_dead = table_name("nodead");
    assert_line(
        &start(&source(&url(ADDR), &table.name, &missing_dead)),
        2,
        &[&format!(
            "routes.r.source.dead_letter_table: {missing_dead}: does not exist"
        )],
    );
    table
        .client
        .batch_execute(&format!(
            "ALTER TABLE \"{}\" DROP COLUMN locked_by, DROP COLUMN attempts",
            table.name
        ))
        .await
        .expect("drop columns");
    assert_line(
        &start(&source(&url(ADDR), &table.name, &table.dead)),
        2,
        &[
            "routes.r.source.table:",
            "has no column attempts, locked_by",
        ],
    );

    let granted = PgTable::create("nogrant", false).await;
    let role = table_name("ferry_role");
    granted
        .client
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN; GRANT SELECT ON \"{}\" TO \"{role}\"",
            granted.name
        ))
        .await
        .expect("create a role");
    let as_role = format!("postgres://{role}@{ADDR}/test");
    let refused = start(&source(&as_role, &granted.name, &granted.dead));
    granted
        .client
        .batch_execute(&format!(
            "REVOKE ALL ON \"{}\" FROM \"{role}\"; DROP ROLE \"{role}\"",
            granted.name
        ))
        .await
        .expect("drop the role");
    assert_line(
        &refused,
        2,
        &["routes.r.source.table:", "lacks UPDATE, DELETE"],
    );
}

#[test]
fn an_unknown_database_is_a_configuration_error_and_an_unreachable_server_is_not() {
    assert_line(
        &start(&source(
            "postgres://postgres@127.0.0.1:5432/no_such_database",
            "t",
            "d",
        )),
        2,
        &["routes.r.source.url: cannot connect to", "no_such_database"],
    );
    let port = ferry_e2e::free_port();
    let unreachable = start(&source(
        &format!("postgres://postgres:s3cret@127.0.0.1:{port}/test"),
        "t",
        "d",
    ));
    assert_line(
        &unreachable,
        1,
        &[&format!(
            "routes.r.source.url: cannot connect to postgres://postgres:<redacted>@127.0.0.1:{port}/test"
        )],
    );
    assert!(!unreachable.1.contains("s3cret"), "{}", unreachable.1);
    assert_line(
        &start(&source(
            "postgres://postgres@127.0.0.1:5432/test?sslmode=require",
            "t",
            "d",
        )),
        2,
        &["routes.r.source.url: sslmode=require", "does not speak TLS"],
    );
}
