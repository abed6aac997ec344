//! How fast the benchmark's own gRPC client path streams blocks, against an in-process server
//! that only receives and checks them (no device). It bounds what `stagefs bench gateway` can
//! measure on this host: if this is not far above the gateway's ingest figure, the client or the
//! transport is the bottleneck, not the gateway.
//!
//! Ignored by default (it is a measurement, not a check):
//! `cargo test --release -p stagefs-bench --test rpc_loopback -- --ignored --nocapture`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bench::load::{self, ChannelMode, SliceIds, Stop, Transport};
use bench::rpc::Payload;
use proto::staging::staging_server::{Staging, StagingServer};
use proto::staging::*;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

/// Receives blocks and acknowledges them after checking length and crc32c.
struct Sink;

#[tonic::async_trait]
impl Staging for Sink {
    async fn write_block(
        &self,
        request: Request<Streaming<WriteBlockRequest>>,
    ) -> Result<Response<WriteBlockResponse>, Status> {
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(WriteBlockRequest {
                frame: Some(write_block_request::Frame::Header(h)),
            })) => h,
            _ => return Err(Status::invalid_argument("no header")),
        };
        let (mut len, mut crc) = (0u64, 0u32);
        while let Some(frame) = stream.next().await {
            if let Some(write_block_request::Frame::Data(d)) = frame?.frame {
                crc = crc32c::crc32c_append(crc, &d);
                len += d.len() as u64;
            }
        }
        if len != header.total_len || crc != header.crc32c {
            return Err(Status::data_loss("length or crc32c mismatch"));
        }
        Ok(Response::new(WriteBlockResponse { sequence: 0 }))
    }
    type WriteBlocksStream =
        tokio_stream::wrappers::ReceiverStream<Result<WriteBlocksResponse, Status>>;

    async fn write_blocks(
        &self,
        _: Request<Streaming<WriteBlocksRequest>>,
    ) -> Result<Response<Self::WriteBlocksStream>, Status> {
        Err(Status::unimplemented("sink"))
    }
    async fn read_block(
        &self,
        _: Request<ReadBlockRequest>,
    ) -> Result<Response<ReadBlockResponse>, Status> {
        Err(Status::unimplemented("sink"))
    }
    async fn stat_blocks(
        &self,
        _: Request<StatBlocksRequest>,
    ) -> Result<Response<StatBlocksResponse>, Status> {
        Err(Status::unimplemented("sink"))
    }
    async fn wait_uploaded(
        &self,
        _: Request<WaitUploadedRequest>,
    ) -> Result<Response<WaitUploadedResponse>, Status> {
        Err(Status::unimplemented("sink"))
    }
    async fn delete_blocks(
        &self,
        _: Request<DeleteBlocksRequest>,
    ) -> Result<Response<DeleteBlocksResponse>, Status> {
        Err(Status::unimplemented("sink"))
    }
    async fn drain(&self, _: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        Err(Status::unimplemented("sink"))
    }
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse::default()))
    }
    async fn retry_quarantined(
        &self,
        _: Request<RetryQuarantinedRequest>,
    ) -> Result<Response<RetryQuarantinedResponse>, Status> {
        Err(Status::unimplemented("sink"))
    }
    async fn set_uploads_paused(
        &self,
        _: Request<SetUploadsPausedRequest>,
    ) -> Result<Response<SetUploadsPausedResponse>, Status> {
        Err(Status::unimplemented("sink"))
    }

    async fn collect_garbage(
        &self,
        _: Request<proto::staging::CollectGarbageRequest>,
    ) -> Result<Response<proto::staging::CollectGarbageResponse>, Status> {
        Err(Status::unimplemented("sink"))
    }

    async fn warmup(
        &self,
        _: Request<proto::staging::WarmupRequest>,
    ) -> Result<Response<proto::staging::WarmupResponse>, Status> {
        Err(Status::unimplemented("sink"))
    }
}

/// `nodelay`: whether accepted sockets get TCP_NODELAY. `Server::tcp_nodelay` does not apply to
/// a listener passed to `serve_with_incoming`; without it, Nagle holds the server's small frames
/// (response headers, WINDOW_UPDATE) until the client's delayed ACK, 40 ms on Linux.
async fn serve(nodelay: bool) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .initial_stream_window_size(Some(proto::STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(proto::CONNECTION_WINDOW_BYTES))
            .tcp_nodelay(true)
            .add_service(
                StagingServer::new(Sink)
                    .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(proto::MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(nodelay)),
            ),
    );
    addr
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn client_path_throughput() {
    let ids = Arc::new(SliceIds::new());
    for (nodelay, writers, mode) in [
        (false, 1, ChannelMode::Shared),
        (true, 1, ChannelMode::Shared),
        (true, 4, ChannelMode::Shared),
        (true, 16, ChannelMode::Shared),
        (true, 16, ChannelMode::PerWriter),
    ] {
        let addr = serve(nodelay).await;
        let clients = load::clients(addr, &Default::default(), writers, mode)
            .await
            .expect("connect");
        let payload = Payload::random(4 << 20);
        let result = load::run(
            clients,
            ids.clone(),
            payload,
            Stop::after(Duration::from_secs(3)),
            Transport::Rpc,
        )
        .await
        .expect("load");
        println!(
            "loopback sink (server nodelay {nodelay}), {writers} writer(s), {mode}: {:.1} MiB/s, latency ms p10 {:.2} p25 {:.2} \
             p50 {:.2} p75 {:.2} p90 {:.2} p99 {:.2}",
            result.mib_per_s(),
            result.latency_ms(0.1),
            result.latency_ms(0.25),
            result.latency_ms(0.5),
            result.latency_ms(0.75),
            result.latency_ms(0.9),
            result.latency_ms(0.99)
        );
    }
}
