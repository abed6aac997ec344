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
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::error::{FsError, FsResult};

/// How long connecting to a gateway may take before the mount gives up with a clear message.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The endpoint of a gateway at `address` (`host:port`, or an `http://`/`https://` URL), over
/// TLS when `access` has it.
pub fn gateway_endpoint(address: &str, access: &GatewayAccess) -> FsResult<Endpoint> {
    let url = match (address.split_once("://"), &access.tls) {
        (Some(("http", _)), Some(_)) => {
            return Err(FsError::Invalid(format!(
                "gateway address {address:?} is http:// but TLS settings were given: use https:// \
                 or host:port"
            )))
        }
        (Some(_), _) => address.to_string(),
        (None, Some(_)) => format!("https://{address}"),
        (None, None) => format!("http://{address}"),
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| FsError::Invalid(format!("gateway address {url:?}: {e}")))?;
    if let Some(tls) = &access.tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| FsError::Invalid(format!("TLS settings for {url}: {e}")))?;
    }
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_frame_size(Some(proto::MAX_FRAME_BYTES))
        .initial_stream_window_size(Some(proto::STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(proto::CONNECTION_WINDOW_BYTES)))
}

/// How this client reaches gateways and proves who it is: TLS (the CA that signed the gateways'
/// certificates, and this client's own certificate for mutual TLS), and the secret of its token,
/// presented as `authorization: Bearer SECRET` on every request (none for a gateway without
/// `--tokens`).
#[derive(Clone, Default)]
pub struct GatewayAccess {
    authorization: Option<AsciiMetadataValue>,
    tls: Option<ClientTlsConfig>,
}

impl std::fmt::Debug for GatewayAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret itself.
        f.debug_struct("GatewayAccess")
            .field("token", &self.authorization.as_ref().map(|_| "…"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl GatewayAccess {
    /// Presents the token `secret`.
    pub fn with_token(self, secret: &str) -> FsResult<GatewayAccess> {
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
            ..self
        })
    }

    /// Connects over TLS, trusting gateways whose certificate `ca_pem` signed; with `identity`
    /// (certificate and key, PEM), presents it for mutual TLS.
    pub fn with_tls(self, ca_pem: &[u8], identity: Option<(&[u8], &[u8])>) -> GatewayAccess {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        GatewayAccess {
            tls: Some(tls),
            ..self
        }
    }

    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
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
    let channel = gateway_endpoint(address, access)?
        .connect()
        .await
        .map_err(|e| FsError::MetaUnavailable {
            op: "connect",
            message: format!(
                "cannot connect to gateway {address}: {}{}",
                error_chain(&e),
                tls_hint(access)
            ),
        })?;
    Ok(InterceptedService::new(channel, access.clone()))
}

/// A connection to the gateway at `address` made on first use (and again after each failure),
/// so naming a gateway that is down costs nothing until a call needs it.
pub fn lazy_gateway(address: &str, access: &GatewayAccess) -> FsResult<GatewayChannel> {
    let channel = gateway_endpoint(address, access)?.connect_lazy();
    Ok(InterceptedService::new(channel, access.clone()))
}

pub use shared::error_chain;

/// What to check when a connection fails: a TLS mismatch looks like a broken connection.
pub fn tls_hint(access: &GatewayAccess) -> &'static str {
    if access.uses_tls() {
        " (connecting with TLS: does the gateway serve TLS, with a certificate --tls-ca signed, \
         and does it want a client certificate?)"
    } else {
        " (connecting without TLS: if the gateway serves TLS, pass --tls-ca)"
    }
}
