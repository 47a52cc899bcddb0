//! An MQTT route that cannot start says why in one line: an unreachable broker exits 1; a
//! broker that refuses the login, or a setting ferry cannot take, exits 2. (A refused
//! subscription is reported the same way, naming `topics`; Mosquitto's ACLs grant every
//! subscription and filter at delivery, so there is no broker here to refuse one.)

use ferry_e2e::conformance::mqtt::PrivateBroker;
use ferry_e2e::ferry::{fatal_lines, run_cli, scratch, Route};

/// Runs `ferry run` on a route with this source and returns the exit code and the lines
/// that are not log lines.
fn run(source: &str) -> (Option<i32>, Vec<String>) {
    let route = Route {
        source: source.to_owned(),
        sink_url: "http://127.0.0.1:9/x",
        sink: "",
        delivery: "",
    };
    let file = scratch("mqtt-start").join("ferry.toml");
    std::fs::write(&file, route.config(ferry_e2e::free_port())).expect("write config");
    let out = run_cli(&["run", "--config", &file.display().to_string()]);
    (out.status.code(), fatal_lines(&out))
}

fn source(url: &str, extra: &str) -> String {
    format!(
        "type = \"mqtt\"\nurl = \"{url}\"\ntopics = [\"orders/#\"]\nclient_id = \"{}\"\n\
         dead_letters = \"drop\"\n{extra}\n",
        ferry_e2e::unique("start")
    )
}

fn one_line(lines: &[String], code: Option<i32>, expected: i32) -> &str {
    assert_eq!(code, Some(expected), "exit code; stderr lines: {lines:?}");
    assert_eq!(lines.len(), 1, "one line, not {lines:?}");
    &lines[0]
}

#[test]
fn an_unreachable_broker_exits_1_in_one_line_without_the_password() {
    let port = ferry_e2e::free_port();
    let (code, lines) = run(&source(&format!("mqtt://u:s3cret@127.0.0.1:{port}"), ""));
    let line = one_line(&lines, code, 1);
    assert!(line.contains("routes.r.source.url"), "{line}");
    assert!(line.contains(&port.to_string()), "{line}");
    assert!(!line.contains("s3cret"), "the password is shown: {line}");
}

#[test]
fn settings_ferry_cannot_take_exit_2_naming_the_key() {
    for (source, key) in [
        (source("mqtts://127.0.0.1:8883", ""), "routes.r.source.url"),
        (
            source("mqtt://127.0.0.1:1883", "shared_group = \"a/b\""),
            "routes.r.source.shared_group",
        ),
        (
            "type = \"mqtt\"\nurl = \"mqtt://127.0.0.1:1883\"\ntopics = [\"a/#/b\"]\ndead_letters = \"drop\"\n"
                .to_owned(),
            "routes.r.source.topics[0]",
        ),
        (
            "type = \"mqtt\"\nurl = \"mqtt://127.0.0.1:1883\"\ntopics = [\"orders/#\"]\n\
             dead_letter_topic = \"orders/dead\"\n"
                .to_owned(),
            "routes.r.source.dead_letter_topic",
        ),
        (
            "type = \"mqtt\"\nurl = \"mqtt://127.0.0.1:1883\"\ntopics = [\"orders/#\"]\n".to_owned(),
            "routes.r.source",
        ),
    ] {
        let (code, lines) = run(&source);
        assert_eq!(code, Some(2), "{source}: {lines:?}");
        assert!(
            lines.iter().any(|l| l.contains(key)),
            "{source}: no line names {key}: {lines:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_exits_2_naming_the_url() {
    let broker = PrivateBroker::start_with("allow_anonymous false\n", |_| String::new()).await;
    let (code, lines) = run(&source(
        &format!("mqtt://nobody:s3cret@{}", broker.addr),
        "",
    ));
    let line = one_line(&lines, code, 2);
    assert!(line.contains("routes.r.source.url"), "{line}");
    assert!(line.contains("refused"), "{line}");
    assert!(!line.contains("s3cret"), "the password is shown: {line}");
}
