//! `GET /metrics` (README "Metrics"): the server's counters in the
//! Prometheus text format, or in OpenMetrics' when the scraper asks for it.
//!
//! The families are named here, once, at start-up: each module keeps its
//! own counters (shared atomics it bumps where things happen) and this one
//! registers them; what is only known at the moment of a scrape (tool calls
//! waiting, push subscriptions, counters kept as plain atomics) is read
//! then by [`Readings`]. The `prometheus-client` crate writes the text.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use super::AppState;
use crate::approval::Approvals;
use crate::notify::{ChannelName, Counts, Notifier};

/// OpenMetrics' content type (OpenMetrics 1.0, "Text format").
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every family of `/metrics`, with the counters behind them.
pub fn registry(state: &AppState) -> Registry {
    let mut registry = Registry::default();
    let turns = state.sessions.turn_counters();
    registry.register(
        "breakglass_turns_started",
        "Turns started (a prompt logged and its agent asked to run)",
        turns.started.clone(),
    );
    registry.register(
        "breakglass_turns_ended",
        "Turns ended, by how: completed, no-result, failed, timed-out, cancelled, shutdown, cannot-start, log-failed, internal",
        turns.ended.clone(),
    );
    registry.register_with_unit(
        "breakglass_turn_duration",
        "Time from a turn's prompt to its end in the log",
        Unit::Seconds,
        turns.duration.clone(),
    );
    let store = state.sessions.store().counters();
    registry.register(
        "breakglass_events_appended",
        "Events committed to sessions' logs",
        store.events_appended.clone(),
    );
    registry.register(
        "breakglass_storage_write_failures",
        "Writes the storage could not make, by error: full (the disk), damaged (the database file), failed (any other SQLite error)",
        store.write_failures.clone(),
    );
    registry.register(
        "breakglass_storage_writer_failures",
        "Times the storage writer died (the server then stops)",
        store.writer_died.clone(),
    );
    registry.register(
        "breakglass_attached_clients",
        "Attach streams open now, by stream: session or operation",
        state.streams.attached.clone(),
    );
    registry.register(
        "breakglass_replay_bytes",
        "Bytes of events sent to session streams from the log rather than live (replays on attach and resume, catch-up after lag)",
        state.streams.replay_bytes.clone(),
    );
    registry.register(
        "breakglass_approvals_decided",
        "Tool calls decided after waiting for the operator, by decision (allow, deny) and by whom (operator, timeout, turn-ended, restart)",
        state.sessions.approvals().decided().clone(),
    );
    registry.register(
        "breakglass_verbs",
        "Power verbs run to their end, by target, verb and outcome (succeeded, failed), as operations or through /api/pve",
        state.power.verb_counts().clone(),
    );
    registry.register_collector(Box::new(Readings {
        audit_failures: state.audit_failures.clone(),
        approvals: state.sessions.approvals().clone(),
        notifier: state.notifier.clone(),
    }));
    registry
}

/// Prometheus text format (0.0.4), or OpenMetrics when the `Accept` header
/// names it (Prometheus asks for it first). No auth: counts only, nothing
/// about sessions (README "API").
pub async fn scrape(State(registry): State<Arc<Registry>>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|accept| accept.contains("application/openmetrics-text"));
    let mut body = String::with_capacity(8 * 1024);
    let (encoded, content_type) = if openmetrics {
        (prometheus_client::encoding::text::encode(&mut body, &registry), OPENMETRICS)
    } else {
        (
            prometheus_client::encoding::prometheus_text::encode(&mut body, &registry),
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )
    };
    // Writing into a String fails only on a bug in an encoder.
    if let Err(err) = encoded {
        tracing::error!(%err, "could not encode the metrics");
        return super::error::ApiError::Internal("could not encode the metrics".into()).into_response();
    }
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// What is read at each scrape from where it is kept: counters kept as
/// plain atomics by their owners, and gauges that are a count of something
/// held now.
struct Readings {
    /// Audit records that could not be written (README "The audit trail").
    audit_failures: Arc<AtomicU64>,
    approvals: Arc<Approvals>,
    notifier: Arc<Notifier>,
}

impl std::fmt::Debug for Readings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readings").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for Readings {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut counter = |name: &str, help: &str, value: u64| {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
        };
        counter(
            "breakglass_audit_failures",
            "Audit records that could not be written.",
            self.audit_failures.load(Ordering::Relaxed),
        )?;
        counter(
            "breakglass_log_lines_dropped",
            "Log lines dropped because stderr could not keep up.",
            crate::logging::dropped_lines(),
        )?;
        let stats = self.notifier.stats();
        counter(
            "breakglass_notifications_dropped",
            "Notifications dropped because the queue was full.",
            stats.dropped.load(Ordering::Relaxed),
        )?;
        counter(
            "breakglass_push_subscriptions_pruned",
            "Push subscriptions removed because their push service said they are gone.",
            stats.pruned.load(Ordering::Relaxed),
        )?;
        let sent: fn(&Counts) -> &AtomicU64 = |counts| &counts.sent;
        let failed: fn(&Counts) -> &AtomicU64 = |counts| &counts.failed;
        let by_channel = [
            (
                "breakglass_notifications_sent",
                "Notifications delivered, by channel (a push note counts once per subscription).",
                sent,
            ),
            ("breakglass_notifications_failed", "Notifications that could not be delivered, by channel.", failed),
        ];
        for (name, help, which) in by_channel {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for channel in ChannelName::ALL {
                let value = which(stats.of(channel)).load(Ordering::Relaxed);
                ConstCounter::new(value).encode(family.encode_family(&[("channel", channel.as_str())])?)?;
            }
        }
        let mut gauge = |name: &str, help: &str, value: i64| {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
        };
        let subscriptions = self.notifier.push().map_or(0, |push| push.subscription_count());
        gauge("breakglass_push_subscriptions", "Push subscriptions kept now.", saturating(subscriptions))?;
        gauge(
            "breakglass_approvals_pending",
            "Tool calls waiting for the operator now.",
            saturating(self.approvals.waiting()),
        )?;
        Ok(())
    }
}

fn saturating(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}
