//! The gRPC `Meta` service (`proto/proto/meta.proto`): a thin shell over a [`MetaEngine`].
//!
//! Each RPC converts its request ([`convert`]), runs one engine transaction on
//! `tokio::task::spawn_blocking` (the engine is synchronous: redb does file I/O and fsyncs), and
//! converts the answer back. Every failure goes through [`meta_status`], the one place that turns
//! a [`MetaError`] into a `tonic::Status`: the Linux errno in the `stagefs-errno` response metadata
//! (what the FUSE client returns to the kernel) and the gRPC code the proto's header derives from
//! it.
//!
//! The background work that keeps the metadata honest, expiring silent sessions and deleting the
//! data of deleted slices, lives in [`workers`].

pub mod convert;
pub mod workers;

use std::sync::Arc;
use std::time::Duration;

use proto::meta as pb;
use proto::meta::meta_server::Meta;
use tonic::{Code, Request, Response, Status};

use crate::meta::{Attr, FileKind, GatewayId, MetaEngine, MetaError, RenameMode, XattrMode};
use crate::service::StagingService;
use convert::*;

/// Most entries one `ReadDir` may ask for. A client takes "fewer than `limit`" for the end of the
/// directory, so a larger limit is refused rather than silently cut (which would hide entries);
/// 8192 entries with 255-byte names stay under tonic's default 4 MiB decoding limit.
pub const MAX_READDIR_LIMIT: u32 = 8192;

/// What `OpenSession` tells every client: where the data goes and how to stay alive.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// The object store the gateway drains to (clients read uploaded blocks from it directly).
    pub store_url: String,
    /// This gateway's id, from its device's superblock; recorded in the slices it stages.
    pub gateway_id: GatewayId,
    /// Where clients reach this gateway's `Staging` service (`--advertise`).
    pub gateway_address: String,
    /// Clients heartbeat at least this often; 3 missed intervals expire a session.
    pub heartbeat_interval: Duration,
}

/// The `Meta` gRPC service over one engine.
#[derive(Clone)]
pub struct MetaService {
    engine: Arc<dyn MetaEngine>,
    settings: Arc<ClientSettings>,
    /// This gateway's staging service, for `WriteSlice`; without it `WriteSlice` is
    /// unimplemented (clients then use WriteBlock and CommitSlice).
    staging: Option<StagingService>,
}

impl MetaService {
    pub fn new(engine: Arc<dyn MetaEngine>, settings: ClientSettings) -> MetaService {
        MetaService {
            engine,
            settings: Arc::new(settings),
            staging: None,
        }
    }

    /// Serves `WriteSlice` by staging its block on `staging`, this gateway's own device.
    pub fn with_staging(mut self, staging: StagingService) -> MetaService {
        self.staging = Some(staging);
        self
    }

    /// Runs a read-only engine call here, on the async thread: a redb read transaction never
    /// waits for a writer and reads cached pages, so handing it to a blocking thread would cost
    /// more (two thread switches) than the call itself.
    fn read<T>(
        &self,
        rpc: &'static str,
        call: impl FnOnce(&dyn MetaEngine) -> Result<T, MetaError>,
    ) -> Result<T, Status> {
        call(self.engine.as_ref()).map_err(|error| meta_status(rpc, &error))
    }

    /// Runs one engine call off the async threads; `rpc` names the call in error messages.
    async fn run<T, F>(&self, rpc: &'static str, call: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&dyn MetaEngine) -> Result<T, MetaError> + Send + 'static,
    {
        let engine = self.engine.clone();
        match tokio::task::spawn_blocking(move || call(engine.as_ref())).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(meta_status(rpc, &error)),
            Err(join_error) => {
                tracing::error!(rpc, error = %join_error, "metadata engine call panicked or was cancelled");
                Err(errno_status(
                    Code::Internal,
                    libc::EIO,
                    format!("{rpc}: the metadata engine call failed: {join_error}"),
                ))
            }
        }
    }
}

/// The gRPC code the proto's header comment derives from an errno.
pub fn code_for_errno(errno: i32, retryable: bool) -> Code {
    match errno {
        libc::ENOENT => Code::NotFound,
        libc::EEXIST => Code::AlreadyExists,
        libc::EINVAL | libc::ENAMETOOLONG => Code::InvalidArgument,
        libc::ENOTDIR | libc::EISDIR | libc::ENOTEMPTY | libc::EPERM | libc::EMLINK => {
            Code::FailedPrecondition
        }
        libc::ENOSPC => Code::ResourceExhausted,
        libc::EIO if retryable => Code::Unavailable,
        _ => Code::Internal,
    }
}

/// A status carrying `errno` in the `stagefs-errno` metadata.
fn errno_status(code: Code, errno: i32, message: String) -> Status {
    let mut status = Status::new(code, message);
    status.metadata_mut().insert(
        proto::ERRNO_METADATA_KEY,
        errno
            .to_string()
            .parse()
            .expect("a decimal number is valid metadata"),
    );
    status
}

/// The one mapping from an engine error to what the client sees: the errno in `stagefs-errno`,
/// the gRPC code derived from it, and a message naming the RPC and what failed.
pub fn meta_status(rpc: &str, error: &MetaError) -> Status {
    let errno = error.errno();
    let code = code_for_errno(errno, error.is_retryable());
    if matches!(error, MetaError::Corrupt(_) | MetaError::Database(_)) {
        // Not an answer about the file system: the operator needs to see it.
        tracing::error!(rpc, %error, "metadata engine failure");
    } else {
        tracing::debug!(rpc, %error, errno, "metadata request refused");
    }
    errno_status(code, errno, format!("{rpc}: {error}"))
}

#[tonic::async_trait]
impl Meta for MetaService {
    async fn open_session(
        &self,
        request: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionResponse>, Status> {
        let description = request.into_inner().description;
        let logged = description.clone();
        let session_id = self
            .run("OpenSession", move |engine| {
                engine.open_session(&description)
            })
            .await?;
        tracing::info!(session_id, description = %logged, "session opened");
        let settings = &self.settings;
        Ok(Response::new(pb::OpenSessionResponse {
            session_id,
            store_url: settings.store_url.clone(),
            gateway_id: bytes::Bytes::copy_from_slice(&settings.gateway_id),
            gateway_address: settings.gateway_address.clone(),
            heartbeat_interval_ms: settings.heartbeat_interval.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::SessionRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let session = request.into_inner().session_id;
        self.run("Heartbeat", move |engine| engine.heartbeat(session))
            .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn close_session(
        &self,
        request: Request<pb::SessionRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let session = request.into_inner().session_id;
        self.run("CloseSession", move |engine| engine.close_session(session))
            .await?;
        tracing::info!(session_id = session, "session closed by its client");
        Ok(Response::new(pb::Empty {}))
    }

    async fn lookup(
        &self,
        request: Request<pb::EntryRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let pb::EntryRequest { parent, name } = request.into_inner();
        let attr = self.read("Lookup", move |engine| engine.lookup(parent, &name))?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn get_attr(
        &self,
        request: Request<pb::InodeRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let ino = request.into_inner().ino;
        let attr = self.read("GetAttr", move |engine| engine.getattr(ino))?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn set_attr(
        &self,
        request: Request<pb::SetAttrRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let request = request.into_inner();
        let changes = set_attr_from_proto(&request);
        let attr = self
            .run("SetAttr", move |engine| {
                engine.setattr(request.ino, &changes)
            })
            .await?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn create(
        &self,
        request: Request<pb::CreateRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let request = request.into_inner();
        let attr = self
            .run("Create", move |engine| {
                let node = new_node_from_proto(&request, Some(FileKind::File))?;
                engine.create(request.session_id, request.parent, &request.name, &node)
            })
            .await?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn mknod(
        &self,
        request: Request<pb::CreateRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let request = request.into_inner();
        let attr = self
            .run("Mknod", move |engine| {
                let node = new_node_from_proto(&request, None)?;
                engine.mknod(request.parent, &request.name, &node)
            })
            .await?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn mkdir(
        &self,
        request: Request<pb::CreateRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let request = request.into_inner();
        let attr = self
            .run("Mkdir", move |engine| {
                // The kind is implied; anything but unspecified or DIR is a confused caller.
                let node = new_node_from_proto(&request, Some(FileKind::Dir))?;
                if node.kind != FileKind::Dir {
                    return Err(MetaError::Invalid(format!(
                        "Mkdir with file kind {:?}",
                        node.kind
                    )));
                }
                engine.mkdir(request.parent, &request.name, node.mode, node.uid, node.gid)
            })
            .await?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn symlink(
        &self,
        request: Request<pb::SymlinkRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let pb::SymlinkRequest {
            parent,
            name,
            target,
            uid,
            gid,
        } = request.into_inner();
        let attr = self
            .run("Symlink", move |engine| {
                engine.symlink(parent, &name, &target, uid, gid)
            })
            .await?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn readlink(
        &self,
        request: Request<pb::InodeRequest>,
    ) -> Result<Response<pb::ReadlinkResponse>, Status> {
        let ino = request.into_inner().ino;
        let target = self.read("Readlink", move |engine| engine.readlink(ino))?;
        Ok(Response::new(pb::ReadlinkResponse {
            target: target.into(),
        }))
    }

    async fn unlink(
        &self,
        request: Request<pb::EntryRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let pb::EntryRequest { parent, name } = request.into_inner();
        self.run("Unlink", move |engine| engine.unlink(parent, &name))
            .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn rmdir(
        &self,
        request: Request<pb::EntryRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let pb::EntryRequest { parent, name } = request.into_inner();
        self.run("Rmdir", move |engine| engine.rmdir(parent, &name))
            .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn rename(
        &self,
        request: Request<pb::RenameRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let request = request.into_inner();
        self.run("Rename", move |engine| {
            let mode = RenameMode::from_flags(request.flags)?;
            engine.rename(
                request.parent,
                &request.name,
                request.new_parent,
                &request.new_name,
                mode,
            )
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn link(
        &self,
        request: Request<pb::LinkRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let pb::LinkRequest {
            ino,
            new_parent,
            new_name,
        } = request.into_inner();
        let attr = self
            .run("Link", move |engine| {
                engine.link(ino, new_parent, &new_name)
            })
            .await?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn read_dir(
        &self,
        request: Request<pb::ReadDirRequest>,
    ) -> Result<Response<pb::ReadDirResponse>, Status> {
        let request = request.into_inner();
        let entries = self.read("ReadDir", move |engine| {
            if request.limit == 0 || request.limit > MAX_READDIR_LIMIT {
                return Err(MetaError::Invalid(format!(
                    "limit {} must be between 1 and {MAX_READDIR_LIMIT}",
                    request.limit
                )));
            }
            engine.readdir(request.ino, request.after_cookie, request.limit as usize)
        })?;
        Ok(Response::new(pb::ReadDirResponse {
            entries: entries.iter().map(dir_entry_to_proto).collect(),
        }))
    }

    async fn get_xattr(
        &self,
        request: Request<pb::XattrRequest>,
    ) -> Result<Response<pb::XattrValue>, Status> {
        let pb::XattrRequest { ino, name } = request.into_inner();
        let value = self.read("GetXattr", move |engine| engine.getxattr(ino, &name))?;
        Ok(Response::new(pb::XattrValue {
            value: value.into(),
        }))
    }

    async fn set_xattr(
        &self,
        request: Request<pb::SetXattrRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let request = request.into_inner();
        self.run("SetXattr", move |engine| {
            let mode = XattrMode::from_flags(request.flags)?;
            engine.setxattr(request.ino, &request.name, &request.value, mode)
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn list_xattr(
        &self,
        request: Request<pb::InodeRequest>,
    ) -> Result<Response<pb::XattrNames>, Status> {
        let ino = request.into_inner().ino;
        let names = self.read("ListXattr", move |engine| engine.listxattr(ino))?;
        Ok(Response::new(pb::XattrNames {
            names: names.into_iter().map(Into::into).collect(),
        }))
    }

    async fn remove_xattr(
        &self,
        request: Request<pb::XattrRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let pb::XattrRequest { ino, name } = request.into_inner();
        self.run("RemoveXattr", move |engine| engine.removexattr(ino, &name))
            .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn stat_fs(
        &self,
        _request: Request<pb::Empty>,
    ) -> Result<Response<pb::StatFsResponse>, Status> {
        let statfs = self.read("StatFs", |engine| engine.statfs())?;
        Ok(Response::new(statfs_to_proto(&statfs)))
    }

    async fn open(
        &self,
        request: Request<pb::HandleRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let pb::HandleRequest { session_id, ino } = request.into_inner();
        let attr = self
            .run("Open", move |engine| engine.open(session_id, ino))
            .await?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn release(
        &self,
        request: Request<pb::HandleRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let pb::HandleRequest { session_id, ino } = request.into_inner();
        self.run("Release", move |engine| engine.release(session_id, ino))
            .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn read_chunk(
        &self,
        request: Request<pb::ReadChunkRequest>,
    ) -> Result<Response<pb::ReadChunkResponse>, Status> {
        let pb::ReadChunkRequest { ino, chunk_index } = request.into_inner();
        let slices = self.read("ReadChunk", move |engine| {
            engine.read_chunk(ino, chunk_index)
        })?;
        Ok(Response::new(pb::ReadChunkResponse {
            slices: slices.iter().map(slice_to_proto).collect(),
        }))
    }

    async fn allocate_slice_ids(
        &self,
        request: Request<pb::AllocateSliceIdsRequest>,
    ) -> Result<Response<pb::AllocateSliceIdsResponse>, Status> {
        let count = request.into_inner().count;
        let ids = self
            .run("AllocateSliceIds", move |engine| {
                engine.allocate_slice_ids(u64::from(count))
            })
            .await?;
        Ok(Response::new(pb::AllocateSliceIdsResponse {
            first: ids.start,
            // The engine hands out exactly what was asked for, which fits the request's u32.
            count: (ids.end - ids.start) as u32,
        }))
    }

    async fn record_pending_slice(
        &self,
        request: Request<pb::PendingSliceRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let request = request.into_inner();
        self.run("RecordPendingSlice", move |engine| {
            let slice = slice_from_proto(request.slice.as_ref(), "RecordPendingSlice")?;
            engine.record_pending_slice(request.session_id, &slice)
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn commit_slice(
        &self,
        request: Request<pb::CommitSliceRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let request = request.into_inner();
        let attr = self
            .run("CommitSlice", move |engine| {
                let slice = slice_from_proto(request.slice.as_ref(), "CommitSlice")?;
                engine.commit_slice(
                    request.session_id,
                    request.ino,
                    request.chunk_index,
                    &slice,
                    request.new_size,
                    request.mtime_ns,
                )
            })
            .await?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn write_slice(
        &self,
        request: Request<pb::WriteSliceRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        const RPC: &str = "WriteSlice";
        let Some(staging) = self.staging.clone() else {
            return Err(errno_status(
                Code::Unimplemented,
                libc::ENOSYS,
                format!("{RPC}: this gateway stages no blocks; use WriteBlock and CommitSlice"),
            ));
        };
        let request = request.into_inner();
        let commit = request
            .commit
            .ok_or_else(|| meta_status(RPC, &MetaError::Invalid("no commit".into())))?;
        let slice =
            slice_from_proto(commit.slice.as_ref(), RPC).map_err(|e| meta_status(RPC, &e))?;
        if slice.gateway_id != self.settings.gateway_id {
            return Err(meta_status(
                RPC,
                &MetaError::Invalid(format!(
                    "slice {} names gateway {}, but this gateway is {}",
                    slice.slice_id,
                    uuid(&slice.gateway_id),
                    uuid(&self.settings.gateway_id)
                )),
            ));
        }
        if request.data.len() as u64 != u64::from(slice.len) {
            return Err(meta_status(
                RPC,
                &MetaError::Invalid(format!(
                    "slice {} is {} bytes long but carries {} bytes",
                    slice.slice_id,
                    slice.len,
                    request.data.len()
                )),
            ));
        }
        let key = shared::BlockKey::new(slice.slice_id, 0, slice.len)
            .map_err(|e| meta_status(RPC, &MetaError::Invalid(e.to_string())))?;
        // One blocking call for all three steps: it runs to the end even if the client goes
        // away (a staged block is never left without its pending record), and waits for the
        // device from the thread that then commits, saving two thread switches.
        let engine = self.engine.clone();
        let runtime = tokio::runtime::Handle::current();
        let write = move || -> Result<Attr, Status> {
            let session = commit.session_id;
            // Durable with the commit below. Should the gateway die first, the client has no
            // answer and writes the slice again, under a fresh id.
            engine
                .record_pending_slice_lazily(session, &slice)
                .map_err(|e| meta_status(RPC, &e))?;
            runtime.block_on(staging.stage_block(key, &request.data, request.crc32c))?;
            engine
                .commit_slice(
                    session,
                    commit.ino,
                    commit.chunk_index,
                    &slice,
                    commit.new_size,
                    commit.mtime_ns,
                )
                .map_err(|e| meta_status(RPC, &e))
        };
        let attr = tokio::task::spawn_blocking(write).await.map_err(|e| {
            errno_status(
                Code::Internal,
                libc::EIO,
                format!("{RPC}: the write task failed: {e}"),
            )
        })??;
        Ok(Response::new(attr_response(&attr)))
    }
}

/// A gateway id as `stagefs-gateway inspect` shows it.
fn uuid(id: &GatewayId) -> uuid::Uuid {
    uuid::Uuid::from_bytes(*id)
}

#[cfg(test)]
mod tests;
