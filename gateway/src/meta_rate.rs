//! Fair use of the metadata service (`--meta-ops-per-client`, `--meta-ops-per-tenant`): each
//! client connection, and with `--tokens` each tenant over all its connections, may make so many
//! metadata calls per second, with a burst of one second's worth; a call past it waits rather
//! than fails, so a scan of the whole tree (`updatedb`, `find`, `ls -R`) slows itself
//! down instead of everyone else. Session upkeep (`OpenSession`, `Heartbeat`, `CloseSession`)
//! is never held back: a delayed heartbeat would expire its session. The time calls waited is
//! recorded per tenant in `stagefs_meta_throttled_seconds` (a histogram: its sum is the total).
//!
//! A layer in front of both services, so it sees the connection a call came on; the tenant is
//! read from the call's token the way the authentication interceptor reads it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::codegen::{http, BoxFuture, Context, Poll, Service};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::access::Tokens;

/// Calls that keep a session alive or end it: never delayed.
const EXEMPT: &[&str] = &["OpenSession", "Heartbeat", "CloseSession"];

/// Connections whose buckets are kept; past it, buckets idle for a minute are dropped.
const MAX_BUCKETS: usize = 16 * 1024;

/// One connection's allowance: tokens (calls) left, refilled at the rate up to one second's worth.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A rate per key (a connection, a tenant), shared by every clone of the layer's service.
pub struct MetaRate<K> {
    per_second: f64,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: std::hash::Hash + Eq + Clone> MetaRate<K> {
    pub fn new(per_second: u32) -> MetaRate<K> {
        MetaRate {
            per_second: f64::from(per_second.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one call of `client`'s allowance; how long the call must wait for it.
    pub fn delay(&self, client: &K, now: Instant) -> Duration {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(client) {
            buckets.retain(|_, b| now.saturating_duration_since(b.at) < Duration::from_secs(60));
            // Still full (clients that keep reconnecting): the longest idle goes.
            if buckets.len() >= MAX_BUCKETS {
                let oldest = buckets
                    .iter()
                    .min_by_key(|(_, b)| b.at)
                    .map(|(key, _)| key.clone());
                if let Some(oldest) = oldest {
                    buckets.remove(&oldest);
                }
            }
        }
        let burst = self.per_second;
        let bucket = buckets.entry(client.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * self.per_second;
        bucket.tokens = (bucket.tokens + refill).min(burst) - 1.0;
        bucket.at = now;
        if bucket.tokens >= 0.0 {
            Duration::ZERO
        } else {
            // Reserved already: calls that come meanwhile queue behind this one.
            Duration::from_secs_f64(-bucket.tokens / self.per_second)
        }
    }
}

/// The layer; a `None` rate: no limit of that kind.
#[derive(Clone)]
pub struct MetaRateLayer {
    per_client: Option<Arc<MetaRate<SocketAddr>>>,
    per_tenant: Option<Arc<MetaRate<String>>>,
    tokens: Arc<Tokens>,
}

impl MetaRateLayer {
    /// Rates in calls per second, 0 for none; the tenant rate applies with `--tokens` only.
    pub fn new(per_client: u32, per_tenant: u32, tokens: Arc<Tokens>) -> MetaRateLayer {
        MetaRateLayer {
            per_client: (per_client > 0).then(|| Arc::new(MetaRate::new(per_client))),
            per_tenant: (per_tenant > 0 && tokens.required())
                .then(|| Arc::new(MetaRate::new(per_tenant))),
            tokens,
        }
    }

    /// The tenant label of a call, from its token.
    fn tenant<B>(&self, request: &http::Request<B>) -> String {
        self.tokens
            .authenticate(
                request
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .map(|v| v.as_bytes()),
            )
            .map(|tenant| crate::telemetry::tenant_label(&tenant.name))
            .unwrap_or_else(|_| "unauthenticated".into())
    }
}

impl<S> tower_layer::Layer<S> for MetaRateLayer {
    type Service = MetaRateLimited<S>;

    fn layer(&self, inner: S) -> MetaRateLimited<S> {
        MetaRateLimited {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct MetaRateLimited<S> {
    inner: S,
    layer: MetaRateLayer,
}

/// Whether a call of this gRPC path counts against the rate: metadata calls other than session
/// upkeep.
fn is_limited(path: &str) -> bool {
    path.starts_with("/stagefs.meta.")
        && !EXEMPT.iter().any(|m| path.rsplit('/').next() == Some(*m))
}

/// The connection a call came on (plaintext or TLS).
fn client_of<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|tls| tls.get_ref().remote_addr())
        })
}

impl<S, B, R> Service<http::Request<B>> for MetaRateLimited<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let layer = &self.layer;
        let mut delay = Duration::ZERO;
        let mut tenant = None;
        if is_limited(request.uri().path()) {
            let now = Instant::now();
            if let (Some(rate), Some(client)) = (&layer.per_client, client_of(&request)) {
                delay = rate.delay(&client, now);
            }
            if let Some(rate) = &layer.per_tenant {
                let name = layer.tenant(&request);
                delay = delay.max(rate.delay(&name, now));
                tenant = Some(name);
            }
        }
        if delay.is_zero() {
            return Box::pin(self.inner.call(request));
        }
        let tenant = tenant.unwrap_or_else(|| layer.tenant(&request));
        metrics::histogram!("stagefs_meta_throttled_seconds", "tenant" => tenant)
            .record(delay.as_secs_f64());
        // The clone is the one made ready by poll_ready; this service keeps a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            inner.call(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_calls_count_and_session_upkeep_does_not() {
        assert!(is_limited("/stagefs.meta.v1.Meta/GetAttr"));
        assert!(is_limited("/stagefs.meta.v1.Meta/ReadDir"));
        for exempt in ["Heartbeat", "OpenSession", "CloseSession"] {
            assert!(!is_limited(&format!("/stagefs.meta.v1.Meta/{exempt}")));
        }
        assert!(!is_limited("/stagefs.staging.v1.Staging/WriteBlocks"));
    }

    #[test]
    fn a_burst_passes_then_calls_wait_their_turn_and_clients_are_apart() {
        let rate = MetaRate::<SocketAddr>::new(100);
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(rate.delay(&a, now), Duration::ZERO, "the burst");
        }
        let first = rate.delay(&a, now);
        let second = rate.delay(&a, now);
        assert!(
            first > Duration::ZERO && second > first,
            "{first:?} {second:?}"
        );
        let gap = (second - first).as_secs_f64();
        assert!((gap - 0.01).abs() < 1e-6, "one call per 10 ms: {gap}");
        assert_eq!(
            rate.delay(&b, now),
            Duration::ZERO,
            "another client has its own"
        );
        // A second later the allowance is back, up to the burst.
        let later = now + Duration::from_secs(5);
        assert_eq!(rate.delay(&a, later), Duration::ZERO);
    }
}
