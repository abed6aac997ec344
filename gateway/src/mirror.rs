//! A gateway of a mirror region (`serve --source`): metadata reads from a hot standby here,
//! every change sent to the source region's gateways.
//!
//! Why the gateway forwards (and not the client, as JuiceFS's mirror does): a mount then needs
//! one address and no knowledge of regions, the source is reached over one long-lived
//! connection per mirror gateway instead of one per mount, and the wait for replay happens next
//! to the standby, which is the only party that can tell when it is done. The cost is one extra
//! hop inside the mirror region.
//!
//! Read-your-writes: a forwarded change asks the source for its log position
//! ([`crate::log_positions`]) and is answered here only once the standby has replayed that far
//! ([`MetaEngine::wait_position`]), so the client that made it reads it back from this mirror at
//! once. Other clients of the mirror see the source's changes within the replication lag.
//!
//! The request is forwarded as it came (its token included: the source authenticates and
//! confines the caller again, so both regions must serve the same tokens file); this gateway
//! authenticates it first like any other request.
//!
//! [`MetaEngine::wait_position`]: crate::meta::MetaEngine::wait_position

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Context, Poll, Service};
use tonic::server::NamedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::log_positions;
use crate::meta::{DeletedSlice, GatewayId, GatewayLoad, MetaEngine, MetaError};
use crate::node::workers::GatewayRecords;
use crate::node::Node;
use shared::error_chain;

/// `Meta` calls answered from this region's standby; every other one changes something (or, for
/// `GetLock`, must see locks as they are now) and goes to the source.
const LOCAL_READS: &[&str] = &[
    "Lookup",
    "GetAttr",
    "Readlink",
    "ReadDir",
    "GetXattr",
    "ListXattr",
    "StatFs",
    "DirUsage",
    "ReadChunk",
    "ListGateways",
    "ListMounts",
    // The source's database is PostgreSQL, which makes every namespace change durable before
    // answering it (`--namespace-sync` applies to the embedded metadata only): nothing is left
    // for a sync to wait for, and a close need not pay a round trip to the source for it.
    "Sync",
];

/// How long a forwarded change waits for the standby to replay it: below the clients' own
/// 30-second deadline for a metadata call, so they hear why rather than a bare timeout.
pub const REPLAY_WAIT: Duration = Duration::from_secs(20);

/// How long a change keeps trying to reach a source gateway before it fails: rides out a
/// reconnection, not an outage.
const SOURCE_WAIT: Duration = Duration::from_secs(2);

/// Largest request forwarded: a `WriteSlice` with its block, and the gRPC frame around it.
const MAX_FORWARDED_BYTES: usize = proto::MAX_MESSAGE_BYTES + 1024;

/// Whether the `Meta` method of request path `path` (`/stagefs.meta.v1.Meta/Lookup`) is served
/// from the standby.
pub fn is_local_read(path: &str) -> bool {
    let method = path.rsplit('/').next().unwrap_or_default();
    LOCAL_READS.contains(&method)
}

/// The source region's gateways, tried in order: the first that answers takes the change.
#[derive(Clone)]
pub struct Source {
    gateways: Arc<Vec<(String, Channel)>>,
}

impl Source {
    /// Lazy connections to `addresses` (`host:port`, or `http://`/`https://` URLs), over TLS
    /// trusting `ca_pem` when given.
    pub fn new(addresses: &[String], ca_pem: Option<&[u8]>) -> anyhow::Result<Source> {
        anyhow::ensure!(!addresses.is_empty(), "--source names no gateway");
        let mut gateways = Vec::new();
        for address in addresses {
            let url = match (address.split_once("://"), ca_pem) {
                (Some(_), _) => address.clone(),
                (None, Some(_)) => format!("https://{address}"),
                (None, None) => format!("http://{address}"),
            };
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| anyhow::anyhow!("--source {url:?}: {e}"))?;
            if let Some(ca) = ca_pem {
                endpoint = endpoint
                    .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
                    .map_err(|e| anyhow::anyhow!("TLS settings for --source {url}: {e}"))?;
            }
            let channel = endpoint
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20))
                .initial_stream_window_size(Some(proto::STREAM_WINDOW_BYTES))
                .initial_connection_window_size(Some(proto::CONNECTION_WINDOW_BYTES))
                .connect_lazy();
            gateways.push((url, channel));
        }
        Ok(Source {
            gateways: Arc::new(gateways),
        })
    }

    pub fn addresses(&self) -> Vec<String> {
        self.gateways.iter().map(|(url, _)| url.clone()).collect()
    }

    /// Sends `request` (its body already read: `body`) to the first source gateway that takes
    /// it. A gateway that cannot be reached is passed over; one that answers, with any status,
    /// has the last word.
    async fn send(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
    ) -> Result<http::Response<Body>, tonic::Status> {
        let mut failures = Vec::new();
        let deadline = std::time::Instant::now() + SOURCE_WAIT;
        let mut pause = Duration::from_millis(100);
        loop {
            match self.send_once(parts, body.clone(), &mut failures).await {
                Some(response) => return Ok(response),
                None if std::time::Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                None => break,
            }
        }
        failures.dedup();
        let message = format!(
            "this is a mirror gateway and no gateway of the source region took the change \
             (changes fail until one can be reached; reads go on): {}",
            failures.join("; ")
        );
        // Final for the client: an errno, so that it does not send the change elsewhere (the
        // source's gateways are as far from it as from here) or wait for a takeover.
        Err(crate::meta_service::errno_status(
            tonic::Code::Unavailable,
            libc::EROFS,
            message,
        ))
    }

    /// One try at each source gateway in turn; `None` if none could be reached.
    async fn send_once(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
        failures: &mut Vec<String>,
    ) -> Option<http::Response<Body>> {
        for (url, channel) in self.gateways.iter() {
            let mut request =
                http::Request::new(Body::new(http_body_util::Full::new(body.clone())));
            *request.method_mut() = parts.method.clone();
            *request.uri_mut() = parts.uri.clone();
            *request.version_mut() = parts.version;
            *request.headers_mut() = parts.headers.clone();
            request
                .headers_mut()
                .insert(log_positions::WANT, http::HeaderValue::from_static("1"));
            let mut channel = channel.clone();
            match std::future::poll_fn(|cx| channel.poll_ready(cx)).await {
                Ok(()) => match channel.call(request).await {
                    Ok(response) => return Some(response),
                    Err(error) => failures.push(format!("{url}: {}", error_chain(&error))),
                },
                Err(error) => failures.push(format!("{url}: {}", error_chain(&error))),
            }
        }
        None
    }
}

/// A mirror gateway's own registration, kept in the source region's registry through the first
/// source gateway that answers (`RegisterGateway`, `GatewayHeartbeat`), with the mirror's own
/// token (`--source-token-file`) when the source requires one.
pub struct SourceRecords {
    source: Source,
    token: Option<String>,
}

impl SourceRecords {
    pub fn new(source: Source, token: Option<String>) -> SourceRecords {
        SourceRecords { source, token }
    }

    fn request<T>(&self, message: T) -> Result<tonic::Request<T>, MetaError> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(SOURCE_CALL_TIMEOUT);
        if let Some(token) = &self.token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| MetaError::Invalid("--source-token-file: not a valid token".into()))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }

    /// `call` with `message` on each source gateway in turn until one answers; what the last
    /// one said if none did. An answer with an error status is the answer.
    async fn first_answer<M, T, F, Fut>(&self, message: M, mut call: F) -> Result<T, MetaError>
    where
        M: Clone,
        F: FnMut(proto::meta::meta_client::MetaClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut failures = Vec::new();
        for (url, channel) in self.source.gateways.iter() {
            let client = proto::meta::meta_client::MetaClient::new(channel.clone());
            match call(client, self.request(message.clone())?).await {
                Ok(answer) => return Ok(answer.into_inner()),
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ) =>
                {
                    failures.push(format!("{url}: {}", status.message()))
                }
                Err(status) if status.message().starts_with("fenced") => {
                    return Err(MetaError::Fenced {
                        id: uuid::Uuid::nil(),
                        epoch: 0,
                        current: 0,
                    })
                }
                Err(status) => {
                    return Err(MetaError::Invalid(format!(
                        "{url}: {}",
                        shared::clip(status.message(), shared::MAX_ERROR_MESSAGE_BYTES)
                    )))
                }
            }
        }
        Err(MetaError::Backend(crate::meta::KvError::Unavailable(
            format!(
                "no gateway of the source region answered: {}",
                failures.join("; ")
            ),
        )))
    }
}

/// Deadline of one registry call to the source region.
const SOURCE_CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[tonic::async_trait]
impl GatewayRecords for SourceRecords {
    async fn register(&self, id: GatewayId, address: &str) -> Result<u64, MetaError> {
        let message = proto::meta::RegisterGatewayRequest {
            id: Bytes::copy_from_slice(&id),
            address: address.to_string(),
            mirror: true,
        };
        let answer = self
            .first_answer(message, |mut client, request| async move {
                client.register_gateway(request).await
            })
            .await?;
        Ok(answer.epoch)
    }

    async fn heartbeat(
        &self,
        id: GatewayId,
        epoch: u64,
        load: GatewayLoad,
    ) -> Result<(), MetaError> {
        let message = proto::meta::GatewayHeartbeatRequest {
            id: Bytes::copy_from_slice(&id),
            epoch,
            staged_blocks: load.staged_blocks,
            staged_bytes: load.staged_bytes,
            queue_len: load.queue_len,
            oldest_waiting_ms: load.oldest_waiting_ms,
            healthy: load.healthy,
            mirror: load.mirror,
        };
        self.first_answer(message, |mut client, request| async move {
            client.gateway_heartbeat(request).await
        })
        .await?;
        Ok(())
    }

    fn mirror(&self) -> bool {
        true
    }

    async fn take_deleted(
        &self,
        id: GatewayId,
        limit: usize,
    ) -> Result<Vec<DeletedSlice>, MetaError> {
        let message = proto::meta::TakeDeletedSlicesRequest {
            gateway_id: Bytes::copy_from_slice(&id),
            limit: limit.min(u32::MAX as usize) as u32,
        };
        let answer = self
            .first_answer(message, |mut client, request| async move {
                client.take_deleted_slices(request).await
            })
            .await?;
        Ok(answer
            .slices
            .into_iter()
            .map(|s| DeletedSlice {
                slice_id: s.slice_id,
                len: s.len,
                gateway_id: id,
                due_ns: s.due_ns,
            })
            .collect())
    }

    async fn ack_deleted(&self, slice_ids: &[u64]) -> Result<(), MetaError> {
        let message = proto::meta::AckDeletedSlicesRequest {
            slice_ids: slice_ids.to_vec(),
        };
        self.first_answer(message, |mut client, request| async move {
            client.ack_deleted_slices(request).await
        })
        .await?;
        Ok(())
    }
}

/// `inner` (this gateway's `Meta` server, on the standby) for reads; the source for the rest.
/// Without a source (not a mirror), `inner` for everything.
#[derive(Clone)]
pub struct Forward<S> {
    inner: S,
    source: Option<Source>,
    meta: Arc<dyn MetaEngine>,
    /// Stages the blocks of this region's `WriteSlice` calls.
    node: Arc<Node>,
}

impl<S> Forward<S> {
    pub fn new(inner: S, source: Option<Source>, node: Arc<Node>) -> Self {
        Forward {
            inner,
            source,
            meta: node.meta.clone(),
            node,
        }
    }
}

impl<S: NamedService> NamedService for Forward<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Forward<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let Some(source) = self
            .source
            .clone()
            .filter(|_| !is_local_read(request.uri().path()))
        else {
            return Box::pin(self.inner.call(request));
        };
        let meta = self.meta.clone();
        let node = self.node.clone();
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let started = std::time::Instant::now();
            let method = request
                .uri()
                .path()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .chars()
                .take(64)
                .collect::<String>();
            let answer = if method == "WriteSlice" {
                // The block is staged here, in this region; only its pending record and commit
                // cross to the source, in one call.
                write_slice_here(&source, meta.as_ref(), &node, request)
                    .await
                    .map_err(Failed::Refused)
            } else {
                forward(&source, meta.as_ref(), request).await
            };
            let answer = match answer {
                Err(Failed::Unreachable(status, request)) if method == "Open" => {
                    // Reading goes on without the source: the open is answered here, unrecorded
                    // (the file is not pinned against an unlink in the source region; its data
                    // stays for --deleted-data-delay there, so this reader still gets it).
                    tracing::info!(
                        message = status.message(),
                        "the source cannot be reached: an open answered by the mirror"
                    );
                    return inner.call(*request).await;
                }
                Err(Failed::Unreachable(status, _)) | Err(Failed::Refused(status)) => Err(status),
                Ok(response) => Ok(response),
            };
            let outcome = if answer.is_ok() { "ok" } else { "failed" };
            metrics::histogram!("stagefs_mirror_forward_seconds", "outcome" => outcome)
                .record(started.elapsed().as_secs_f64());
            Ok(answer.unwrap_or_else(|status| {
                tracing::warn!(%method, code = ?status.code(), message = status.message(), "a forwarded change failed");
                status.into_http()
            }))
        })
    }
}

/// A mount's `WriteSlice`: its block staged on this gateway (checked as the source would check
/// it: the session is the caller's and holds the slice id), then the same request without the
/// data sent to the source as `CommitStagedSlice`, which records the slice and commits it, and
/// answered once the standby replayed that.
async fn write_slice_here(
    source: &Source,
    meta: &dyn MetaEngine,
    node: &Node,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, tonic::Status> {
    use prost::Message;
    let tenant = crate::access::tenant_in(request.extensions());
    if !tenant.may_write() {
        return Err(tonic::Status::permission_denied(format!(
            "WriteSlice: token {:?} is read-only",
            shared::clip(&tenant.name, 256)
        )));
    }
    let (mut parts, body) = request.into_parts();
    let body = http_body_util::Limited::new(body, MAX_FORWARDED_BYTES)
        .collect()
        .await
        .map_err(|e| tonic::Status::invalid_argument(format!("reading the request: {e}")))?
        .to_bytes();
    // One gRPC message: a flag byte (0: not compressed), its length, then the message.
    let message = match body.first() {
        Some(0) if body.len() >= 5 => body.slice(5..),
        _ => {
            return Err(tonic::Status::invalid_argument(
                "WriteSlice: one uncompressed gRPC message expected",
            ))
        }
    };
    let mut write = proto::meta::WriteSliceRequest::decode(message)
        .map_err(|e| tonic::Status::invalid_argument(format!("WriteSlice: {e}")))?;
    let commit = write
        .commit
        .as_ref()
        .ok_or_else(|| tonic::Status::invalid_argument("WriteSlice: no commit"))?;
    let slice = crate::meta_service::convert::slice_from_proto(commit.slice.as_ref(), "WriteSlice")
        .map_err(|e| crate::meta_service::meta_status("WriteSlice", &e))?;
    node.stage_slice_here(
        &tenant,
        &commit.session_id,
        &slice,
        &write.data,
        write.crc32c,
    )
    .await
    .map_err(|e| crate::meta_service::node_status("WriteSlice", e))?;
    write.data = Bytes::new();
    let encoded = write.encode_to_vec();
    let mut framed = Vec::with_capacity(5 + encoded.len());
    framed.push(0);
    framed.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    framed.extend_from_slice(&encoded);
    let mut uri = parts.uri.clone().into_parts();
    uri.path_and_query = Some(http::uri::PathAndQuery::from_static(
        "/stagefs.meta.v1.Meta/CommitStagedSlice",
    ));
    parts.uri = http::Uri::from_parts(uri)
        .map_err(|e| tonic::Status::internal(format!("CommitStagedSlice: {e}")))?;
    parts.headers.remove(http::header::CONTENT_LENGTH);
    let commit = http::Request::from_parts(
        parts,
        Body::new(http_body_util::Full::new(Bytes::from(framed))),
    );
    match forward(source, meta, commit).await {
        Ok(response) => Ok(response),
        Err(Failed::Unreachable(status, _)) | Err(Failed::Refused(status)) => Err(status),
    }
}

/// Why a change was not forwarded.
enum Failed {
    /// No source gateway could be reached: the request, whole again, for a fallback.
    Unreachable(tonic::Status, Box<http::Request<Body>>),
    /// Any other failure, as the client's answer.
    Refused(tonic::Status),
}

impl From<tonic::Status> for Failed {
    fn from(status: tonic::Status) -> Self {
        Failed::Refused(status)
    }
}

/// Sends the change to the source and answers once this region's standby has replayed it.
async fn forward(
    source: &Source,
    meta: &dyn MetaEngine,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, Failed> {
    let (parts, body) = request.into_parts();
    // Read whole so that it can go to a second source gateway if the first cannot be reached;
    // bounded like any message this gateway accepts.
    let body = http_body_util::Limited::new(body, MAX_FORWARDED_BYTES)
        .collect()
        .await
        .map_err(|e| tonic::Status::invalid_argument(format!("reading the request: {e}")))?
        .to_bytes();
    let response = match source.send(&parts, body.clone()).await {
        Ok(response) => response,
        Err(status) => {
            let whole =
                http::Request::from_parts(parts, Body::new(http_body_util::Full::new(body)));
            return Err(Failed::Unreachable(status, Box::new(whole)));
        }
    };
    let position = response
        .headers()
        .get(log_positions::POSITION)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<u64>().ok());
    match position {
        Some(position) => meta
            .wait_position(position, REPLAY_WAIT)
            .await
            .map_err(|error| {
                tonic::Status::unavailable(format!(
                    "the change was made in the source region, but this mirror's replica has not \
                 replayed it within {} s (replication lag): {error}",
                    REPLAY_WAIT.as_secs()
                ))
            })?,
        None => {
            // A source without a replicated log (or an answer that is not a gRPC one) cannot be
            // waited for: say so rather than let the client read stale metadata silently.
            if response
                .headers()
                .get("grpc-status")
                .is_none_or(|s| s == "0")
            {
                tracing::warn!("the source answered a change without its log position; read-your-writes is not assured");
            }
        }
    }
    if parts.uri.path().ends_with("/OpenSession") {
        return mark_mirror_grant(response).await;
    }
    Ok(response)
}

/// The source's session grant, marked as given by a mirror: the mount then keeps its metadata
/// calls here instead of moving them to the source's gateways it finds in the registry.
async fn mark_mirror_grant(response: http::Response<Body>) -> Result<http::Response<Body>, Failed> {
    use prost::Message;
    let (parts, body) = response.into_parts();
    let collected = http_body_util::Limited::new(body, MAX_FORWARDED_BYTES)
        .collect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("reading the source's answer: {e}")))?;
    let trailers = collected.trailers().cloned();
    let bytes = collected.to_bytes();
    // A unary answer holds one uncompressed message, or none (a failure, told in the trailers).
    let data = if bytes.is_empty() {
        bytes
    } else {
        let message = match (bytes.first(), bytes.get(1..5), bytes.get(5..)) {
            (Some(0), Some(len), Some(rest))
                if u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize == rest.len() =>
            {
                rest
            }
            _ => {
                return Err(tonic::Status::internal(
                    "the source's session grant is not one uncompressed gRPC message",
                )
                .into())
            }
        };
        let mut grant = proto::meta::OpenSessionResponse::decode(message)
            .map_err(|e| tonic::Status::internal(format!("the source's session grant: {e}")))?;
        grant.mirror = true;
        let encoded = grant.encode_to_vec();
        let mut framed = Vec::with_capacity(5 + encoded.len());
        framed.push(0);
        framed.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        framed.extend_from_slice(&encoded);
        Bytes::from(framed)
    };
    let mut frames = vec![Ok::<_, std::convert::Infallible>(http_body::Frame::data(
        data,
    ))];
    frames.extend(trailers.map(|t| Ok(http_body::Frame::trailers(t))));
    let body = Body::new(http_body_util::StreamBody::new(futures::stream::iter(
        frames,
    )));
    Ok(http::Response::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stay_and_changes_go() {
        assert!(is_local_read("/stagefs.meta.v1.Meta/Lookup"));
        assert!(is_local_read("/stagefs.meta.v1.Meta/ReadChunk"));
        for change in [
            "OpenSession",
            "Heartbeat",
            "Create",
            "Open",
            "Release",
            "SetLock",
            "GetLock",
            "CommitSlice",
            "WriteSlice",
            "AllocateSliceIds",
            "SomethingNew",
        ] {
            assert!(
                !is_local_read(&format!("/stagefs.meta.v1.Meta/{change}")),
                "{change}"
            );
        }
    }
}
