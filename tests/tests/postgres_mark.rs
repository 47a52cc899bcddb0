//! `declare = true` creates the tables (a `jsonb` payload here) and can run again on
//! them; `on_success = "mark"` keeps delivered rows with `done_at` set, and a restart
//! delivers none of them again.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_e2e::conformance::postgres::{connect, table_name, url, ADDR};
use ferry_e2e::ferry::Route;
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marked_rows_stay_done_across_a_restart_of_a_declared_table() {
    let client = connect().await;
    let table = table_name("mark");
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let source = format!(
        "type = \"postgres\"\nurl = \"{}\"\ntable = \"{table}\"\ndeclare = true\n\
         payload_type = \"jsonb\"\non_success = \"mark\"\ndead_letter_table = \"{table}_dead\"\n",
        url(ADDR)
    );
    let start = || {
        Ferry::start(&Route {
            source: source.clone(),
            sink_url: &endpoint.url(),
            sink: "mode = \"raw\"",
            delivery: "",
        })
    };
    let insert = |from: usize, to: usize| {
        let client = client.clone();
        let table = table.clone();
        async move {
            client
                .execute(
                    &format!(
                        "INSERT INTO \"{table}\" (payload, headers) \
                         SELECT jsonb_build_object('n', n), jsonb_build_object('tenant', 't' || n) \
                         FROM generate_series($1::int, $2::int - 1) AS n"
                    ),
                    &[&(from as i32), &(to as i32)],
                )
                .await
                .expect("insert rows");
        }
    };
    let delivered = |endpoint: &Endpoint| -> BTreeMap<i64, usize> {
        let mut count = BTreeMap::new();
        for seen in endpoint.delivered() {
            let body: serde_json::Value =
                serde_json::from_slice(&seen.body).expect("a JSON payload");
            *count.entry(body["n"].as_i64().expect("n")).or_default() += 1;
        }
        count
    };
    let count = |sql: String| {
        let client = client.clone();
        async move {
            let n: i64 = client.query_one(&sql, &[]).await.expect(&sql).get(0);
            n
        }
    };

    let mut ferry = start();
    ferry.wait_ready(Duration::from_secs(30)).await;
    insert(0, 50).await;
    let all = wait_until(Duration::from_secs(30), || delivered(&endpoint).len() == 50).await;
    assert!(all, "log:\n{}", ferry.log());
    let done = format!("SELECT count(*) FROM \"{table}\" WHERE done_at IS NOT NULL");
    let marked = wait_until_async(|| async { count(done.clone()).await == 50 }).await;
    assert!(marked, "rows not marked; log:\n{}", ferry.log());
    // The headers column arrives as attributes, the id is the table's and the row's.
    for seen in endpoint.delivered() {
        let body: serde_json::Value = serde_json::from_slice(&seen.body).expect("JSON");
        let n = body["n"].as_i64().expect("n");
        let tenant = seen
            .headers
            .get("x-ferry-attr-tenant")
            .and_then(|v| v.to_str().ok());
        assert_eq!(tenant, Some(format!("t{n}").as_str()), "{seen:?}");
        assert!(seen.id.starts_with(&format!("{table}-")), "{}", seen.id);
    }
    ferry.signal("TERM");
    assert!(ferry
        .wait_exit(Duration::from_secs(30))
        .await
        .is_some_and(|s| s.success()));

    // Declared again over the tables it made, then nothing marked comes back.
    let ferry = start();
    ferry.wait_ready(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(delivered(&endpoint).len(), 50, "log:\n{}", ferry.log());
    insert(50, 60).await;
    let all = wait_until(Duration::from_secs(30), || delivered(&endpoint).len() == 60).await;
    assert!(all, "log:\n{}", ferry.log());
    let twice: Vec<i64> = delivered(&endpoint)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
    let marked = wait_until_async(|| async { count(done.clone()).await == 60 }).await;
    assert!(marked, "rows not marked; log:\n{}", ferry.log());
    assert_eq!(
        count(format!("SELECT count(*) FROM \"{table}\"")).await,
        60,
        "mark keeps every row"
    );
    assert_eq!(
        count(format!(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = '\"{table}\"'::regclass AND NOT tgisinternal"
        ))
        .await,
        1,
        "declared twice: one trigger"
    );
}

async fn wait_until_async<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
