//! The `stagefs-once` tag of a metadata change ([`crate::meta::once`]), taken from the request
//! and handed to the engine for the length of the call.
//!
//! One wrapper around the `Meta` service rather than a line in each handler: every change the
//! engine makes exactly once finds its tag the same way. It sits inside the authentication
//! interceptor, so the caller's tenant is known, and it refuses a tag that names a session the
//! caller does not own (as the handlers refuse such a session id): a client cannot read or spend
//! another's change slots.

use std::sync::Arc;

use tonic::codegen::{http, BoxFuture, Context, Poll, Service};
use tonic::server::NamedService;

use crate::access::Tenant;
use crate::meta::once;
use crate::meta_service::meta_status;
use crate::node::Node;

/// `inner` (the `Meta` server) with each request's change tag in scope.
#[derive(Clone)]
pub struct ChangeTags<S> {
    inner: S,
    node: Arc<Node>,
}

impl<S> ChangeTags<S> {
    pub fn new(inner: S, node: Arc<Node>) -> Self {
        ChangeTags { inner, node }
    }
}

impl<S: NamedService> NamedService for ChangeTags<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> Service<http::Request<B>> for ChangeTags<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(header) = request.headers().get(once::HEADER) else {
            return Box::pin(self.inner.call(request));
        };
        let tag = header
            .to_str()
            .map_err(|_| crate::meta::MetaError::Invalid(format!("{} is not text", once::HEADER)))
            .and_then(once::parse);
        let tenant = request
            .extensions()
            .get::<Arc<Tenant>>()
            .cloned()
            .unwrap_or_else(Tenant::anonymous);
        // The clone is the one made ready by poll_ready; this service keeps a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let node = self.node.clone();
        Box::pin(async move {
            let checked = match tag {
                Ok(tag) => node.session_of(&tenant, tag.session).await.map(|_| tag),
                Err(e) => Err(e),
            };
            match checked {
                Ok(tag) => once::scope(Some(tag), inner.call(request)).await,
                Err(error) => Ok(meta_status(once::HEADER, &error).into_http()),
            }
        })
    }
}
