//! Micro-benchmarks of the three steps every agent line goes through
//! (ARCHITECTURE.md, the pipeline): translating it (`agent::line` and
//! `agent::translate`), encoding its event once and as an SSE frame
//! (`event`, `sse`), and appending it to the log (`log`, `store`).
//!
//! `cargo bench --bench micro` (criterion; `-- translate` runs one group).
//! The load harness (`cargo bench --bench load`) measures the whole server;
//! these say what one step costs, to read its figures against.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use breakglass::agent::line;
use breakglass::agent::translate::Translator;
use breakglass::event::{Event, Stored};
use breakglass::log::Log;
use breakglass::sse;
use breakglass::store::{Durability, Store};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// The `n`th line (from 0) of a recorded transcript, in the real CLI format.
fn transcript_line(name: &str, n: usize) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/transcripts/{name}.jsonl", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("transcript");
    let line = text.lines().nth(n).expect("line").replace("{{session_id}}", "4f9c1b52-2a53-4b0e-9a3e-0c1d2e3f4a5b");
    line.into_bytes()
}

fn translate(c: &mut Criterion) {
    let mut group = c.benchmark_group("translate");
    let cases = [
        ("assistant text", transcript_line("basic", 1)),
        ("assistant tool_use", transcript_line("basic", 2)),
        ("user tool_result", transcript_line("basic", 3)),
        ("stream_event text_delta", transcript_line("real-partial-text", 4)),
        ("system init (real CLI)", transcript_line("real-partial-text", 0)),
    ];
    for (name, raw) in &cases {
        group.throughput(Throughput::Bytes(raw.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), raw, |b, raw| {
            // One translator for the run, as a turn keeps one for its lines.
            let mut translator = Translator::default();
            b.iter(|| {
                let parsed = line::parse(black_box(raw)).expect("an agent line");
                black_box(translator.line(parsed))
            })
        });
    }
    group.finish();
}

fn text_event() -> Event {
    Event::Text {
        text: "Load and memory are normal; devvm is healthy. ".repeat(4),
        message_id: Some("msg_01B".into()),
        index: Some(0),
    }
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    let event = text_event();
    // Done once per appended event: its JSON, shared by every client.
    group.bench_function("event JSON (Stored::new)", |b| b.iter(|| black_box(Stored::new(black_box(41_234), &event))));
    // Done once per event per attached client.
    let stored = Stored::new(41_234, &event);
    group.throughput(Throughput::Bytes(sse::frame(&stored).len() as u64));
    group.bench_function("SSE frame (sse::frame)", |b| b.iter(|| black_box(sse::frame(black_box(&stored)))));
    group.finish();
}

fn append(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let mut group = c.benchmark_group("append");
    group.measurement_time(Duration::from_secs(5));
    for durability in [Durability::Full, Durability::Normal] {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = runtime.block_on(async {
            let store = Arc::new(Store::open(dir.path(), durability).expect("store"));
            let id = store.create_session(uuid::Uuid::new_v4()).await.expect("session").id;
            Log::new(id, store)
        });
        let name = format!("{durability:?}").to_lowercase();
        // One event alone: submitted, committed (one transaction, synced
        // under `full`) and published before the next.
        group.bench_function(BenchmarkId::new("one, committed", &name), |b| {
            b.iter(|| runtime.block_on(log.append(text_event())).expect("append"))
        });
        // Events as a flooding turn submits them: without waiting, so the
        // writer groups them into transactions; the time per event.
        group.bench_function(BenchmarkId::new("submitted back to back", &name), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let start = Instant::now();
                    let mut last = None;
                    for _ in 0..iters {
                        last = Some(log.submit(text_event(), None).await.expect("submit"));
                    }
                    if let Some(last) = last {
                        last.committed().await.expect("committed");
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, translate, encode, append);
criterion_main!(benches);
