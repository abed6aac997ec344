//! Prometheus metrics of the gateway (`serve --metrics-listen ADDR`, text format at `/metrics`,
//! served by `metrics-exporter-prometheus`).
//!
//! Counters and histograms are emitted where things happen: uploads, retries, quarantines and
//! `fdatasync` times by the staging log's counters (which Status reads too), requests per tenant
//! by the authenticating interceptor, bytes per tenant by the services, and every RPC's duration
//! and failure code by [`RpcMetricsLayer`] in front of both services. Gauges (what is staged, the
//! queue, the oldest waiting block) are set from the same snapshot Status answers with, every
//! [`GAUGE_INTERVAL`].
//!
//! Without `--metrics-listen` no recorder is installed and every emission is a no-op.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::codegen::{http, BoxFuture, Context, Poll, Service};

use crate::node::Node;
use crate::tasks::{ticker, Tasks};

/// How often the gauges are set from a fresh snapshot.
pub const GAUGE_INTERVAL: Duration = Duration::from_millis(500);

/// Counters that show, at zero, before their first event.
pub const COUNTERS: &[&str] = &[
    "stagefs_gateway_uploaded_blocks_total",
    "stagefs_gateway_uploaded_bytes_total",
    "stagefs_gateway_upload_retries_total",
    "stagefs_gateway_upload_failures_total",
    "stagefs_gateway_connections_refused_total",
    "stagefs_meta_dir_lease_recalls_total",
    "stagefs_meta_dir_lease_recalls_timed_out_total",
];

/// Sets the gauges from the log's snapshot every [`GAUGE_INTERVAL`].
pub fn start_gauges(node: &Arc<Node>, group: &Tasks) {
    let node = node.clone();
    group.spawn("metrics gauges", move |stop| async move {
        let mut tick = ticker(GAUGE_INTERVAL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tick.tick() => set_gauges(&node),
            }
        }
    });
}

/// How often the per-tenant usage totals are read from the metadata (a scan of a few records
/// per tenant).
pub const USAGE_INTERVAL: Duration = Duration::from_secs(5);

/// Sets `stagefs_tenant_files` and `stagefs_tenant_used_bytes` (label `tenant`) from the
/// metadata's usage totals every [`USAGE_INTERVAL`]: what each tenant owns, whichever gateway
/// wrote it, as a bill would count it.
pub fn start_usage_gauges(node: &Arc<Node>, group: &Tasks) {
    let node = node.clone();
    group.spawn("tenant usage gauges", move |stop| async move {
        let mut tick = ticker(USAGE_INTERVAL);
        let mut shown = std::collections::BTreeSet::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            match node.meta.tenant_usage().await {
                Ok(totals) => {
                    let mut now_shown = std::collections::BTreeSet::new();
                    for t in totals {
                        let label = tenant_label(&t.tenant);
                        metrics::gauge!("stagefs_tenant_files", "tenant" => label.clone())
                            .set(t.files as f64);
                        metrics::gauge!("stagefs_tenant_used_bytes", "tenant" => label.clone())
                            .set(t.bytes as f64);
                        now_shown.insert(label);
                    }
                    // A tenant that owns nothing any more shows zeros, not its last totals.
                    for gone in shown.difference(&now_shown) {
                        metrics::gauge!("stagefs_tenant_files", "tenant" => gone.clone()).set(0.0);
                        metrics::gauge!("stagefs_tenant_used_bytes", "tenant" => gone.clone())
                            .set(0.0);
                    }
                    shown = now_shown;
                }
                // Metrics wait for the next round; nothing else depends on them.
                Err(error) => tracing::warn!(%error, "cannot read the tenants' usage totals"),
            }
        }
    });
}

fn set_gauges(node: &Node) {
    use metrics::gauge;
    let snap = node.log.snapshot();
    gauge!("stagefs_gateway_staged_blocks").set(snap.blocks_staged as f64);
    gauge!("stagefs_gateway_staged_bytes").set(snap.bytes_staged as f64);
    gauge!("stagefs_gateway_upload_queue_blocks").set(snap.queue_len as f64);
    gauge!("stagefs_gateway_oldest_staged_seconds").set(snap.oldest_waiting.as_secs_f64());
    gauge!("stagefs_gateway_quarantined_blocks").set(snap.quarantined.len() as f64);
    gauge!("stagefs_gateway_uploads_paused").set(f64::from(u8::from(snap.uploads_paused)));
    gauge!("stagefs_gateway_healthy").set(f64::from(u8::from(snap.failure.is_none())));
    let sb = &node.log.sb;
    gauge!("stagefs_gateway_device_used_bytes")
        .set(((snap.segments_total - snap.segments_free) * sb.segment_bytes) as f64);
    gauge!("stagefs_gateway_device_bytes").set(sb.device_bytes as f64);
    gauge!("stagefs_gateway_inflight_bytes").set(node.limits.inflight.in_use() as f64);
    gauge!("stagefs_gateway_connections").set(node.limits.connections.open() as f64);
}

/// Counts a request of `tenant` (the name of its token; "anonymous" without `--tokens`).
pub fn count_request(tenant: &str) {
    metrics::counter!("stagefs_tenant_requests_total", "tenant" => tenant_label(tenant))
        .increment(1);
}

/// Counts `bytes` of file data `tenant` wrote to or read from the gateway.
pub fn count_bytes(tenant: &str, direction: &'static str, bytes: u64) {
    metrics::counter!(
        "stagefs_tenant_bytes_total",
        "tenant" => tenant_label(tenant),
        "direction" => direction
    )
    .increment(bytes);
}

pub(crate) fn tenant_label(tenant: &str) -> String {
    if tenant.is_empty() {
        "anonymous".into()
    } else {
        tenant.to_string()
    }
}

/// In front of both services: each RPC's duration (`stagefs_rpc_seconds`, label `method`) and,
/// when it fails, its gRPC code (`stagefs_rpc_errors_total`, labels `method`, `code`). The time is
/// until the answer's headers, and the code is the one they carry: a streaming RPC that fails
/// after answering (in its trailers) counts as answered.
#[derive(Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, B, R> Service<http::Request<B>> for RpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_of(request.uri().path());
        let started = Instant::now();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await;
            let code = match &answer {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .unwrap_or(0),
                Err(_) => tonic::Code::Unknown as i32,
            };
            // Made-up method names would make up label values.
            let method = if code == tonic::Code::Unimplemented as i32 {
                "other".to_string()
            } else {
                method
            };
            metrics::histogram!("stagefs_rpc_seconds", "method" => method.clone())
                .record(started.elapsed().as_secs_f64());
            if code != 0 {
                let code = format!("{:?}", tonic::Code::from_i32(code));
                metrics::counter!("stagefs_rpc_errors_total", "method" => method, "code" => code)
                    .increment(1);
            }
            answer
        })
    }
}

/// `Lookup` of `/stagefs.meta.v1.Meta/Lookup`; anything that is not a gRPC path is "other" (so a
/// client cannot make up label values).
fn method_of(path: &str) -> String {
    match path.rsplit_once('/') {
        Some((service, method))
            if service.starts_with("/stagefs.")
                && !method.is_empty()
                && method.len() <= 64
                && method.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            method.to_string()
        }
        _ => "other".into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn method_labels_come_from_grpc_paths_only() {
        assert_eq!(super::method_of("/stagefs.meta.v1.Meta/Lookup"), "Lookup");
        assert_eq!(
            super::method_of("/stagefs.staging.v1.Staging/WriteBlock"),
            "WriteBlock"
        );
        assert_eq!(super::method_of("/evil/x"), "other");
        assert_eq!(
            super::method_of(&format!("/stagefs.x/{}", "a".repeat(100))),
            "other"
        );
    }
}
