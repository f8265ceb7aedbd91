//! What the harness reads of processes (`/proc`) and how it reports: one
//! table for people, the same rows as JSON.

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Resident memory of a process now (`VmRSS` in `/proc/<pid>/status`), KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds a process has used (user + system, `/proc/<pid>/stat`
/// fields 14 and 15, in clock ticks of 1/100 s on Linux).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let Some((_, rest)) = stat.rsplit_once(") ") else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// The machine the figures were taken on: cores, memory and load.
pub fn machine() -> Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({"cores": cores, "mem_total_kib": mem_total_kib,
           "loadavg": load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")})
}

/// The server's (and the harness's) use of the machine over a stretch.
#[derive(Debug, Default, Clone, Copy)]
pub struct Usage {
    pub server_cpu_s: f64,
    pub harness_cpu_s: f64,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
}

/// What the streams of a scenario lost or repeated.
#[derive(Debug, Default, Clone, Copy)]
pub struct Integrity {
    pub gaps: u64,
    pub duplicates: u64,
    /// The stand-in's sequence numbers out of order at a client.
    pub seq_breaks: u64,
    /// Streams that ended (or timed out) before their end mark.
    pub cut_short: u64,
    /// Streams (or logs) that got another number of events than the turn had.
    pub short_clients: u64,
}

pub struct Row {
    pub scenario: &'static str,
    pub case: String,
    /// The scenario's headline, in words.
    pub figure: String,
    /// Latencies in µs, when the scenario has them.
    pub latency: Option<Histogram<u64>>,
    pub usage: Usage,
    pub integrity: Integrity,
    /// The scenario's own numbers.
    pub values: Value,
}

impl Row {
    pub fn intact(&self) -> bool {
        let i = &self.integrity;
        i.gaps + i.duplicates + i.seq_breaks + i.cut_short + i.short_clients == 0
    }

    pub fn integrity(&self) -> String {
        let i = &self.integrity;
        format!(
            "{} gaps, {} duplicates, {} sequence breaks, {} streams cut short, {} with a wrong count",
            i.gaps, i.duplicates, i.seq_breaks, i.cut_short, i.short_clients
        )
    }

    pub fn to_json(&self) -> Value {
        let ms = |v: u64| v as f64 / 1000.0;
        json!({
            "scenario": self.scenario,
            "case": self.case,
            "figure": self.figure,
            "latency_ms": self.latency.as_ref().map(|h| json!({
                "count": h.len(), "p50": ms(h.value_at_quantile(0.5)), "p99": ms(h.value_at_quantile(0.99)),
                "p999": ms(h.value_at_quantile(0.999)), "max": ms(h.max()),
            })),
            "server_cpu_seconds": self.usage.server_cpu_s,
            "harness_cpu_seconds": self.usage.harness_cpu_s,
            "server_rss_kib": self.usage.rss_kib,
            "server_peak_rss_kib": self.usage.peak_rss_kib,
            "gaps": self.integrity.gaps,
            "duplicates": self.integrity.duplicates,
            "sequence_breaks": self.integrity.seq_breaks,
            "streams_cut_short": self.integrity.cut_short,
            "wrong_counts": self.integrity.short_clients,
            "values": self.values,
        })
    }
}

/// 71234.5 as "71 235".
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// The rows as a Markdown table (docs/PERFORMANCE.md takes it as printed).
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | case | figure | p50 ms | p99 ms | max ms | server CPU s | harness CPU s | RSS MiB (peak) | ids |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    let ms = |v: u64| format!("{:.1}", v as f64 / 1000.0);
    for row in rows {
        let (p50, p99, max) = match &row.latency {
            Some(h) => (ms(h.value_at_quantile(0.5)), ms(h.value_at_quantile(0.99)), ms(h.max())),
            None => ("".into(), "".into(), "".into()),
        };
        let mib = |kib: u64| kib as f64 / 1024.0;
        out.push_str(&format!(
            "| {} | {} | {} | {p50} | {p99} | {max} | {:.2} | {:.2} | {:.1} ({:.1}) | {} |\n",
            row.scenario,
            row.case,
            row.figure,
            row.usage.server_cpu_s,
            row.usage.harness_cpu_s,
            mib(row.usage.rss_kib),
            mib(row.usage.peak_rss_kib),
            if row.intact() { "ok".to_owned() } else { row.integrity() },
        ));
    }
    out
}
