//! `GET /metrics` (README "Metrics") and the JSON log format (README
//! "Logs"), through the real binary: the exposition parsed and checked
//! family by family, and each counter moved by the thing it counts.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{BASIC, DEADLINE, Server, kinds};

/// One family of an exposition: what its `# HELP` and `# TYPE` said, and
/// its samples (name, labels, value).
#[derive(Debug, Default)]
struct Family {
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

/// An exposition, parsed strictly: a sample must follow its family's
/// `# HELP` and `# TYPE`, and belong to it by name.
#[derive(Debug)]
struct Exposition {
    families: BTreeMap<String, Family>,
}

impl Exposition {
    /// Parses the Prometheus text format (0.0.4) or, with `openmetrics`,
    /// OpenMetrics' (counters are declared without `_total` there, and the
    /// text ends with `# EOF`).
    fn parse(text: &str, openmetrics: bool) -> Exposition {
        let mut families: BTreeMap<String, Family> = BTreeMap::new();
        let mut current: Option<String> = None;
        let body = if openmetrics {
            text.strip_suffix("# EOF\n").unwrap_or_else(|| panic!("OpenMetrics ends with # EOF:\n{text}"))
        } else {
            text
        };
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                let family = families.entry(name.to_owned()).or_default();
                assert!(family.help.is_none(), "{name} declared twice");
                family.help = Some(help.to_owned());
                current = Some(name.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert_eq!(current.as_deref(), Some(name), "TYPE of {name} follows its HELP");
                families.get_mut(name).unwrap().kind = Some(kind.to_owned());
            } else if line.starts_with("# UNIT ") {
                assert!(openmetrics, "UNIT is OpenMetrics': {line}");
            } else {
                assert!(!line.starts_with('#') && !line.is_empty(), "unexpected line {line:?}");
                let (name, labels, value) = sample(line);
                let family = current.as_deref().unwrap_or_else(|| panic!("{line}: a sample before any family"));
                let kind = families[family].kind.clone().unwrap_or_else(|| panic!("{family} has no TYPE"));
                let suffixes: &[&str] = match (kind.as_str(), openmetrics) {
                    ("histogram", _) => &["_bucket", "_sum", "_count"],
                    ("counter", true) => &["_total"],
                    _ => &[""],
                };
                assert!(
                    suffixes.iter().any(|suffix| name == format!("{family}{suffix}")),
                    "{name} is not a sample of the {kind} {family}"
                );
                families.get_mut(family).unwrap().samples.push((name, labels, value));
            }
        }
        Exposition { families }
    }

    /// The value of the sample `name` with exactly these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.families
            .values()
            .flat_map(|family| &family.samples)
            .find(|(n, l, _)| n == name && *l == labels)
            .map(|(_, _, value)| *value)
    }
}

/// `name{key="value",…} number`.
fn sample(line: &str) -> (String, BTreeMap<String, String>, f64) {
    let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
    let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}: not a number"));
    let Some((name, labels)) = series.split_once('{') else {
        return (series.to_owned(), BTreeMap::new(), value);
    };
    let labels = labels.strip_suffix('}').expect("labels end with }");
    let labels = labels
        .split(',')
        .map(|pair| {
            let (key, value) = pair.split_once('=').expect("key=value");
            let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).expect("a quoted value");
            (key.to_owned(), value.to_owned())
        })
        .collect();
    (name.to_owned(), labels, value)
}

async fn scrape(server: &Server) -> Exposition {
    let text = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    Exposition::parse(&text, false)
}

/// The sample's value now (0 when it is not there yet).
pub(crate) async fn value(server: &Server, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape(server).await.value(name, labels).unwrap_or(0.0)
}

/// Polls `/metrics` until the sample reaches `expected`: counters move
/// just after what they count is visible to a client.
pub(crate) async fn reaches(server: &Server, name: &str, labels: &[(&str, &str)], expected: f64) {
    let start = Instant::now();
    loop {
        let now = value(server, name, labels).await;
        if now == expected {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "{name}{labels:?} is {now}, never {expected}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every family the server exposes, in the Prometheus text format's names.
const FAMILIES: [&str; 18] = [
    "breakglass_approvals_decided_total",
    "breakglass_approvals_pending",
    "breakglass_attached_clients",
    "breakglass_audit_failures_total",
    "breakglass_events_appended_total",
    "breakglass_log_lines_dropped_total",
    "breakglass_notifications_dropped_total",
    "breakglass_notifications_failed_total",
    "breakglass_notifications_sent_total",
    "breakglass_push_subscriptions",
    "breakglass_push_subscriptions_pruned_total",
    "breakglass_replay_bytes_total",
    "breakglass_storage_write_failures_total",
    "breakglass_storage_writer_failures_total",
    "breakglass_turn_duration_seconds",
    "breakglass_turns_ended_total",
    "breakglass_turns_started_total",
    "breakglass_verbs_total",
];

#[tokio::test]
async fn every_family_is_a_breakglass_one_with_help_and_type_in_both_formats() {
    let server = Server::start();
    let plain = server.client.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(plain.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    let plain = Exposition::parse(&plain.text().await.unwrap(), false);
    let open = server
        .client
        .get(server.url("/metrics"))
        .header("Accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
        .send()
        .await
        .unwrap();
    assert_eq!(open.headers()["content-type"], "application/openmetrics-text; version=1.0.0; charset=utf-8");
    let open = Exposition::parse(&open.text().await.unwrap(), true);
    for (exposition, format) in [(&plain, "text"), (&open, "OpenMetrics")] {
        for (name, family) in &exposition.families {
            assert!(name.starts_with("breakglass_"), "{format}: {name}");
            assert!(family.help.as_ref().is_some_and(|help| help.len() > 10), "{format}: {name} has no help");
            let kind = family.kind.as_deref().unwrap_or_else(|| panic!("{format}: {name} has no TYPE"));
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{format}: {name} is a {kind}");
        }
    }
    // breakglass_verbs_total has samples only once a verb ran.
    for name in FAMILIES.iter().filter(|name| **name != "breakglass_verbs_total") {
        assert!(plain.families.contains_key(*name), "{name} missing from {:#?}", plain.families.keys());
        let counter = name.strip_suffix("_total");
        assert!(open.families.contains_key(counter.unwrap_or(name)), "{name} missing in OpenMetrics");
    }
    // Counted from zero, so that a scraper sees each series from the start.
    assert_eq!(plain.value("breakglass_turns_ended_total", &[("how", "cancelled")]), Some(0.0));
    assert_eq!(plain.value("breakglass_attached_clients", &[("stream", "session")]), Some(0.0));
    assert_eq!(plain.value("breakglass_storage_write_failures_total", &[("error", "full")]), Some(0.0));
    assert_eq!(
        plain.value("breakglass_approvals_decided_total", &[("decision", "deny"), ("by", "timeout")]),
        Some(0.0)
    );
}

#[tokio::test]
async fn a_completed_turn_counts_as_started_ended_completed_timed_and_its_events_appended() {
    let server = Server::start();
    let session = server.open_session().await;
    let events_before = value(&server, "breakglass_events_appended_total", &[]).await;
    let events = server.run_turn(&session, "replay basic").await;
    assert_eq!(kinds(&events), BASIC);
    reaches(&server, "breakglass_turns_ended_total", &[("how", "completed")], 1.0).await;
    let metrics = scrape(&server).await;
    assert_eq!(metrics.value("breakglass_turns_started_total", &[]), Some(1.0));
    assert_eq!(metrics.value("breakglass_turns_ended_total", &[("how", "failed")]), Some(0.0));
    assert_eq!(metrics.value("breakglass_turn_duration_seconds_count", &[]), Some(1.0));
    let seconds = metrics.value("breakglass_turn_duration_seconds_sum", &[]).unwrap();
    assert!(seconds > 0.0 && seconds < DEADLINE.as_secs_f64(), "{seconds}");
    assert_eq!(metrics.value("breakglass_turn_duration_seconds_bucket", &[("le", "+Inf")]), Some(1.0));
    let appended = metrics.value("breakglass_events_appended_total", &[]).unwrap() - events_before;
    assert_eq!(appended, events.len() as f64, "every event of the log, counted once");
}

#[tokio::test]
async fn a_cancelled_turn_counts_as_cancelled() {
    let server = Server::start();
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "say working\nsleep 60").await;
    stream.until_kind("text").await;
    assert_eq!(server.cancel(&session).await, json!({"cancelled": true}));
    reaches(&server, "breakglass_turns_ended_total", &[("how", "cancelled")], 1.0).await;
    assert_eq!(value(&server, "breakglass_turns_ended_total", &[("how", "completed")]).await, 0.0);
    assert_eq!(value(&server, "breakglass_turns_started_total", &[]).await, 1.0);
}

#[tokio::test]
async fn the_attached_clients_gauge_counts_a_stream_while_it_is_open() {
    let server = Server::start();
    let session = server.open_session().await;
    let labels = [("stream", "session")];
    assert_eq!(value(&server, "breakglass_attached_clients", &labels).await, 0.0);
    let mut stream = server.attach(&session, None).await;
    stream.until_caught_up().await;
    reaches(&server, "breakglass_attached_clients", &labels, 1.0).await;
    let mut second = server.attach(&session, None).await;
    second.until_caught_up().await;
    reaches(&server, "breakglass_attached_clients", &labels, 2.0).await;
    drop(stream);
    drop(second);
    reaches(&server, "breakglass_attached_clients", &labels, 0.0).await;
}

#[tokio::test]
async fn a_resume_replay_adds_the_bytes_it_sent_from_the_log() {
    let server = Server::start();
    let session = server.open_session().await;
    server.run_turn(&session, "replay basic").await;
    let before = value(&server, "breakglass_replay_bytes_total", &[]).await;
    let mut resumed = server.attach(&session, Some("3")).await;
    let replayed = resumed.until_caught_up().await;
    assert_eq!(replayed.len(), BASIC.len() - 4, "ids 4 to 7");
    let caught_up = "event: caught-up\ndata: {}\n\n".len();
    let sent = resumed.raw.len() - caught_up;
    let after = value(&server, "breakglass_replay_bytes_total", &[]).await;
    assert_eq!(after - before, sent as f64, "the replay's frames, byte for byte");
}

#[tokio::test]
async fn a_waiting_approval_is_pending_then_counted_decided_by_the_operator() {
    let server = Server::start();
    let (session, mut stream) = server.attached().await;
    server.start_turn(&session, "hook Bash ssh pve reset\nresult").await;
    let approval = stream.until_kind("approval").await.pop().unwrap();
    assert_eq!(value(&server, "breakglass_approvals_pending", &[]).await, 1.0);
    let tool_use_id = approval["tool_use_id"].as_str().unwrap();
    let (status, _) = server.decide(&session, tool_use_id, json!({"decision": "allow"})).await;
    assert_eq!(status, 200);
    stream.until_turn_end().await;
    let metrics = scrape(&server).await;
    assert_eq!(metrics.value("breakglass_approvals_pending", &[]), Some(0.0));
    let decided =
        |decision, by| metrics.value("breakglass_approvals_decided_total", &[("decision", decision), ("by", by)]);
    assert_eq!(decided("allow", "operator"), Some(1.0));
    assert_eq!(decided("deny", "operator"), Some(0.0));
    assert_eq!(decided("deny", "timeout"), Some(0.0));
}

#[tokio::test]
async fn verbs_count_by_target_verb_and_outcome_as_operations_and_through_api_pve() {
    let host = crate::pve::Sshd::start(crate::pve::Pve::new());
    host.pve.set("fail-reset", "VM is locked (backup)");
    let server = host.breakglass(Server::options());
    let operation = crate::targets::start(&server, "vm", "status").await;
    assert_eq!(crate::targets::finished(&server, &operation).await["state"], "succeeded");
    let reset = server.post("/api/pve/reset").send().await.unwrap();
    assert_eq!(reset.status(), 502);
    let status = server.post("/api/pve/status").send().await.unwrap();
    assert_eq!(status.status(), 200);
    let verbs = "breakglass_verbs_total";
    reaches(&server, verbs, &[("target", "vm"), ("verb", "status"), ("outcome", "succeeded")], 2.0).await;
    assert_eq!(value(&server, verbs, &[("target", "vm"), ("verb", "reset"), ("outcome", "failed")]).await, 1.0);
    assert_eq!(value(&server, verbs, &[("target", "vm"), ("verb", "reset"), ("outcome", "succeeded")]).await, 0.0);
}

#[tokio::test]
async fn json_logs_are_one_object_a_line_and_the_request_line_carries_method_and_path() {
    let server = Server::options().env("BREAKGLASS_LOG_FORMAT", "json").start();
    assert_eq!(server.client.get(server.url("/health")).send().await.unwrap().status(), 200);
    let request = |line: &Value| line["span"]["path"] == "/health";
    crate::harness::eventually("the request's log line", || {
        server.log().lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).any(|l| request(&l))
    })
    .await;
    let log = server.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: not JSON: {line}")))
        .collect();
    for line in &lines {
        assert!(["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&line["level"].as_str().unwrap()), "{line}");
        assert!(line["fields"]["message"].is_string(), "{line}");
        assert!(line["timestamp"].is_string() && line["target"].is_string(), "{line}");
    }
    let finished = lines.iter().find(|l| request(l)).unwrap();
    assert_eq!(finished["span"]["method"], "GET");
    assert_eq!(finished["fields"]["message"], "finished processing request");
    assert_eq!(finished["fields"]["status"], 200);
    assert!(lines.iter().any(|l| l["fields"]["message"].as_str().is_some_and(|m| m.starts_with("listening on"))));
}

#[test]
fn a_log_format_other_than_text_or_json_is_refused_at_start_naming_the_variable() {
    let said = crate::harness::refused_at_start(&["serve"], &[("BREAKGLASS_LOG_FORMAT", "xml")]);
    assert!(said.contains("BREAKGLASS_LOG_FORMAT") && said.contains("xml"), "{said}");
    let said = crate::harness::refused_at_start(&["serve", "--log-format", "yaml"], &[]);
    assert!(said.contains("BREAKGLASS_LOG_FORMAT") && said.contains("yaml"), "{said}");
}
