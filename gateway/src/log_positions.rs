//! Where the metadata's log stood after a call (`stagefs-log-position`), for a mirror to wait on.
//!
//! A caller that asks (request header [`WANT`]) gets, with the answer to any `Meta` call, a
//! position at or after every change the call committed ([`MetaEngine::log_position`]: the
//! WAL position on PostgreSQL). A gateway of a mirror region, having sent a change here, waits
//! until its hot standby has applied the log that far ([`MetaEngine::wait_position`]) before it
//! answers its own client, so that client reads its own writes in the mirror. One wrapper around
//! the `Meta` service, and only on request: callers that do not ask pay nothing.
//!
//! [`MetaEngine::log_position`]: crate::meta::MetaEngine::log_position
//! [`MetaEngine::wait_position`]: crate::meta::MetaEngine::wait_position

use std::sync::Arc;

use tonic::codegen::{http, BoxFuture, Context, Poll, Service};
use tonic::server::NamedService;

use crate::node::Node;

/// Request header: answer with the log position.
pub const WANT: &str = "stagefs-want-log-position";
/// Response header: the log position, a decimal number (absent on a backend without replicas).
pub const POSITION: &str = "stagefs-log-position";

/// `inner` (the `Meta` server), answering with the log position when asked.
#[derive(Clone)]
pub struct LogPositions<S> {
    inner: S,
    node: Arc<Node>,
}

impl<S> LogPositions<S> {
    pub fn new(inner: S, node: Arc<Node>) -> Self {
        LogPositions { inner, node }
    }
}

impl<S: NamedService> NamedService for LogPositions<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> Service<http::Request<B>> for LogPositions<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if !request.headers().contains_key(WANT) {
            return Box::pin(self.inner.call(request));
        }
        let node = self.node.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            // Taken once the call is done: at or after anything it committed.
            match node.meta.log_position().await {
                Ok(Some(position)) => {
                    response.headers_mut().insert(
                        POSITION,
                        http::HeaderValue::from_str(&position.to_string())
                            .expect("a decimal number is a valid header value"),
                    );
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%error, "the metadata's log position could not be read");
                }
            }
            Ok(response)
        })
    }
}
