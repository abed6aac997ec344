//! [`MetaApi`] over the gateway's `Meta` gRPC service (`proto/proto/meta.proto`).
//!
//! A failed RPC carries the engine's errno in the response metadata key
//! [`proto::ERRNO_METADATA_KEY`]; [`status_error`] turns it into [`FsError::Meta`]. A status
//! without one (the connection failed, the deadline passed) becomes
//! [`FsError::MetaUnavailable`] or an errno derived from the gRPC code.

use std::ops::Range;
use std::time::Duration;

use super::channel::GatewayChannel;
use async_trait::async_trait;
use bytes::Bytes;
use proto::meta as pb;
use proto::meta::meta_client::MetaClient;
use proto::meta_convert;
use shared::meta::RequestTag;
use tonic::{Code, Request, Status};

use super::error::{FsError, FsResult};
use super::meta_api::{
    Attr, CommitAttrs, DirEntry, FileKind, GatewayId, GatewayInfo, HeldLock, Ino, LockKind,
    LockRequest, MetaApi, MountView, NewNode, Opened, Renamed, SessionGrant, SessionId, SetAttr,
    Slice, StatFs,
};

/// Deadline of one metadata call: every call is one small transaction, so a call this slow means
/// the gateway is in trouble and the application should hear about it.
pub const META_TIMEOUT: Duration = Duration::from_secs(30);

/// The metadata engine behind a gateway's `Meta` service.
#[derive(Clone)]
pub struct GrpcMeta {
    client: MetaClient<GatewayChannel>,
    timeout: Duration,
    /// Sent with every call (see [`GrpcMeta::tagged`]).
    tag: Option<RequestTag>,
}

impl GrpcMeta {
    pub fn new(channel: GatewayChannel) -> Self {
        GrpcMeta {
            client: super::channel::meta_client(channel),
            timeout: META_TIMEOUT,
            tag: None,
        }
    }

    /// A face of this connection whose calls carry `tag`, so that the change they make happens
    /// once however often it is sent (the gateway records it with the change).
    pub fn tagged(&self, tag: RequestTag) -> GrpcMeta {
        GrpcMeta {
            tag: Some(tag),
            ..self.clone()
        }
    }

    /// Changes the deadline of every call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        if let Some(tag) = &self.tag {
            let value = tag
                .to_header()
                .parse()
                .expect("a tag's header is ASCII digits and dots");
            request
                .metadata_mut()
                .insert(shared::meta::CHANGE_TAG_HEADER, value);
        }
        request
    }

    /// A client to call through; clones share the connection.
    fn client(&self) -> MetaClient<GatewayChannel> {
        self.client.clone()
    }
}

/// The [`FsError`] of a failed `Meta` call.
pub fn status_error(op: &'static str, status: &Status) -> FsError {
    let message = status.message().to_string();
    let errno = status
        .metadata()
        .get(proto::ERRNO_METADATA_KEY)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().parse::<i32>().ok())
        .filter(|&errno| errno > 0);
    if let Some(errno) = errno {
        return FsError::Meta { op, errno, message };
    }
    // Not an answer of the gateway but a connection that failed (a TLS mismatch looks so too).
    let from_transport = std::error::Error::source(status)
        .is_some_and(|source| source.is::<tonic::transport::Error>());
    if from_transport {
        return FsError::MetaUnavailable {
            op,
            message: format!(
                "the connection failed: {}",
                super::channel::error_chain(status)
            ),
        };
    }
    let errno = match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            return FsError::MetaUnavailable {
                op,
                message: format!("{}: {message}", status.code()),
            }
        }
        Code::NotFound => libc::ENOENT,
        Code::AlreadyExists => libc::EEXIST,
        Code::InvalidArgument | Code::OutOfRange => libc::EINVAL,
        Code::ResourceExhausted => libc::ENOSPC,
        Code::PermissionDenied | Code::Unauthenticated => libc::EACCES,
        Code::Unimplemented => libc::ENOSYS,
        Code::FailedPrecondition => libc::EPERM,
        _ => libc::EIO,
    };
    FsError::Meta {
        op,
        errno,
        message: format!("{}: {message}", status.code()),
    }
}

fn malformed(op: &'static str, message: impl Into<String>) -> FsError {
    FsError::MetaProtocol {
        op,
        message: message.into(),
    }
}

fn kind_to_proto(kind: FileKind) -> pb::FileKind {
    kind.into()
}

/// Decodes the attributes of an answer.
pub fn attr_from_proto(op: &'static str, attr: Option<pb::Attr>) -> FsResult<Attr> {
    let attr = attr.ok_or_else(|| malformed(op, "answer without attributes"))?;
    meta_convert::attr(&attr).map_err(|e| malformed(op, e.0))
}

/// The gateway id of a session grant: 16 bytes (none at all reads as zeros).
fn gateway_id_from_proto(op: &'static str, bytes: &[u8]) -> FsResult<GatewayId> {
    if bytes.is_empty() {
        return Ok([0; 16]);
    }
    bytes
        .try_into()
        .map_err(|_| malformed(op, format!("gateway id of {} bytes, not 16", bytes.len())))
}

fn slice_from_proto(op: &'static str, slice: &pb::Slice) -> FsResult<Slice> {
    meta_convert::slice(slice).map_err(|e| malformed(op, e.0))
}

fn slice_to_proto(slice: &Slice) -> pb::Slice {
    slice.into()
}

fn bytes(data: &[u8]) -> Bytes {
    Bytes::copy_from_slice(data)
}

fn entry(parent: Ino, name: &[u8]) -> pb::EntryRequest {
    pb::EntryRequest {
        parent,
        name: bytes(name),
    }
}

/// Calls one RPC and maps its failure; `$call` is a method of the generated client.
macro_rules! call {
    ($self:ident, $op:literal, $call:ident, $message:expr) => {
        $self
            .client()
            .$call($self.request($message))
            .await
            .map(|response| response.into_inner())
            .map_err(|status| status_error($op, &status))
    };
}

#[async_trait]
impl MetaApi for GrpcMeta {
    async fn open_session(&self, description: &str) -> FsResult<SessionGrant> {
        let grant = call!(
            self,
            "open_session",
            open_session,
            pb::OpenSessionRequest {
                description: description.to_string(),
            }
        )?;
        Ok(SessionGrant {
            session_id: shared::meta::session_from_wire(&grant.session_id)
                .ok_or_else(|| malformed("open_session", "the session id is not 16 bytes"))?,
            store_url: grant.store_url,
            gateway_id: gateway_id_from_proto("open_session", &grant.gateway_id)?,
            gateway_address: grant.gateway_address,
            heartbeat_interval: (grant.heartbeat_interval_ms > 0)
                .then(|| Duration::from_millis(grant.heartbeat_interval_ms)),
            direct_threshold: grant.direct_threshold,
            read_through_gateway: grant.read_through_gateway,
            mirror: grant.mirror,
        })
    }

    async fn heartbeat(&self, session: SessionId, view: &MountView) -> FsResult<()> {
        call!(
            self,
            "heartbeat",
            heartbeat,
            pb::HeartbeatRequest {
                session_id: session_bytes(session),
                using_gateways: proto::meta_convert::gateway_ids(&view.using),
                avoiding_gateways: proto::meta_convert::gateway_ids(&view.avoiding),
            }
        )?;
        Ok(())
    }

    async fn close_session(&self, session: SessionId) -> FsResult<()> {
        call!(
            self,
            "close_session",
            close_session,
            pb::SessionRequest {
                session_id: session_bytes(session),
            }
        )?;
        Ok(())
    }

    async fn lookup(&self, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        let answer = call!(self, "lookup", lookup, entry(parent, name))?;
        attr_from_proto("lookup", answer.attr)
    }

    async fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        let answer = call!(self, "getattr", get_attr, pb::InodeRequest { ino })?;
        attr_from_proto("getattr", answer.attr)
    }

    async fn setattr(&self, ino: Ino, changes: &SetAttr) -> FsResult<Attr> {
        let answer = call!(
            self,
            "setattr",
            set_attr,
            pb::SetAttrRequest {
                ino,
                mode: changes.mode,
                uid: changes.uid,
                gid: changes.gid,
                size: changes.size,
                atime_ns: changes.atime_ns,
                mtime_ns: changes.mtime_ns,
            }
        )?;
        attr_from_proto("setattr", answer.attr)
    }

    async fn create(
        &self,
        session: SessionId,
        parent: Ino,
        name: &[u8],
        node: &NewNode,
    ) -> FsResult<Attr> {
        let answer = call!(
            self,
            "create",
            create,
            create_request(session, parent, name, node)
        )?;
        attr_from_proto("create", answer.attr)
    }

    async fn mknod(&self, parent: Ino, name: &[u8], node: &NewNode) -> FsResult<Attr> {
        let answer = call!(self, "mknod", mknod, create_request(0, parent, name, node))?;
        attr_from_proto("mknod", answer.attr)
    }

    async fn mkdir(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        let node = NewNode {
            kind: FileKind::Dir,
            mode,
            uid,
            gid,
            rdev: 0,
        };
        let answer = call!(self, "mkdir", mkdir, create_request(0, parent, name, &node))?;
        attr_from_proto("mkdir", answer.attr)
    }

    async fn symlink(
        &self,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        let answer = call!(
            self,
            "symlink",
            symlink,
            pb::SymlinkRequest {
                parent,
                name: bytes(name),
                target: bytes(target),
                uid,
                gid,
            }
        )?;
        attr_from_proto("symlink", answer.attr)
    }

    async fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        let answer = call!(self, "readlink", readlink, pb::InodeRequest { ino })?;
        Ok(answer.target.to_vec())
    }

    async fn unlink(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        call!(self, "unlink", unlink, entry(parent, name))?;
        Ok(())
    }

    async fn rmdir(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        call!(self, "rmdir", rmdir, entry(parent, name))?;
        Ok(())
    }

    async fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<Renamed> {
        let answer = call!(
            self,
            "rename",
            rename,
            pb::RenameRequest {
                parent,
                name: bytes(name),
                new_parent,
                new_name: bytes(new_name),
                flags,
            }
        )?;
        Ok(Renamed {
            moved: answer.moved,
            other: (answer.other != 0).then_some(answer.other),
            attr: answer
                .moved_attr
                .map(|attr| attr_from_proto("rename", Some(attr)))
                .transpose()?,
        })
    }

    async fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> FsResult<Attr> {
        let answer = call!(
            self,
            "link",
            link,
            pb::LinkRequest {
                ino,
                new_parent,
                new_name: bytes(new_name),
            }
        )?;
        attr_from_proto("link", answer.attr)
    }

    async fn readdir(&self, ino: Ino, after_cookie: u64, limit: u32) -> FsResult<Vec<DirEntry>> {
        let answer = call!(
            self,
            "readdir",
            read_dir,
            pb::ReadDirRequest {
                ino,
                after_cookie,
                limit,
            }
        )?;
        answer
            .entries
            .into_iter()
            .map(|e| {
                Ok(DirEntry {
                    name: e.name.to_vec(),
                    cookie: e.cookie,
                    attr: attr_from_proto("readdir", e.attr)?,
                    has_xattrs: e.has_xattrs,
                })
            })
            .collect()
    }

    async fn getxattr(&self, ino: Ino, name: &[u8]) -> FsResult<Vec<u8>> {
        let answer = call!(
            self,
            "getxattr",
            get_xattr,
            pb::XattrRequest {
                ino,
                name: bytes(name),
            }
        )?;
        Ok(answer.value.to_vec())
    }

    async fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: u32) -> FsResult<()> {
        call!(
            self,
            "setxattr",
            set_xattr,
            pb::SetXattrRequest {
                ino,
                name: bytes(name),
                value: bytes(value),
                flags,
            }
        )?;
        Ok(())
    }

    async fn listxattr(&self, ino: Ino) -> FsResult<Vec<Vec<u8>>> {
        let answer = call!(self, "listxattr", list_xattr, pb::InodeRequest { ino })?;
        Ok(answer.names.into_iter().map(|n| n.to_vec()).collect())
    }

    async fn removexattr(&self, ino: Ino, name: &[u8]) -> FsResult<()> {
        call!(
            self,
            "removexattr",
            remove_xattr,
            pb::XattrRequest {
                ino,
                name: bytes(name),
            }
        )?;
        Ok(())
    }

    async fn list_gateways(&self) -> FsResult<Vec<GatewayInfo>> {
        let answer = call!(self, "list_gateways", list_gateways, pb::Empty {})?;
        answer
            .gateways
            .into_iter()
            .map(|g| {
                Ok(GatewayInfo {
                    id: gateway_id_from_proto("list_gateways", &g.id)?,
                    address: g.address,
                    epoch: g.epoch,
                    alive: g.alive,
                    staged_blocks: g.staged_blocks,
                    staged_bytes: g.staged_bytes,
                    mirror: g.mirror,
                })
            })
            .collect()
    }

    async fn sync(&self) -> FsResult<()> {
        call!(self, "sync", sync, pb::Empty {})?;
        Ok(())
    }

    async fn statfs(&self) -> FsResult<StatFs> {
        let answer = call!(self, "statfs", stat_fs, pb::Empty {})?;
        Ok(StatFs {
            files: answer.files,
            used_bytes: answer.used_bytes,
            capacity_bytes: (answer.capacity_bytes > 0).then_some(answer.capacity_bytes),
            max_files: (answer.max_files > 0).then_some(answer.max_files),
        })
    }

    async fn open(&self, session: SessionId, ino: Ino, first_chunk: bool) -> FsResult<Opened> {
        let answer = call!(
            self,
            "open",
            open,
            pb::HandleRequest {
                session_id: session_bytes(session),
                ino,
                with_first_chunk: first_chunk,
            }
        )?;
        let first_chunk = answer
            .first_chunk_given
            .then(|| {
                answer
                    .first_chunk
                    .iter()
                    .map(|s| slice_from_proto("open", s))
                    .collect::<FsResult<Vec<_>>>()
            })
            .transpose()?;
        Ok(Opened {
            attr: attr_from_proto("open", answer.attr)?,
            first_chunk,
        })
    }

    async fn release(&self, session: SessionId, inos: &[Ino]) -> FsResult<()> {
        call!(
            self,
            "release",
            release,
            pb::ReleaseRequest {
                session_id: session_bytes(session),
                inos: inos.to_vec(),
            }
        )?;
        Ok(())
    }

    async fn take_dir_lease(&self, session: SessionId, dir: Ino) -> FsResult<bool> {
        let answer = call!(
            self,
            "take_dir_lease",
            take_dir_lease,
            pb::DirLeaseRequest {
                session_id: session_bytes(session),
                dir,
            }
        )?;
        Ok(answer.granted)
    }

    async fn keep_dir_leases(
        &self,
        session: SessionId,
        keep: &[Ino],
        release: &[Ino],
    ) -> FsResult<Vec<bool>> {
        let answer = call!(
            self,
            "keep_dir_leases",
            keep_dir_leases,
            pb::KeepDirLeasesRequest {
                session_id: session_bytes(session),
                keep: keep.to_vec(),
                release: release.to_vec(),
            }
        )?;
        if answer.held.len() != keep.len() {
            return Err(malformed(
                "keep_dir_leases",
                "the answer does not name every lease asked about",
            ));
        }
        Ok(answer.held)
    }

    async fn set_lock(
        &self,
        session: SessionId,
        ino: Ino,
        lock: &LockRequest,
        wait: Duration,
    ) -> FsResult<()> {
        let mut request = self.request(pb::SetLockRequest {
            lock: Some(lock_to_proto(session, ino, lock)),
            wait_ms: wait.as_millis() as u64,
        });
        // The gateway holds the call while it waits for the lock.
        request.set_timeout(self.timeout + wait);
        self.client()
            .set_lock(request)
            .await
            .map_err(|status| status_error("set_lock", &status))?;
        Ok(())
    }

    async fn get_lock(
        &self,
        session: SessionId,
        ino: Ino,
        lock: &LockRequest,
    ) -> FsResult<Option<HeldLock>> {
        let answer = call!(
            self,
            "get_lock",
            get_lock,
            lock_to_proto(session, ino, lock)
        )?;
        Ok(answer.conflict.map(|held| HeldLock {
            start: held.start,
            end: held.end,
            kind: if held.kind == pb::LockKind::Read as i32 {
                LockKind::Read
            } else {
                LockKind::Write
            },
            pid: held.pid,
        }))
    }

    async fn release_locks(
        &self,
        session: SessionId,
        ino: Ino,
        owner: Option<u64>,
    ) -> FsResult<()> {
        call!(
            self,
            "release_locks",
            release_locks,
            pb::ReleaseLocksRequest {
                session_id: session_bytes(session),
                ino,
                owner: owner.unwrap_or(0),
                all_owners: owner.is_none(),
            }
        )?;
        Ok(())
    }

    async fn read_chunk(&self, ino: Ino, chunk_index: u64) -> FsResult<Vec<Slice>> {
        let answer = call!(
            self,
            "read_chunk",
            read_chunk,
            pb::ReadChunkRequest { ino, chunk_index }
        )?;
        answer
            .slices
            .iter()
            .map(|s| slice_from_proto("read_chunk", s))
            .collect()
    }

    async fn allocate_slice_ids(&self, session: SessionId, count: u32) -> FsResult<Range<u64>> {
        let answer = call!(
            self,
            "allocate_slice_ids",
            allocate_slice_ids,
            pb::AllocateSliceIdsRequest {
                count,
                session_id: session_bytes(session),
            }
        )?;
        let end = answer
            .first
            .checked_add(u64::from(answer.count))
            .ok_or_else(|| malformed("allocate_slice_ids", "id range overflows"))?;
        Ok(answer.first..end)
    }

    async fn record_pending_slice(&self, session: SessionId, slice: &Slice) -> FsResult<()> {
        call!(
            self,
            "record_pending_slice",
            record_pending_slice,
            pb::PendingSliceRequest {
                session_id: session_bytes(session),
                slice: Some(slice_to_proto(slice)),
            }
        )?;
        Ok(())
    }

    async fn commit_slice(
        &self,
        session: SessionId,
        ino: Ino,
        chunk_index: u64,
        slice: &Slice,
        new_size: u64,
        attrs: &CommitAttrs,
    ) -> FsResult<Attr> {
        let answer = call!(
            self,
            "commit_slice",
            commit_slice,
            commit_request(session, ino, chunk_index, slice, new_size, attrs)
        )?;
        attr_from_proto("commit_slice", answer.attr)
    }

    async fn write_slice(
        &self,
        session: SessionId,
        ino: Ino,
        chunk_index: u64,
        slice: &Slice,
        new_size: u64,
        attrs: &CommitAttrs,
        data: Bytes,
    ) -> FsResult<Attr> {
        let mut request = self.request(pb::WriteSliceRequest {
            commit: Some(commit_request(
                session,
                ino,
                chunk_index,
                slice,
                new_size,
                attrs,
            )),
            crc32c: crc32c::crc32c(&data),
            data,
        });
        // Above its high-water mark the gateway tells this client to PUT the block itself.
        request.metadata_mut().insert(
            proto::WRITE_THROUGH_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        let answer = self
            .client()
            .write_slice(request)
            .await
            .map_err(|status| {
                let key = format!("slice {}", slice.slice_id);
                super::error::write_through_of(status.code(), status.message(), &key)
                    .unwrap_or_else(|| status_error("write_slice", &status))
            })?
            .into_inner();
        attr_from_proto("write_slice", answer.attr)
    }
}

/// A session id as the wire carries it.
fn lock_to_proto(session: SessionId, ino: Ino, lock: &LockRequest) -> pb::LockRequest {
    pb::LockRequest {
        session_id: session_bytes(session),
        ino,
        owner: lock.owner,
        start: lock.start,
        end: lock.end,
        kind: match lock.kind {
            None => pb::LockKind::Unlock,
            Some(LockKind::Read) => pb::LockKind::Read,
            Some(LockKind::Write) => pb::LockKind::Write,
        } as i32,
        pid: lock.pid,
    }
}

fn session_bytes(session: SessionId) -> Bytes {
    shared::meta::session_to_wire(session).into()
}

/// What `CommitSlice` and `WriteSlice` both carry.
fn commit_request(
    session: SessionId,
    ino: Ino,
    chunk_index: u64,
    slice: &Slice,
    new_size: u64,
    attrs: &CommitAttrs,
) -> pb::CommitSliceRequest {
    pb::CommitSliceRequest {
        session_id: session_bytes(session),
        ino,
        chunk_index,
        slice: Some(slice_to_proto(slice)),
        new_size,
        mtime_ns: attrs.mtime_ns,
        mode: attrs.mode,
        uid: attrs.uid,
        gid: attrs.gid,
        atime_ns: attrs.atime_ns,
    }
}

fn create_request(
    session: SessionId,
    parent: Ino,
    name: &[u8],
    node: &NewNode,
) -> pb::CreateRequest {
    pb::CreateRequest {
        session_id: session_bytes(session),
        parent,
        name: bytes(name),
        kind: kind_to_proto(node.kind) as i32,
        mode: node.mode,
        uid: node.uid,
        gid: node.gid,
        rdev: node.rdev,
    }
}
