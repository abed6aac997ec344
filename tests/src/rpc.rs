//! gRPC with a gateway's `Meta` service as the tests drive it: a few calls, the errno a refusal
//! carries in `stagefs-errno`, and what a refusal must look like.

use bytes::Bytes;
use client::fs::GatewayChannel;
use proto::meta::meta_client::MetaClient;
use proto::meta::{self as pb};
use tonic::{Code, Status};

/// A `Meta` client over a connection the client's channel module built.
pub type Meta = MetaClient<GatewayChannel>;

/// The errno a failed RPC carries in `stagefs-errno`.
pub fn errno_of(status: &Status) -> i32 {
    let value = status
        .metadata()
        .get(proto::ERRNO_METADATA_KEY)
        .unwrap_or_else(|| {
            panic!(
                "{:?} {:?} carries no {} metadata",
                status.code(),
                status.message(),
                proto::ERRNO_METADATA_KEY
            )
        });
    value
        .to_str()
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "{} is not a decimal errno: {value:?}",
                proto::ERRNO_METADATA_KEY
            )
        })
}

/// Asserts that `result` failed with `errno` and `code`.
pub fn expect_errno<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, Status>,
    errno: i32,
    code: Code,
) {
    let status = match result {
        Ok(value) => panic!("{what}: expected errno {errno}, got success {value:?}"),
        Err(status) => status,
    };
    assert_eq!(
        (errno_of(&status), status.code()),
        (errno, code),
        "{what}: {status:?}"
    );
    assert!(
        !status.message().is_empty(),
        "{what}: the message says nothing"
    );
}

pub fn name(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

pub fn attr_of(response: tonic::Response<pb::AttrResponse>) -> pb::Attr {
    response
        .into_inner()
        .attr
        .expect("AttrResponse has an attr")
}

/// A `Mkdir` of `name` (mode 0755) in the root.
pub fn mkdir_request(name: &str) -> pb::CreateRequest {
    pb::CreateRequest {
        parent: 1,
        name: self::name(name),
        kind: pb::FileKind::Dir as i32,
        mode: 0o755,
        ..Default::default()
    }
}

/// Creates regular file `file` in `parent` for `session` (mode 0644, uid/gid 1000).
pub async fn create(meta: &mut Meta, session: &Bytes, parent: u64, file: &str) -> pb::Attr {
    meta.create(pb::CreateRequest {
        session_id: session.clone(),
        parent,
        name: name(file),
        kind: pb::FileKind::File as i32,
        mode: 0o644,
        uid: 1000,
        gid: 1000,
        rdev: 0,
    })
    .await
    .map(attr_of)
    .unwrap_or_else(|e| panic!("Create {file}: {e:?}"))
}

/// The slices of chunk 0 of `ino`.
pub async fn read_chunk(meta: &mut Meta, ino: u64) -> Vec<pb::Slice> {
    meta.read_chunk(pb::ReadChunkRequest {
        ino,
        chunk_index: 0,
    })
    .await
    .unwrap_or_else(|e| panic!("ReadChunk {ino}: {e:?}"))
    .into_inner()
    .slices
}

/// What a caller presenting the token `secret` sends.
pub fn with_token(secret: &str) -> client::fs::GatewayAccess {
    client::fs::GatewayAccess::default()
        .with_token(secret)
        .expect("a valid token")
}

/// Opens a session described as `description`.
pub async fn open_session(meta: &mut Meta, description: &str) -> pb::OpenSessionResponse {
    meta.open_session(pb::OpenSessionRequest {
        description: description.into(),
    })
    .await
    .unwrap_or_else(|e| panic!("OpenSession {description}: {e:?}"))
    .into_inner()
}
