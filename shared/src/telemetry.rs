//! The Prometheus exporter both programs serve (`--metrics-listen ADDR`, text format at
//! `/metrics`): `metrics-exporter-prometheus` behind the `metrics` facade, so code emits metrics
//! where things happen and a process without the flag pays nothing.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Histogram buckets of every `*_seconds` metric: 100 µs to 30 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Installs the recorder and serves it on `listen`; must run inside a tokio runtime, which then
/// carries the listener. `counters` show (at zero) before anything counted them.
pub fn install(listen: SocketAddr, counters: &[&'static str]) -> Result<(), String> {
    let recorder = PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .map_err(|e| e.to_string())?;
    recorder
        .install()
        .map_err(|e| format!("cannot serve metrics on {listen}: {e}"))?;
    for &name in counters {
        metrics::counter!(name).increment(0);
    }
    Ok(())
}
