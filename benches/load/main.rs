//! The load harness (docs/PERFORMANCE.md): the real server on loopback, the
//! compiled stand-in agent of `agent`, and cheap SSE clients of `client`,
//! through the scenarios of the performance brief. For each it prints a
//! table row (the figure, latencies, the server's CPU seconds from
//! `/proc/<pid>/stat` and resident memory from `/proc/<pid>/status`) and
//! writes every row as JSON.
//!
//!     cargo bench --bench load                      # every scenario, release build
//!     cargo bench --bench load -- --only fanout     # ingest, fanout, slow, cancel, footprint
//!     cargo test --bench load -- --smoke            # seconds, debug build (scripts/test)
//!
//! `--json PATH` names the JSON report (default `target/load-report.json`).
//! Under `perf record -D -1 --control fifo:<ctl>`, `LOAD_PERF_CTL=<ctl>`
//! with `LOAD_PERF_SCENARIO=flood|flood-attached|replay` records that
//! stretch alone (docs/PERFORMANCE.md says how).
//! The run fails (exit 1) when any stream saw an id gap or a duplicate, a
//! lost or repeated line of the stand-in, or fewer events than the turn had.
//!
//! The same executable is the stand-in agent: the server is told to run it
//! (`BREAKGLASS_CLAUDE_BIN`), and it knows it is the agent by the CLI's `-p`.

#![allow(clippy::disallowed_methods)] // the harness drives the server's process synchronously

#[path = "../../tests/it/harness.rs"]
#[allow(dead_code)]
mod harness;

mod agent;
mod client;
mod report;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use harness::Server;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use client::{Seen, Stream, Until};
use report::{Row, Usage};

/// How big each scenario is: the brief's figures, or a smoke run's.
struct Sizes {
    flood: u64,
    /// (clients, events a second, seconds)
    fanout: Vec<(usize, f64, f64)>,
    resumes: usize,
    idle_clients: usize,
    starts: usize,
    cancels: usize,
    /// (clients reading, events a second, seconds) beside the one that never reads.
    slow: (usize, f64, f64),
}

impl Sizes {
    fn full() -> Self {
        Sizes {
            flood: 100_000,
            fanout: vec![(100, 20.0, 15.0), (100, 1000.0, 5.0), (1000, 20.0, 15.0), (1000, 1000.0, 5.0)],
            resumes: 200,
            idle_clients: 10_000,
            starts: 7,
            cancels: 20,
            slow: (99, 1000.0, 5.0),
        }
    }

    fn smoke() -> Self {
        Sizes {
            flood: 2_000,
            fanout: vec![(10, 200.0, 0.5)],
            resumes: 5,
            idle_clients: 50,
            starts: 1,
            cancels: 1,
            slow: (5, 200.0, 0.5),
        }
    }
}

/// In the order they run: the 10 000 clients of `footprint` last, since
/// tearing them down takes the machine for a while after.
const SCENARIOS: [&str; 5] = ["ingest", "fanout", "slow", "cancel", "footprint"];

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if agent::invoked_as_agent(&args) {
        return agent::run(&args);
    }
    let mut smoke = false;
    let mut only: Vec<String> = SCENARIOS.iter().map(|s| s.to_string()).collect();
    let mut json_path = harness::repo().join("target/load-report.json");
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--smoke" => smoke = true,
            "--only" => only = rest.next().map(|s| s.split(',').map(str::to_owned).collect()).unwrap_or_default(),
            "--json" => json_path = rest.next().map(Into::into).unwrap_or(json_path),
            "--bench" => {} // what `cargo bench` passes
            other => {
                eprintln!(
                    "load: unknown argument {other:?}; takes --smoke, --only {}, --json PATH",
                    SCENARIOS.join(",")
                );
                return std::process::ExitCode::from(2);
            }
        }
    }
    if let Some(unknown) = only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
        eprintln!("load: no scenario {unknown:?}; there are {}", SCENARIOS.join(", "));
        return std::process::ExitCode::from(2);
    }
    raise_nofile();
    let sizes = if smoke { Sizes::smoke() } else { Sizes::full() };
    let machine = report::machine();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let rows = runtime.block_on(async {
        client::self_check().await;
        let mut rows = Vec::new();
        for scenario in SCENARIOS.iter().filter(|s| only.iter().any(|o| o == *s)) {
            let started = rows.len();
            match *scenario {
                "ingest" => ingest_replay_resume(&sizes, &mut rows).await,
                "fanout" => {
                    for &(clients, rate, seconds) in &sizes.fanout {
                        rows.push(fanout(clients, rate, seconds, false).await);
                    }
                }
                "footprint" => footprint(&sizes, &mut rows).await,
                "slow" => {
                    let (clients, rate, seconds) = sizes.slow;
                    rows.push(fanout(clients, rate, seconds, true).await);
                }
                "cancel" => rows.push(cancel(sizes.cancels).await),
                _ => unreachable!("checked above"),
            }
            for row in &rows[started..] {
                eprintln!("load: {} / {}: {}", row.scenario, row.case, row.figure);
            }
        }
        rows
    });
    let end_machine = report::machine();
    println!("{}", report::table(&rows));
    let document = json!({
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "smoke": smoke,
        "machine_at_start": machine,
        "machine_at_end": end_machine,
        "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
    });
    if let Some(dir) = json_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&document).expect("json")).expect("write the report");
    println!("JSON report: {}", json_path.display());
    let broken: Vec<&Row> = rows.iter().filter(|r| !r.intact()).collect();
    if broken.is_empty() {
        println!("load: {} passed, 0 failed (no gaps, no duplicates, every event delivered)", rows.len());
        std::process::ExitCode::SUCCESS
    } else {
        for row in &broken {
            eprintln!("load: {} / {} lost or repeated events: {}", row.scenario, row.case, row.integrity());
        }
        println!("load: {} passed, {} failed", rows.len() - broken.len(), broken.len());
        std::process::ExitCode::FAILURE
    }
}

/// 10 000 clients need 10 000 descriptors here too (the server raises its
/// own limit: README "Connections").
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Profiling one scenario (docs/PERFORMANCE.md): under `perf record
/// --control fifo:<ctl> -D -1`, `LOAD_PERF_CTL=<ctl>` and
/// `LOAD_PERF_SCENARIO=<name>` turn the recording on for that scenario's
/// measured stretch only.
fn perf_control(scenario: &str, command: &str) {
    if let (Ok(ctl), Ok(wanted)) = (std::env::var("LOAD_PERF_CTL"), std::env::var("LOAD_PERF_SCENARIO"))
        && wanted == scenario
    {
        let written = std::fs::OpenOptions::new().write(true).open(&ctl).and_then(|mut f| {
            use std::io::Write;
            f.write_all(format!("{command}\n").as_bytes())
        });
        if let Err(err) = written {
            eprintln!("load: perf control {ctl}: {err}");
        }
    }
}

/// The server, with the stand-in agent and no approvals (the stand-in never
/// calls a tool).
fn start_server() -> Server {
    let exe = std::env::current_exe().expect("the harness's own path");
    let server = Server::options()
        .env("BREAKGLASS_CLAUDE_BIN", exe.display().to_string())
        .env("BREAKGLASS_APPROVALS", "off")
        .env("RUST_LOG", "info")
        .arg("--max-concurrent-turns")
        .arg("4")
        .start();
    eprintln!("load: server pid {} at {}", server.pid(), server.base);
    server
}

fn addr(server: &Server) -> SocketAddr {
    server.base.trim_start_matches("http://").trim_end_matches('/').parse().expect("the server's address")
}

/// The server's CPU seconds and peak resident memory over a stretch of a
/// scenario, and the harness's own CPU seconds (its clients' cost).
struct Probe {
    pid: u32,
    cpu: f64,
    own_cpu: f64,
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    sampler: tokio::task::JoinHandle<()>,
}

impl Probe {
    fn start(server: &Server) -> Probe {
        let pid = server.pid();
        let peak_kib = Arc::new(AtomicU64::new(report::rss_kib(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = tokio::spawn({
            let (peak_kib, stop) = (peak_kib.clone(), stop.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    peak_kib.fetch_max(report::rss_kib(pid), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        Probe {
            pid,
            cpu: report::cpu_seconds(pid),
            own_cpu: report::cpu_seconds(std::process::id()),
            peak_kib,
            stop,
            sampler,
        }
    }

    async fn finish(self) -> Usage {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.sampler.await;
        let rss = report::rss_kib(self.pid);
        Usage {
            server_cpu_s: report::cpu_seconds(self.pid) - self.cpu,
            harness_cpu_s: report::cpu_seconds(std::process::id()) - self.own_cpu,
            rss_kib: rss,
            peak_rss_kib: self.peak_kib.load(Ordering::Relaxed).max(rss),
        }
    }
}

/// Waits (polling the API, bounded) until the session's turn has ended.
async fn wait_idle(server: &Server, session: &str, within: Duration) -> u64 {
    let start = Instant::now();
    loop {
        let row: Value = server.get(&format!("/api/session/{session}")).send().await.unwrap().json().await.unwrap();
        if row["running"] == false && row["event_count"].as_u64().unwrap_or(0) > 1 {
            return row["event_count"].as_u64().unwrap_or(0);
        }
        assert!(start.elapsed() < within, "the turn did not end within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client that attaches to an empty session, says when it is caught up,
/// and reads until the turn ends.
fn live_client(
    addr: SocketAddr,
    session: String,
    ready: tokio::sync::mpsc::Sender<()>,
    within: Duration,
) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut stream = Stream::attach(addr, harness::TOKEN, &session, None, true).await.expect("attach");
        assert!(stream.read(Until::CaughtUp).await.expect("read"), "ended before caught-up");
        let _ = ready.send(()).await;
        match tokio::time::timeout(within, stream.read(Until::TurnEnd)).await {
            Ok(read) => {
                read.expect("read");
            }
            Err(_) => stream.seen.ended_early = true,
        }
        stream.seen
    })
}

/// Adds what each stream saw.
fn merge(seen: impl IntoIterator<Item = Seen>) -> (report::Integrity, Histogram<u64>, Vec<u64>) {
    let mut integrity = report::Integrity::default();
    let mut latency = client::histogram();
    let mut counts = Vec::new();
    for s in seen {
        integrity.gaps += s.gaps;
        integrity.duplicates += s.duplicates;
        integrity.seq_breaks += s.seq_breaks;
        integrity.cut_short += u64::from(s.ended_early);
        latency.add(&s.latency).expect("same bounds");
        counts.push(s.events);
    }
    (integrity, latency, counts)
}

/// Ingest (a flood with no client, then with one), then replay and resume
/// on the finished session.
async fn ingest_replay_resume(sizes: &Sizes, rows: &mut Vec<Row>) {
    let server = start_server();
    let addr = addr(&server);
    let n = sizes.flood;
    let within = Duration::from_secs(600);
    let mut finished = String::new();
    for clients in [0, 1] {
        let session = server.open_session().await;
        let (ready_tx, mut ready) = tokio::sync::mpsc::channel(1);
        let reader = (clients == 1).then(|| live_client(addr, session.clone(), ready_tx, within));
        if reader.is_some() {
            ready.recv().await.expect("the client caught up");
        }
        let probe = Probe::start(&server);
        let phase = if clients == 0 { "flood" } else { "flood-attached" };
        perf_control(phase, "enable");
        let start = Instant::now();
        server.start_turn(&session, &format!("flood {n}")).await;
        let count = wait_idle(&server, &session, within).await;
        perf_control(phase, "disable");
        let mut elapsed = start.elapsed();
        let (integrity, latency) = match reader {
            Some(reader) => {
                let (mut integrity, latency, counts) = merge([reader.await.expect("client")]);
                // The client's turn_end, not the poll, ends the run.
                elapsed = start.elapsed();
                integrity.short_clients = counts.iter().filter(|c| **c != count).count() as u64;
                (integrity, Some(latency))
            }
            None => (report::Integrity::default(), None),
        };
        let usage = probe.finish().await;
        let rate = count as f64 / elapsed.as_secs_f64();
        rows.push(Row {
            scenario: "ingest",
            case: format!("flood {n}, {clients} client{}", if clients == 1 { "" } else { "s" }),
            figure: format!("{} events/s", report::thousands(rate)),
            latency,
            usage,
            integrity,
            values: json!({"events": count, "seconds": elapsed.as_secs_f64(), "events_per_second": rate,
                           "clients": clients, "agent_line_bytes": agent::line_bytes()}),
        });
        if count != n + 4 {
            rows.last_mut().unwrap().integrity.short_clients += 1;
        }
        finished = session;
    }

    // Replay: a fresh client on the finished session, to caught-up.
    let count = n + 4;
    let probe = Probe::start(&server);
    perf_control("replay", "enable");
    let start = Instant::now();
    let mut stream = Stream::attach(addr, harness::TOKEN, &finished, None, false).await.expect("attach");
    let read = stream.read(Until::CaughtUp).await.expect("replay");
    let elapsed = start.elapsed();
    perf_control("replay", "disable");
    let usage = probe.finish().await;
    let mb = stream.seen.bytes as f64 / 1e6;
    let (mut integrity, _, counts) = merge([stream.seen]);
    integrity.short_clients = u64::from(!read || counts[0] != count);
    rows.push(Row {
        scenario: "replay",
        case: format!("{count} events ({mb:.1} MB) to caught-up"),
        figure: format!(
            "{:.1} MB/s, {} events/s",
            mb / elapsed.as_secs_f64(),
            report::thousands(count as f64 / elapsed.as_secs_f64())
        ),
        latency: None,
        usage,
        integrity,
        values: json!({"events": count, "bytes": mb * 1e6, "seconds": elapsed.as_secs_f64(),
                       "mb_per_second": mb / elapsed.as_secs_f64()}),
    });

    // Resume: Last-Event-ID ten events before the head, again and again.
    let probe = Probe::start(&server);
    let mut latency = client::histogram();
    let mut seen = Vec::new();
    for _ in 0..sizes.resumes {
        let start = Instant::now();
        let mut stream =
            Stream::attach(addr, harness::TOKEN, &finished, Some(count - 11), false).await.expect("attach");
        let read = stream.read(Until::CaughtUp).await.expect("resume");
        latency.record(start.elapsed().as_micros().max(1) as u64).expect("in bounds");
        stream.seen.ended_early |= !read;
        seen.push(stream.seen);
    }
    let usage = probe.finish().await;
    let (mut integrity, _, counts) = merge(seen);
    integrity.short_clients = counts.iter().filter(|c| **c != 10).count() as u64;
    rows.push(Row {
        scenario: "resume",
        case: format!("Last-Event-ID 10 before the head, {} times", sizes.resumes),
        figure: format!("p99 {:.1} ms to caught-up", latency.value_at_quantile(0.99) as f64 / 1000.0),
        latency: Some(latency),
        usage,
        integrity,
        values: json!({"resumes": sizes.resumes}),
    });
}

/// `clients` clients on one session while the stand-in writes `rate`
/// lines a second for `seconds`; with `slow`, one more client that never
/// reads.
async fn fanout(clients: usize, rate: f64, seconds: f64, slow: bool) -> Row {
    let server = start_server();
    let addr = addr(&server);
    let session = server.open_session().await;
    let within = Duration::from_secs_f64(seconds * 20.0 + 120.0);
    let (ready_tx, mut ready) = tokio::sync::mpsc::channel(clients);
    let readers: Vec<_> = (0..clients).map(|_| live_client(addr, session.clone(), ready_tx.clone(), within)).collect();
    for _ in 0..clients {
        tokio::time::timeout(Duration::from_secs(120), ready.recv()).await.expect("clients caught up in time");
    }
    let stalled = if slow {
        Some(client::attach_and_stall(addr, harness::TOKEN, &session).await.expect("the slow client attaches"))
    } else {
        None
    };
    let probe = Probe::start(&server);
    let start = Instant::now();
    server.start_turn(&session, &format!("rate {rate} for {seconds}")).await;
    let mut seen = Vec::new();
    for reader in readers {
        seen.push(reader.await.expect("client"));
    }
    let elapsed = start.elapsed();
    let usage = probe.finish().await;
    drop(stalled);
    let expected = (rate * seconds).round() as u64 + 4;
    let (mut integrity, latency, counts) = merge(seen);
    integrity.short_clients = counts.iter().filter(|c| **c != expected).count() as u64;
    let delivered: u64 = counts.iter().sum();
    Row {
        scenario: if slow { "slow client" } else { "fan-out" },
        case: format!(
            "{clients} clients{}, {rate} events/s for {seconds} s",
            if slow { " + 1 that never reads" } else { "" }
        ),
        figure: format!(
            "p99 {:.1} ms, {} frames/s",
            latency.value_at_quantile(0.99) as f64 / 1000.0,
            report::thousands(delivered as f64 / elapsed.as_secs_f64())
        ),
        latency: Some(latency),
        usage,
        integrity,
        values: json!({"clients": clients, "rate": rate, "seconds": seconds, "events_per_client": expected,
                       "frames_delivered": delivered, "wall_seconds": elapsed.as_secs_f64(),
                       "frames_per_second": delivered as f64 / elapsed.as_secs_f64()}),
    }
}

/// Idle memory, the memory of idle attached clients, and exec to the first
/// `/health` 200.
async fn footprint(sizes: &Sizes, rows: &mut Vec<Row>) {
    let mut to_health = client::histogram();
    let mut idle_kib = 0;
    for i in 0..sizes.starts {
        let start = Instant::now();
        let server = start_server();
        let took = client::first_ok(addr(&server), "/health", Duration::from_secs(30)).await.map(|_| start.elapsed());
        to_health.record(took.expect("/health answered 200").as_micros() as u64).expect("in bounds");
        if i == 0 {
            idle_kib = report::rss_kib(server.pid());
        }
    }
    rows.push(Row {
        scenario: "footprint",
        case: format!("exec to first /health 200, {} starts", sizes.starts),
        figure: format!(
            "median {:.0} ms, max {:.0} ms",
            to_health.value_at_quantile(0.5) as f64 / 1000.0,
            to_health.max() as f64 / 1000.0
        ),
        latency: Some(to_health),
        usage: Usage { rss_kib: idle_kib, peak_rss_kib: idle_kib, ..Usage::default() },
        integrity: report::Integrity::default(),
        values: json!({"starts": sizes.starts}),
    });
    rows.push(Row {
        scenario: "footprint",
        case: "idle server, just started".into(),
        figure: format!("{:.1} MiB resident", idle_kib as f64 / 1024.0),
        latency: None,
        usage: Usage { rss_kib: idle_kib, peak_rss_kib: idle_kib, ..Usage::default() },
        integrity: report::Integrity::default(),
        values: json!({"rss_kib": idle_kib}),
    });

    // Idle attached clients: each caught up on a short session, then quiet.
    let server = start_server();
    let addr = addr(&server);
    let session = server.open_session().await;
    server.start_turn(&session, "flood 10").await;
    let count = wait_idle(&server, &session, Duration::from_secs(60)).await;
    let before = report::rss_kib(server.pid());
    let probe = Probe::start(&server);
    let n = sizes.idle_clients;
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let attaching: Vec<_> = (0..n)
        .map(|_| {
            let (gate, session) = (gate.clone(), session.clone());
            tokio::spawn(async move {
                let _turn = gate.acquire().await.expect("gate");
                let mut stream = Stream::attach(addr, harness::TOKEN, &session, None, false).await.expect("attach");
                let read = stream.read(Until::CaughtUp).await.expect("read");
                stream.seen.ended_early |= !read;
                stream
            })
        })
        .collect();
    let mut streams = Vec::with_capacity(n);
    for attaching in attaching {
        streams.push(attaching.await.expect("client"));
    }
    let fds = server.open_fds();
    let usage = probe.finish().await;
    let per_client = (usage.rss_kib as f64 - before as f64) / n as f64;
    let (mut integrity, _, counts) = merge(streams.into_iter().map(|s| s.seen));
    integrity.short_clients = counts.iter().filter(|c| **c != count).count() as u64;
    rows.push(Row {
        scenario: "footprint",
        case: format!("{n} idle attached clients"),
        figure: format!("{per_client:.1} KiB per client ({:.1} MiB before)", before as f64 / 1024.0),
        latency: None,
        usage,
        integrity,
        values: json!({"clients": n, "rss_before_kib": before, "kib_per_client": per_client, "server_fds": fds}),
    });
}

/// Cancel: from the request to no process of the turn left.
async fn cancel(times: usize) -> Row {
    let server = start_server();
    let mut gone = client::histogram();
    let mut answered = client::histogram();
    let mut turn_end = client::histogram();
    let probe = Probe::start(&server);
    for _ in 0..times {
        let session = server.open_session().await;
        let mut stream = server.attach(&session, None).await;
        stream.until_caught_up().await;
        server.start_turn(&session, "hold").await;
        let pids: Vec<u32> = loop {
            if let Some(harness::Frame::Event { data, .. }) = stream.next().await
                && let Some(words) = data["text"].as_str().and_then(|t| t.strip_prefix("hold pid "))
            {
                break words.split(" child ").map(|p| p.parse().expect("pid")).collect();
            }
        };
        let start = Instant::now();
        let cancel = async {
            let answer = server.cancel(&session).await;
            (answer, start.elapsed())
        };
        // Polled every millisecond (bounded), for a figure finer than the harness's 10 ms.
        let watch = async {
            while pids.iter().any(|p| harness::alive(*p)) {
                assert!(start.elapsed() < harness::DEADLINE, "the turn's processes outlived the cancel");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            start.elapsed()
        };
        let ((answer, answer_took), took) = tokio::join!(cancel, watch);
        answered.record(answer_took.as_micros() as u64).expect("in bounds");
        assert_eq!(answer["cancelled"], true, "{answer}");
        gone.record(took.as_micros().max(1) as u64).expect("in bounds");
        stream.until_turn_end().await;
        turn_end.record(start.elapsed().as_micros() as u64).expect("in bounds");
    }
    let usage = probe.finish().await;
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Row {
        scenario: "cancel",
        case: format!("request to no process of the turn left, {times} turns"),
        figure: format!(
            "median {:.1} ms, max {:.1} ms (answered in {:.1} ms)",
            ms(&gone, 0.5),
            gone.max() as f64 / 1000.0,
            ms(&answered, 0.5)
        ),
        latency: Some(gone),
        usage,
        integrity: report::Integrity::default(),
        values: json!({"turns": times, "answer_median_ms": ms(&answered, 0.5), "answer_max_ms": answered.max() as f64 / 1000.0,
                       "turn_end_median_ms": ms(&turn_end, 0.5)}),
    }
}
