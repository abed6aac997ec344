//! The gRPC `Meta` service (`proto/proto/meta.proto`): a thin shell over a [`MetaEngine`].
//!
//! Each RPC converts its request ([`convert`]), runs one engine transaction, and converts the
//! answer back. Every failure goes through [`meta_status`], the one place that turns
//! a [`MetaError`] into a `tonic::Status`: the Linux errno in the `stagefs-errno` response metadata
//! (what the FUSE client returns to the kernel) and the gRPC code the proto's header derives from
//! it.
//!
//! The steps that span the staging log and the metadata (`WriteSlice`), and the background work
//! that keeps them honest, live in the gateway core ([`crate::node`]).

pub mod convert;

use std::sync::Arc;
use std::time::Duration;

use proto::meta as pb;
use proto::meta::meta_server::Meta;
use shared::meta::MAX_RELEASE_BATCH;
use tonic::{Code, Request, Response, Status};

use crate::access::{must_be_admin, tenant_of, Tenant};
use crate::confine::Scope;
use crate::meta::{
    FileKind, Ino, LockKind, MetaEngine, MetaError, RenameMode, SessionId, XattrMode,
};
use crate::node::{BlockInputError, Node, NodeError, SliceWrite};
use convert::*;

/// Most entries one `ReadDir` may ask for. A client takes "fewer than `limit`" for the end of the
/// directory, so a larger limit is refused rather than silently cut (which would hide entries);
/// 8192 entries with 255-byte names stay under tonic's default 4 MiB decoding limit.
pub const MAX_READDIR_LIMIT: u32 = 8192;

/// Longest one `SetLock` waits for a conflicting lock; a client that waits longer asks again.
const MAX_LOCK_WAIT: Duration = Duration::from_secs(30);

/// How much of a client's free text (a session description) goes into one log line.
const LOGGED_TEXT_BYTES: usize = 256;

/// The `Meta` gRPC service over the gateway core.
#[derive(Clone)]
pub struct MetaService {
    node: Arc<Node>,
    /// The node's engine (a shorthand).
    engine: Arc<dyn MetaEngine>,
}

impl MetaService {
    pub fn new(node: Arc<Node>) -> MetaService {
        MetaService {
            engine: node.meta.clone(),
            node,
        }
    }

    /// The session named by `wire` (16 bytes), if `tenant` opened it: another tenant's session
    /// is answered as one that does not exist.
    async fn session(&self, tenant: &Tenant, wire: &[u8]) -> Result<SessionId, MetaError> {
        self.node.session_named(tenant, wire).await
    }

    /// Where `tenant`'s requests may reach ([`crate::confine`]).
    async fn scope(&self, tenant: &Arc<Tenant>) -> Result<Scope, MetaError> {
        Scope::of(tenant.clone(), self.engine.as_ref()).await
    }

    /// The inode `ino` names for `tenant`, if it may reach it.
    async fn reach(&self, tenant: &Arc<Tenant>, ino: u64) -> Result<u64, MetaError> {
        self.scope(tenant)
            .await?
            .reach(self.engine.as_ref(), ino)
            .await
    }

    /// Runs one engine call; `rpc` names the call in error messages.
    async fn call<T>(
        &self,
        rpc: &'static str,
        work: impl std::future::Future<Output = Result<T, MetaError>>,
    ) -> Result<T, Status> {
        work.await.map_err(|error| meta_status(rpc, &error))
    }

    /// [`MetaService::call`] for `tenant`, whose errors name inodes as it knows them.
    async fn call_for<T>(
        &self,
        rpc: &'static str,
        tenant: &Tenant,
        work: impl std::future::Future<Output = Result<T, MetaError>>,
    ) -> Result<T, Status> {
        work.await
            .map_err(|error| meta_status(rpc, &crate::confine::error_for(tenant, error)))
    }

    /// Commits the slice of `commit` for `tenant` (within its scope), having recorded it as
    /// pending first with `record_first` (`CommitStagedSlice`: its block is staged already).
    async fn commit_as(
        &self,
        tenant: &Arc<Tenant>,
        commit: &pb::CommitSliceRequest,
        record_first: bool,
    ) -> Result<crate::meta::Attr, MetaError> {
        let slice = slice_from_proto(commit.slice.as_ref(), "CommitSlice")?;
        let session = self.session(tenant, &commit.session_id).await?;
        let scope = self.scope(tenant).await?;
        let ino = scope.reach(self.engine.as_ref(), commit.ino).await?;
        if record_first {
            match self
                .engine
                .record_pending_slice_lazily(session, ino, &slice)
                .await
            {
                // Recorded already (a retry after a lost answer): the commit says how it went.
                Ok(()) | Err(MetaError::NotPermitted(_)) => {}
                Err(error) => return Err(error),
            }
        }
        let attr = self
            .node
            .commit_slice(
                session,
                ino,
                commit.chunk_index,
                &slice,
                commit.new_size,
                &commit_attrs_from_proto(commit),
            )
            .await?;
        Ok(scope.attr(attr))
    }
}

/// Refuses a change from a read-only tenant, at the gateway (a client's own read-only flag is
/// not what protects the data).
fn writable(rpc: &str, tenant: &Tenant) -> Result<(), Status> {
    if tenant.may_write() {
        return Ok(());
    }
    Err(meta_status(
        rpc,
        &MetaError::ReadOnly(format!("token {:?} is read-only", tenant.name)),
    ))
}

/// Most deleted slices one `TakeDeletedSlices` or `AckDeletedSlices` call carries.
const MAX_DELETED_SLICES_TAKEN: usize = 4096;

/// Longest address a gateway may register.
const MAX_GATEWAY_ADDRESS: usize = 1024;

/// A gateway id as the wire carries it: 16 bytes.
fn gateway_id_of(bytes: &[u8]) -> Result<crate::meta::GatewayId, Status> {
    <[u8; 16]>::try_from(bytes).map_err(|_| {
        Status::invalid_argument(format!("a gateway id is 16 bytes, not {}", bytes.len()))
    })
}

/// The one mapping from a failed step of the core to what a `Meta` client sees.
pub(crate) fn node_status(rpc: &str, error: NodeError) -> Status {
    match error {
        NodeError::Meta(e) => meta_status(rpc, &e),
        NodeError::Staging(e) => Status::from(e),
        NodeError::Block(BlockInputError::Invalid(m)) => meta_status(rpc, &MetaError::Invalid(m)),
        NodeError::Block(e @ BlockInputError::Checksum(_)) => {
            errno_status(Code::DataLoss, libc::EIO, format!("{rpc}: {e}"))
        }
        NodeError::Task(m) => errno_status(Code::Internal, libc::EIO, format!("{rpc}: {m}")),
        // The message starts with the prefix the client looks for: nothing goes before it.
        NodeError::WriteThrough(m) => Status::failed_precondition(m),
    }
}

/// The gRPC code the proto's header comment derives from an errno.
pub fn code_for_errno(errno: i32, retryable: bool) -> Code {
    match errno {
        // A missing attribute is an answer about the file system, as a missing name is; so
        // are the size limits below. INTERNAL is kept for what the operator must look at.
        libc::ENOENT | libc::ENODATA => Code::NotFound,
        libc::EEXIST => Code::AlreadyExists,
        libc::EINVAL | libc::ENAMETOOLONG | libc::ERANGE | libc::E2BIG => Code::InvalidArgument,
        libc::EFBIG => Code::OutOfRange,
        libc::EPERM | libc::EROFS => Code::PermissionDenied,
        libc::ENOTDIR | libc::EISDIR | libc::ENOTEMPTY | libc::EMLINK | libc::EBADF => {
            Code::FailedPrecondition
        }
        libc::ENOSPC | libc::ENOLCK => Code::ResourceExhausted,
        libc::EAGAIN => Code::FailedPrecondition,
        libc::EIO if retryable => Code::Unavailable,
        _ => Code::Internal,
    }
}

/// A status carrying `errno` in the `stagefs-errno` metadata. The message is cut to a bounded
/// length: it may quote what a client sent (a name, a key).
pub fn errno_status(code: Code, errno: i32, message: String) -> Status {
    let mut status = Status::new(
        code,
        shared::clip(&message, shared::MAX_ERROR_MESSAGE_BYTES),
    );
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
    if matches!(error, MetaError::Corrupt(_) | MetaError::Backend(_)) {
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
        let tenant = tenant_of(&request);
        let description = request.into_inner().description;
        // A confined tenant whose root cannot be found learns it here, when it mounts.
        let confined = self.scope(&tenant).await.map_err(|error| {
            let root = tenant.root.as_ref().map_or("/", |r| r.path.as_str());
            errno_status(
                Code::FailedPrecondition,
                error.errno(),
                format!("OpenSession: this token's root {root} cannot be used: {error}"),
            )
        })?;
        let confined = confined.confined();
        let session_id = self
            .call_for("OpenSession", &tenant, async {
                self.node.open_session(&tenant, &description).await
            })
            .await?;
        tracing::info!(
            session = %format!("{session_id:032x}"),
            description = %shared::clip(&description, LOGGED_TEXT_BYTES),
            "session opened"
        );
        let settings = &self.node.settings;
        Ok(Response::new(pb::OpenSessionResponse {
            session_id: shared::meta::session_to_wire(session_id).into(),
            // A confined tenant reads the store only through the gateway, which checks each block.
            store_url: if confined {
                String::new()
            } else {
                settings.store_url.clone()
            },
            read_through_gateway: confined,
            gateway_id: bytes::Bytes::copy_from_slice(&settings.gateway_id),
            gateway_address: settings.gateway_address.clone(),
            heartbeat_interval_ms: settings.heartbeat_interval.as_millis() as u64,
            direct_threshold: if confined {
                0
            } else {
                settings.direct_threshold
            },
            // Set by the mirror that forwarded this call, if any (`mirror::Forward`).
            mirror: false,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let tenant = tenant_of(&request);
        let request = request.into_inner();
        self.call_for("Heartbeat", &tenant, async {
            let session = self.session(&tenant, &request.session_id).await?;
            let view = proto::meta_convert::mount_view(
                &request.using_gateways,
                &request.avoiding_gateways,
            )
            .map_err(|e| MetaError::Invalid(e.0))?;
            self.engine.heartbeat(session, &view).await
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn close_session(
        &self,
        request: Request<pb::SessionRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let tenant = tenant_of(&request);
        let session = request.into_inner().session_id;
        let session = self
            .call_for("CloseSession", &tenant, async {
                let session = self.session(&tenant, &session).await?;
                self.node.close_session(session).await?;
                Ok(session)
            })
            .await?;
        tracing::info!(session = %format!("{session:032x}"), "session closed by its client");
        Ok(Response::new(pb::Empty {}))
    }

    async fn lookup(
        &self,
        request: Request<pb::EntryRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let tenant = tenant_of(&request);
        let pb::EntryRequest { parent, name } = request.into_inner();
        let attr = self
            .call_for("Lookup", &tenant, async {
                let scope = self.scope(&tenant).await?;
                scope.lookup(self.engine.as_ref(), parent, &name).await
            })
            .await?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn get_attr(
        &self,
        request: Request<pb::InodeRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let tenant = tenant_of(&request);
        let ino = request.into_inner().ino;
        let attr = self
            .call_for("GetAttr", &tenant, async {
                let scope = self.scope(&tenant).await?;
                let ino = scope.reach(self.engine.as_ref(), ino).await?;
                Ok(scope.attr(self.engine.getattr(ino).await?))
            })
            .await?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn set_attr(
        &self,
        request: Request<pb::SetAttrRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let tenant = tenant_of(&request);
        writable("SetAttr", &tenant)?;
        let request = request.into_inner();
        let changes = set_attr_from_proto(&request);
        let attr = self
            .call_for("SetAttr", &tenant, async {
                let scope = self.scope(&tenant).await?;
                let ino = scope.reach(self.engine.as_ref(), request.ino).await?;
                Ok(scope.attr(self.engine.setattr(ino, &changes).await?))
            })
            .await?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn create(
        &self,
        request: Request<pb::CreateRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let tenant = tenant_of(&request);
        writable("Create", &tenant)?;
        let request = request.into_inner();
        let attr = self
            .call_for("Create", &tenant, async {
                let node = new_node_from_proto(&request, Some(FileKind::File))?;
                let session = self.session(&tenant, &request.session_id).await?;
                let scope = self.scope(&tenant).await?;
                let parent = scope.reach(self.engine.as_ref(), request.parent).await?;
                let attr = self
                    .engine
                    .create(session, parent, &request.name, &node)
                    .await?;
                Ok(scope.attr(attr))
            })
            .await?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn mknod(
        &self,
        request: Request<pb::CreateRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let tenant = tenant_of(&request);
        writable("Mknod", &tenant)?;
        let request = request.into_inner();
        let attr = self
            .call_for("Mknod", &tenant, async {
                let node = new_node_from_proto(&request, None)?;
                let parent = self.reach(&tenant, request.parent).await?;
                self.engine.mknod(parent, &request.name, &node).await
            })
            .await?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn mkdir(
        &self,
        request: Request<pb::CreateRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let tenant = tenant_of(&request);
        writable("Mkdir", &tenant)?;
        let request = request.into_inner();
        let attr = self
            .call_for("Mkdir", &tenant, async {
                // The kind is implied; anything but unspecified or DIR is a confused caller.
                let node = new_node_from_proto(&request, Some(FileKind::Dir))?;
                if node.kind != FileKind::Dir {
                    return Err(MetaError::Invalid(format!(
                        "Mkdir with file kind {:?}",
                        node.kind
                    )));
                }
                let parent = self.reach(&tenant, request.parent).await?;
                self.engine
                    .mkdir(parent, &request.name, node.mode, node.uid, node.gid)
                    .await
            })
            .await?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn symlink(
        &self,
        request: Request<pb::SymlinkRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let tenant = tenant_of(&request);
        writable("Symlink", &tenant)?;
        let pb::SymlinkRequest {
            parent,
            name,
            target,
            uid,
            gid,
        } = request.into_inner();
        let attr = self
            .call_for("Symlink", &tenant, async {
                let parent = self.reach(&tenant, parent).await?;
                self.engine.symlink(parent, &name, &target, uid, gid).await
            })
            .await?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn readlink(
        &self,
        request: Request<pb::InodeRequest>,
    ) -> Result<Response<pb::ReadlinkResponse>, Status> {
        let tenant = tenant_of(&request);
        let ino = request.into_inner().ino;
        let target = self
            .call_for("Readlink", &tenant, async {
                self.engine.readlink(self.reach(&tenant, ino).await?).await
            })
            .await?;
        Ok(Response::new(pb::ReadlinkResponse {
            target: target.into(),
        }))
    }

    async fn unlink(
        &self,
        request: Request<pb::EntryRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let tenant = tenant_of(&request);
        writable("Unlink", &tenant)?;
        let pb::EntryRequest { parent, name } = request.into_inner();
        self.call_for("Unlink", &tenant, async {
            self.engine
                .unlink(self.reach(&tenant, parent).await?, &name)
                .await
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn rmdir(
        &self,
        request: Request<pb::EntryRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let tenant = tenant_of(&request);
        writable("Rmdir", &tenant)?;
        let pb::EntryRequest { parent, name } = request.into_inner();
        self.call_for("Rmdir", &tenant, async {
            self.engine
                .rmdir(self.reach(&tenant, parent).await?, &name)
                .await
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn rename(
        &self,
        request: Request<pb::RenameRequest>,
    ) -> Result<Response<pb::RenameResponse>, Status> {
        let tenant = tenant_of(&request);
        writable("Rename", &tenant)?;
        let request = request.into_inner();
        let renamed = self
            .call_for("Rename", &tenant, async {
                let mode = RenameMode::from_flags(request.flags)?;
                let scope = self.scope(&tenant).await?;
                let parent = scope.reach(self.engine.as_ref(), request.parent).await?;
                let new_parent = scope
                    .reach(self.engine.as_ref(), request.new_parent)
                    .await?;
                let renamed = self
                    .engine
                    .rename(parent, &request.name, new_parent, &request.new_name, mode)
                    .await?;
                // In the tenant's numbers (0, "not said", stays 0: no root is inode 0).
                Ok(pb::RenameResponse {
                    moved: scope.number(renamed.moved),
                    other: renamed.other.map_or(0, |ino| scope.number(ino)),
                    moved_attr: renamed.attr.map(|attr| attr_to_proto(&scope.attr(attr))),
                })
            })
            .await?;
        Ok(Response::new(renamed))
    }

    async fn link(
        &self,
        request: Request<pb::LinkRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let tenant = tenant_of(&request);
        writable("Link", &tenant)?;
        let pb::LinkRequest {
            ino,
            new_parent,
            new_name,
        } = request.into_inner();
        let attr = self
            .call_for("Link", &tenant, async {
                let scope = self.scope(&tenant).await?;
                let ino = scope.reach(self.engine.as_ref(), ino).await?;
                let new_parent = scope.reach(self.engine.as_ref(), new_parent).await?;
                Ok(scope.attr(self.engine.link(ino, new_parent, &new_name).await?))
            })
            .await?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn read_dir(
        &self,
        request: Request<pb::ReadDirRequest>,
    ) -> Result<Response<pb::ReadDirResponse>, Status> {
        let tenant = tenant_of(&request);
        let request = request.into_inner();
        let (scope, entries) = self
            .call_for("ReadDir", &tenant, async {
                if request.limit == 0 || request.limit > MAX_READDIR_LIMIT {
                    return Err(MetaError::Invalid(format!(
                        "limit {} must be between 1 and {MAX_READDIR_LIMIT}",
                        request.limit
                    )));
                }
                let scope = self.scope(&tenant).await?;
                let ino = scope.reach(self.engine.as_ref(), request.ino).await?;
                let entries = self
                    .engine
                    .readdir(ino, request.after_cookie, request.limit as usize)
                    .await?;
                Ok((scope, entries))
            })
            .await?;
        Ok(Response::new(pb::ReadDirResponse {
            entries: entries
                .into_iter()
                .map(|mut entry| {
                    entry.attr = scope.attr(entry.attr);
                    dir_entry_to_proto(&entry)
                })
                .collect(),
        }))
    }

    async fn get_xattr(
        &self,
        request: Request<pb::XattrRequest>,
    ) -> Result<Response<pb::XattrValue>, Status> {
        let tenant = tenant_of(&request);
        let pb::XattrRequest { ino, name } = request.into_inner();
        let value = self
            .call_for("GetXattr", &tenant, async {
                self.engine
                    .getxattr(self.reach(&tenant, ino).await?, &name)
                    .await
            })
            .await?;
        Ok(Response::new(pb::XattrValue {
            value: value.into(),
        }))
    }

    async fn set_xattr(
        &self,
        request: Request<pb::SetXattrRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let tenant = tenant_of(&request);
        writable("SetXattr", &tenant)?;
        let request = request.into_inner();
        self.call_for("SetXattr", &tenant, async {
            let mode = XattrMode::from_flags(request.flags)?;
            let ino = self.reach(&tenant, request.ino).await?;
            self.engine
                .setxattr(ino, &request.name, &request.value, mode)
                .await
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn list_xattr(
        &self,
        request: Request<pb::InodeRequest>,
    ) -> Result<Response<pb::XattrNames>, Status> {
        let tenant = tenant_of(&request);
        let ino = request.into_inner().ino;
        let names = self
            .call_for("ListXattr", &tenant, async {
                self.engine.listxattr(self.reach(&tenant, ino).await?).await
            })
            .await?;
        Ok(Response::new(pb::XattrNames {
            names: names.into_iter().map(Into::into).collect(),
        }))
    }

    async fn remove_xattr(
        &self,
        request: Request<pb::XattrRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let tenant = tenant_of(&request);
        writable("RemoveXattr", &tenant)?;
        let pb::XattrRequest { ino, name } = request.into_inner();
        self.call_for("RemoveXattr", &tenant, async {
            self.engine
                .removexattr(self.reach(&tenant, ino).await?, &name)
                .await
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn stat_fs(
        &self,
        _request: Request<pb::Empty>,
    ) -> Result<Response<pb::StatFsResponse>, Status> {
        let statfs = self
            .call("StatFs", async { self.engine.statfs().await })
            .await?;
        Ok(Response::new(statfs_to_proto(&statfs)))
    }

    async fn sync(&self, _request: Request<pb::Empty>) -> Result<Response<pb::Empty>, Status> {
        self.call("Sync", async { self.engine.sync().await })
            .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn dir_usage(
        &self,
        request: Request<pb::InodeRequest>,
    ) -> Result<Response<pb::DirUsageResponse>, Status> {
        let tenant = tenant_of(&request);
        let ino = request.into_inner().ino;
        let usage = self
            .call_for("DirUsage", &tenant, async {
                self.engine.dir_usage(self.reach(&tenant, ino).await?).await
            })
            .await?;
        Ok(Response::new(pb::DirUsageResponse {
            files: usage.files,
            dirs: usage.dirs,
            bytes: usage.bytes,
        }))
    }

    async fn open(
        &self,
        request: Request<pb::HandleRequest>,
    ) -> Result<Response<pb::OpenResponse>, Status> {
        let tenant = tenant_of(&request);
        let pb::HandleRequest {
            session_id,
            ino,
            with_first_chunk,
        } = request.into_inner();
        let (attr, first_chunk) = self
            .call_for("Open", &tenant, async {
                let session = self.session(&tenant, &session_id).await?;
                let scope = self.scope(&tenant).await?;
                let ino = scope.reach(self.engine.as_ref(), ino).await?;
                let attr = if self.engine.is_replica() {
                    // A mirror answers an open itself only when the source region cannot be
                    // reached (`mirror::Forward`): read-only, so the handle is not recorded.
                    self.engine.getattr(ino).await?
                } else {
                    self.engine.open(session, ino).await?
                };
                let first_chunk = if with_first_chunk {
                    crate::meta::first_chunk(self.engine.as_ref(), &attr).await?
                } else {
                    None
                };
                Ok((scope.attr(attr), first_chunk))
            })
            .await?;
        Ok(Response::new(pb::OpenResponse {
            attr: Some(attr_to_proto(&attr)),
            first_chunk_given: first_chunk.is_some(),
            first_chunk: first_chunk.iter().flatten().map(slice_to_proto).collect(),
        }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let tenant = tenant_of(&request);
        let pb::ReleaseRequest { session_id, inos } = request.into_inner();
        self.call_for("Release", &tenant, async {
            if inos.len() > MAX_RELEASE_BATCH {
                return Err(MetaError::Invalid(format!(
                    "at most {MAX_RELEASE_BATCH} handles per call, not {}",
                    inos.len()
                )));
            }
            let session = self.session(&tenant, &session_id).await?;
            // Gives back only what this session holds: no tree check, so a file moved out of
            // the tree while open can still be closed.
            let scope = self.scope(&tenant).await?;
            let inos: Vec<Ino> = inos.into_iter().map(|ino| scope.own(ino)).collect();
            self.engine.release(session, &inos).await
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn take_dir_lease(
        &self,
        request: Request<pb::DirLeaseRequest>,
    ) -> Result<Response<pb::TakeDirLeaseResponse>, Status> {
        let tenant = tenant_of(&request);
        // A lease serves a mount that adds names: none for those who may not.
        writable("TakeDirLease", &tenant)?;
        let pb::DirLeaseRequest { session_id, dir } = request.into_inner();
        let granted = self
            .call_for("TakeDirLease", &tenant, async {
                let session = self.session(&tenant, &session_id).await?;
                let dir = self.reach(&tenant, dir).await?;
                self.engine.take_dir_lease(session, dir).await
            })
            .await?;
        Ok(Response::new(pb::TakeDirLeaseResponse { granted }))
    }

    async fn keep_dir_leases(
        &self,
        request: Request<pb::KeepDirLeasesRequest>,
    ) -> Result<Response<pb::KeepDirLeasesResponse>, Status> {
        let tenant = tenant_of(&request);
        let pb::KeepDirLeasesRequest {
            session_id,
            keep,
            release,
        } = request.into_inner();
        let held = self
            .call_for("KeepDirLeases", &tenant, async {
                let session = self.session(&tenant, &session_id).await?;
                // Only what this session holds is kept or given back: no tree check, as for
                // `Release`.
                let scope = self.scope(&tenant).await?;
                let keep: Vec<Ino> = keep.into_iter().map(|dir| scope.own(dir)).collect();
                let release: Vec<Ino> = release.into_iter().map(|dir| scope.own(dir)).collect();
                self.engine.keep_dir_leases(session, &keep, &release).await
            })
            .await?;
        Ok(Response::new(pb::KeepDirLeasesResponse { held }))
    }

    async fn set_lock(
        &self,
        request: Request<pb::SetLockRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let tenant = tenant_of(&request);
        let pb::SetLockRequest { lock, wait_ms } = request.into_inner();
        let (session, ino, lock) = lock_from_proto(lock.as_ref(), "SetLock")
            .map_err(|error| meta_status("SetLock", &error))?;
        if lock.kind == Some(LockKind::Write) {
            // A write lock keeps writers out: only for those who may write.
            writable("SetLock", &tenant)?;
        }
        let wait = Duration::from_millis(wait_ms).min(MAX_LOCK_WAIT);
        self.call_for("SetLock", &tenant, async {
            let session = self.session(&tenant, &session).await?;
            let ino = self.reach(&tenant, ino).await?;
            self.node.set_lock(session, ino, &lock, wait).await
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn get_lock(
        &self,
        request: Request<pb::LockRequest>,
    ) -> Result<Response<pb::GetLockResponse>, Status> {
        let tenant = tenant_of(&request);
        let wire = request.into_inner();
        let (session, ino, lock) = lock_from_proto(Some(&wire), "GetLock")
            .map_err(|error| meta_status("GetLock", &error))?;
        let conflict = self
            .call_for("GetLock", &tenant, async {
                let session = self.session(&tenant, &session).await?;
                let reached = self.reach(&tenant, ino).await?;
                self.engine.get_lock(session, reached, &lock).await
            })
            .await?;
        Ok(Response::new(pb::GetLockResponse {
            conflict: conflict.map(|held| held_lock_to_proto(&held, ino)),
        }))
    }

    async fn release_locks(
        &self,
        request: Request<pb::ReleaseLocksRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let tenant = tenant_of(&request);
        let pb::ReleaseLocksRequest {
            session_id,
            ino,
            owner,
            all_owners,
        } = request.into_inner();
        self.call_for("ReleaseLocks", &tenant, async {
            let session = self.session(&tenant, &session_id).await?;
            let owner = (!all_owners).then_some(owner);
            // Drops only this session's own locks: as Release.
            let ino = self.scope(&tenant).await?.own(ino);
            self.node.release_locks(session, ino, owner).await
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn read_chunk(
        &self,
        request: Request<pb::ReadChunkRequest>,
    ) -> Result<Response<pb::ReadChunkResponse>, Status> {
        let tenant = tenant_of(&request);
        let pb::ReadChunkRequest { ino, chunk_index } = request.into_inner();
        let slices = self
            .call_for("ReadChunk", &tenant, async {
                self.engine
                    .read_chunk(self.reach(&tenant, ino).await?, chunk_index)
                    .await
            })
            .await?;
        Ok(Response::new(pb::ReadChunkResponse {
            slices: slices.iter().map(slice_to_proto).collect(),
        }))
    }

    async fn allocate_slice_ids(
        &self,
        request: Request<pb::AllocateSliceIdsRequest>,
    ) -> Result<Response<pb::AllocateSliceIdsResponse>, Status> {
        let tenant = tenant_of(&request);
        writable("AllocateSliceIds", &tenant)?;
        let pb::AllocateSliceIdsRequest { count, session_id } = request.into_inner();
        let ids = self
            .call_for("AllocateSliceIds", &tenant, async {
                let session = self.session(&tenant, &session_id).await?;
                self.engine
                    .allocate_slice_ids(session, u64::from(count))
                    .await
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
        let tenant = tenant_of(&request);
        writable("RecordPendingSlice", &tenant)?;
        let request = request.into_inner();
        self.call_for("RecordPendingSlice", &tenant, async {
            let slice = slice_from_proto(request.slice.as_ref(), "RecordPendingSlice")?;
            let session = self.session(&tenant, &request.session_id).await?;
            self.engine.record_pending_slice(session, &slice).await
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn commit_slice(
        &self,
        request: Request<pb::CommitSliceRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let tenant = tenant_of(&request);
        writable("CommitSlice", &tenant)?;
        let request = request.into_inner();
        let attr = self
            .call_for(
                "CommitSlice",
                &tenant,
                self.commit_as(&tenant, &request, false),
            )
            .await?;
        Ok(Response::new(attr_response(&attr)))
    }

    async fn write_slice(
        &self,
        request: Request<pb::WriteSliceRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let tenant = tenant_of(&request);
        writable("WriteSlice", &tenant)?;
        let source = crate::limits::source_of(&request);
        let can_write_through = crate::high_water::can_write_through(&request);
        const RPC: &str = "WriteSlice";
        let request = request.into_inner();
        let commit = request
            .commit
            .ok_or_else(|| meta_status(RPC, &MetaError::Invalid("no commit".into())))?;
        let slice =
            slice_from_proto(commit.slice.as_ref(), RPC).map_err(|e| meta_status(RPC, &e))?;
        let (session, scope, ino) = async {
            let session = self.session(&tenant, &commit.session_id).await?;
            let scope = self.scope(&tenant).await?;
            let ino = scope.reach(self.engine.as_ref(), commit.ino).await?;
            Ok((session, scope, ino))
        }
        .await
        .map_err(|e: MetaError| meta_status(RPC, &crate::confine::error_for(&tenant, e)))?;
        // The data is decoded already; its record copy is what the budget bounds.
        let limits = &self.node.limits;
        let _room = limits
            .inflight
            .reserve(
                &source,
                request.data.len() as u64,
                limits.stream_idle_timeout,
            )
            .await?;
        let attr = self
            .node
            .write_slice(SliceWrite {
                session,
                ino,
                chunk_index: commit.chunk_index,
                slice,
                new_size: commit.new_size,
                attrs: commit_attrs_from_proto(&commit),
                data: request.data,
                crc32c: request.crc32c,
                can_write_through,
            })
            .await
            .map_err(|e| match e {
                NodeError::Meta(e) => meta_status(RPC, &crate::confine::error_for(&tenant, e)),
                other => node_status(RPC, other),
            })?;
        crate::telemetry::count_bytes(&tenant.name, "written", u64::from(slice.len));
        Ok(Response::new(attr_response(&scope.attr(attr))))
    }

    async fn commit_staged_slice(
        &self,
        request: Request<pb::WriteSliceRequest>,
    ) -> Result<Response<pb::AttrResponse>, Status> {
        let tenant = tenant_of(&request);
        writable("CommitStagedSlice", &tenant)?;
        const RPC: &str = "CommitStagedSlice";
        let request = request.into_inner();
        if !request.data.is_empty() {
            return Err(meta_status(
                RPC,
                &MetaError::Invalid("the block is staged already: no data".into()),
            ));
        }
        let commit = request
            .commit
            .ok_or_else(|| meta_status(RPC, &MetaError::Invalid("no commit".into())))?;
        let attr = self
            .call_for(RPC, &tenant, self.commit_as(&tenant, &commit, true))
            .await?;
        if let Some(slice) = &commit.slice {
            crate::telemetry::count_bytes(&tenant.name, "written", u64::from(slice.len));
        }
        Ok(Response::new(attr_response(&attr)))
    }

    async fn list_gateways(
        &self,
        _request: Request<pb::Empty>,
    ) -> Result<Response<pb::ListGatewaysResponse>, Status> {
        Ok(Response::new(self.gateways().await?))
    }

    async fn register_gateway(
        &self,
        request: Request<pb::RegisterGatewayRequest>,
    ) -> Result<Response<pb::RegisterGatewayResponse>, Status> {
        must_be_admin(&request, "register a gateway")?;
        let req = request.into_inner();
        let id = gateway_id_of(&req.id)?;
        if req.address.is_empty() || req.address.len() > MAX_GATEWAY_ADDRESS {
            return Err(Status::invalid_argument(format!(
                "RegisterGateway: an address of 1 to {MAX_GATEWAY_ADDRESS} bytes"
            )));
        }
        let epoch = self
            .call(
                "RegisterGateway",
                self.engine.register_gateway(id, &req.address, req.mirror),
            )
            .await?;
        tracing::info!(gateway = %uuid::Uuid::from_bytes(id), address = %req.address, epoch, "gateway registered through this one");
        Ok(Response::new(pb::RegisterGatewayResponse { epoch }))
    }

    async fn gateway_heartbeat(
        &self,
        request: Request<pb::GatewayHeartbeatRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        must_be_admin(&request, "heartbeat for a gateway")?;
        let req = request.into_inner();
        let id = gateway_id_of(&req.id)?;
        let load = crate::meta::GatewayLoad {
            staged_blocks: req.staged_blocks,
            staged_bytes: req.staged_bytes,
            queue_len: req.queue_len,
            oldest_waiting_ms: req.oldest_waiting_ms,
            healthy: req.healthy,
            mirror: req.mirror,
        };
        match self.engine.gateway_heartbeat(id, req.epoch, load).await {
            Ok(()) => Ok(Response::new(pb::Empty {})),
            // Said in so many words: the caller must stop serving.
            Err(error @ MetaError::Fenced { .. }) => {
                Err(Status::failed_precondition(format!("fenced: {error}")))
            }
            Err(error) => Err(meta_status("GatewayHeartbeat", &error)),
        }
    }

    async fn take_deleted_slices(
        &self,
        request: Request<pb::TakeDeletedSlicesRequest>,
    ) -> Result<Response<pb::TakeDeletedSlicesResponse>, Status> {
        must_be_admin(&request, "take a gateway's deleted slices")?;
        let req = request.into_inner();
        let id = gateway_id_of(&req.gateway_id)?;
        let limit = (req.limit as usize).clamp(1, MAX_DELETED_SLICES_TAKEN);
        let slices = self
            .call(
                "TakeDeletedSlices",
                self.engine
                    .take_due_deleted_slices(Some(id), crate::meta::now_ns(), limit),
            )
            .await?;
        Ok(Response::new(pb::TakeDeletedSlicesResponse {
            slices: slices
                .into_iter()
                .map(|s| pb::DeletedSliceInfo {
                    slice_id: s.slice_id,
                    len: s.len,
                    due_ns: s.due_ns,
                })
                .collect(),
        }))
    }

    async fn ack_deleted_slices(
        &self,
        request: Request<pb::AckDeletedSlicesRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        must_be_admin(&request, "acknowledge deleted slices")?;
        let ids = request.into_inner().slice_ids;
        if ids.len() > MAX_DELETED_SLICES_TAKEN {
            return Err(Status::invalid_argument(format!(
                "AckDeletedSlices: at most {MAX_DELETED_SLICES_TAKEN} slices at once"
            )));
        }
        self.call("AckDeletedSlices", self.engine.ack_deleted_slices(&ids))
            .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn list_mounts(
        &self,
        request: Request<pb::Empty>,
    ) -> Result<Response<pb::ListMountsResponse>, Status> {
        let tenant = tenant_of(&request);
        let sessions = self
            .call_for("ListMounts", &tenant, self.engine.list_sessions())
            .await?;
        let mounts = sessions
            .into_iter()
            // Another tenant's mounts are not this tenant's business.
            .filter(|s| tenant.is_admin() || s.tenant == tenant.name)
            .map(|s| pb::MountInfo {
                description: s.description,
                tenant: s.tenant,
                last_heartbeat_ns: s.last_heartbeat_ns,
                using_gateways: proto::meta_convert::gateway_ids(&s.view.using),
                avoiding_gateways: proto::meta_convert::gateway_ids(&s.view.avoiding),
            })
            .collect();
        Ok(Response::new(pb::ListMountsResponse { mounts }))
    }
}

impl MetaService {
    async fn gateways(&self) -> Result<pb::ListGatewaysResponse, Status> {
        let records = self
            .call("ListGateways", self.engine.list_gateways())
            .await?;
        // Alive: heartbeated within the expiry of a session (3 heartbeat intervals).
        let horizon = i64::try_from((3 * self.node.settings.heartbeat_interval).as_nanos())
            .unwrap_or(i64::MAX);
        let now = crate::meta::now_ns();
        Ok(pb::ListGatewaysResponse {
            gateways: records
                .into_iter()
                .map(|g| pb::GatewayInfo {
                    id: bytes::Bytes::copy_from_slice(&g.id),
                    address: g.address,
                    epoch: g.epoch,
                    alive: now.saturating_sub(g.last_heartbeat_ns) <= horizon,
                    staged_blocks: g.staged_blocks,
                    staged_bytes: g.staged_bytes,
                    last_heartbeat_ns: g.last_heartbeat_ns,
                    queue_len: g.queue_len,
                    oldest_waiting_ms: g.oldest_waiting_ms,
                    healthy: g.healthy,
                    mirror: g.mirror,
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests;
