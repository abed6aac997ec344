//! Every connection the client makes to a gateway is built here: one HTTP/2 connection,
//! shared by its `Meta` and `Staging` clients (the mount, `status`, `sync`, the benchmarks), and
//! every request on it carries the client's token ([`GatewayAccess`]).
//!
//! The settings match the gateway's server: 1 MiB frames and flow-control windows large enough
//! for a whole block in flight per stream, so one 4 MiB block is not chopped into 16 KiB frames
//! waiting for window updates.

use std::time::Duration;

use proto::meta::meta_client::MetaClient;
use proto::staging::staging_client::StagingClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

use super::error::{FsError, FsResult};

/// How long connecting to a gateway may take before the mount gives up with a clear message.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The endpoint of a gateway at `address` (`host:port` or an `http://` URL).
pub fn gateway_endpoint(address: &str) -> FsResult<Endpoint> {
    let url = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| FsError::Invalid(format!("gateway address {url:?}: {e}")))?;
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_frame_size(Some(proto::MAX_FRAME_BYTES))
        .initial_stream_window_size(Some(proto::STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(proto::CONNECTION_WINDOW_BYTES)))
}

/// How this client proves who it is to gateways: the secret of its token, presented as
/// `authorization: Bearer SECRET` on every request (none for a gateway without `--tokens`).
#[derive(Clone, Default)]
pub struct GatewayAccess {
    authorization: Option<AsciiMetadataValue>,
}

impl std::fmt::Debug for GatewayAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret itself.
        f.debug_struct("GatewayAccess")
            .field("token", &self.authorization.as_ref().map(|_| "…"))
            .finish()
    }
}

impl GatewayAccess {
    /// Presents the token `secret`.
    pub fn with_token(secret: &str) -> FsResult<GatewayAccess> {
        let secret = secret.trim();
        if secret.is_empty() || !secret.chars().all(|c| c.is_ascii_graphic()) {
            return Err(FsError::Invalid(
                "a token is printable ASCII without spaces, and not empty".into(),
            ));
        }
        let mut value: AsciiMetadataValue = format!("Bearer {secret}")
            .parse()
            .map_err(|_| FsError::Invalid("the token is not valid header text".into()))?;
        value.set_sensitive(true);
        Ok(GatewayAccess {
            authorization: Some(value),
        })
    }
}

impl Interceptor for GatewayAccess {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A connection to a gateway whose every request carries the client's [`GatewayAccess`].
pub type GatewayChannel = InterceptedService<Channel, GatewayAccess>;

/// The `Staging` client of a gateway connection, with the message limits the gateway serves.
pub fn staging_client(channel: GatewayChannel) -> StagingClient<GatewayChannel> {
    StagingClient::new(channel)
        .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(proto::MAX_MESSAGE_BYTES)
}

/// The `Meta` client of a gateway connection, with the message limits the gateway serves.
pub fn meta_client(channel: GatewayChannel) -> MetaClient<GatewayChannel> {
    MetaClient::new(channel)
        .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(proto::MAX_MESSAGE_BYTES)
}

/// Connects to the gateway at `address`. The channel reconnects by itself after a failure, so
/// one is enough for the life of a mount; this first connect fails fast on a dead gateway.
pub async fn connect_gateway(address: &str, access: &GatewayAccess) -> FsResult<GatewayChannel> {
    let channel =
        gateway_endpoint(address)?
            .connect()
            .await
            .map_err(|e| FsError::MetaUnavailable {
                op: "connect",
                message: format!("cannot connect to gateway {address}: {e}"),
            })?;
    Ok(InterceptedService::new(channel, access.clone()))
}
