//! The conformance suite against the local PostgreSQL.

ferry_e2e::conformance_suite!(ferry_e2e::conformance::postgres::Postgres);
