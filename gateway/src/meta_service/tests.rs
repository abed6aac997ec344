//! Unit tests of the `Meta` service shell and its workers: the error mapping for every engine
//! error, RPCs called in process against a real redb engine, session expiry, and deleted-data
//! cleanup against a real staging log and an in-memory store (with injected delete failures).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::memory::InMemory;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use proto::meta as pb;
use proto::meta::meta_server::Meta;
use tonic::{Code, Request, Status};

use super::*;
use crate::faulty_store::FaultyStore;
use crate::meta::{GatewayId, MetaConfig, MetaLocation, Slice};
use crate::node::workers::{self, expire_silent_sessions, DataCleaner};
use crate::node::{ClientSettings, Node};
use crate::staging::{BlockState, StagingLog};
use crate::volume::small_test_volume;

const GATEWAY_ID: GatewayId = [0x5a; 16];

/// The errno a status carries in `stagefs-errno`.
fn errno_of(status: &Status) -> i32 {
    status
        .metadata()
        .get(proto::ERRNO_METADATA_KEY)
        .unwrap_or_else(|| panic!("status without {}: {status:?}", proto::ERRNO_METADATA_KEY))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn every_engine_error_maps_to_its_errno_and_the_code_the_proto_promises() {
    let io = || crate::meta::KvError::Unavailable("disk went away".into());
    let cases: Vec<(MetaError, i32, Code)> = vec![
        (
            MetaError::NoSuchEntry {
                parent: 1,
                name: "x".into(),
            },
            libc::ENOENT,
            Code::NotFound,
        ),
        (MetaError::NoSuchInode(9), libc::ENOENT, Code::NotFound),
        (
            MetaError::AlreadyExists {
                parent: 1,
                name: "x".into(),
            },
            libc::EEXIST,
            Code::AlreadyExists,
        ),
        (
            MetaError::XattrExists {
                ino: 1,
                name: "user.a".into(),
            },
            libc::EEXIST,
            Code::AlreadyExists,
        ),
        (
            MetaError::NotADirectory(2),
            libc::ENOTDIR,
            Code::FailedPrecondition,
        ),
        (
            MetaError::IsADirectory(2),
            libc::EISDIR,
            Code::FailedPrecondition,
        ),
        (
            MetaError::DirectoryNotEmpty(2),
            libc::ENOTEMPTY,
            Code::FailedPrecondition,
        ),
        (
            MetaError::InvalidName {
                name: "a/b".into(),
                reason: "contains '/'",
            },
            libc::EINVAL,
            Code::InvalidArgument,
        ),
        (
            MetaError::NameTooLong { len: 256, max: 255 },
            libc::ENAMETOOLONG,
            Code::InvalidArgument,
        ),
        (
            MetaError::MoveIntoOwnSubtree(3),
            libc::EINVAL,
            Code::InvalidArgument,
        ),
        (
            MetaError::Invalid("bad".into()),
            libc::EINVAL,
            Code::InvalidArgument,
        ),
        (
            MetaError::SliceNotPending {
                session: 1,
                slice_id: 2,
            },
            libc::EPERM,
            Code::PermissionDenied,
        ),
        (
            MetaError::NotPermitted("hard link to a directory".into()),
            libc::EPERM,
            Code::PermissionDenied,
        ),
        (
            MetaError::NotOpen { session: 1, ino: 2 },
            libc::EBADF,
            Code::FailedPrecondition,
        ),
        (
            MetaError::TooManyLinks(4),
            libc::EMLINK,
            Code::FailedPrecondition,
        ),
        (
            MetaError::NoSpace("capacity".into()),
            libc::ENOSPC,
            Code::ResourceExhausted,
        ),
        (
            MetaError::NoSuchXattr {
                ino: 1,
                name: "user.a".into(),
            },
            libc::ENODATA,
            Code::NotFound,
        ),
        (
            MetaError::BadXattrName { len: 0, max: 255 },
            libc::ERANGE,
            Code::InvalidArgument,
        ),
        (
            MetaError::XattrValueTooLarge {
                len: 70_000,
                max: 65_536,
            },
            libc::E2BIG,
            Code::InvalidArgument,
        ),
        (
            MetaError::FileTooLarge(u64::MAX),
            libc::EFBIG,
            Code::OutOfRange,
        ),
        (MetaError::SessionGone(7), libc::EIO, Code::Internal),
        (
            MetaError::Corrupt("bad inode".into()),
            libc::EIO,
            Code::Internal,
        ),
        // Passing database I/O trouble is the one retryable EIO.
        (MetaError::Backend(io()), libc::EIO, Code::Unavailable),
    ];
    for (error, errno, code) in cases {
        let status = meta_status("Lookup", &error);
        assert_eq!(errno_of(&status), errno, "{error}");
        assert_eq!(status.code(), code, "{error}");
        assert_eq!(status.message(), format!("Lookup: {error}"));
    }
    let long = MetaError::NoSuchEntry {
        parent: 1,
        name: "x".repeat(7 << 20),
    };
    let status = meta_status("Lookup", &long);
    assert!(
        status.message().len() <= shared::MAX_ERROR_MESSAGE_BYTES,
        "a message quoting a client's 7 MiB name is cut: {} bytes",
        status.message().len()
    );
}

/// A service over a fresh redb database in a temporary directory.
/// A fresh redb engine in `dir`.
async fn engine(dir: &tempfile::TempDir, config: MetaConfig) -> Arc<dyn MetaEngine> {
    let location = MetaLocation::Redb(dir.path().join("meta.redb"));
    Arc::new(crate::meta::open(&location, config).await.unwrap())
}

/// A service over a gateway core with a fresh redb engine, a small staging log and an
/// in-memory store, all in `dir`.
async fn service(
    dir: &tempfile::TempDir,
    config: MetaConfig,
) -> (MetaService, Arc<dyn MetaEngine>, Arc<StagingLog>) {
    let engine = engine(dir, config).await;
    let log = staging_log(dir).await;
    let node = Arc::new(Node::new(
        log.clone(),
        engine.clone(),
        Arc::new(InMemory::new()),
        ClientSettings {
            store_url: "memory://".into(),
            gateway_id: GATEWAY_ID,
            gateway_address: "gateway.example:7070".into(),
            heartbeat_interval: Duration::from_millis(1500),
            direct_threshold: 0,
        },
        crate::limits::Limits::default(),
    ));
    (MetaService::new(node), engine, log)
}

fn fast_config() -> MetaConfig {
    MetaConfig {
        deleted_data_delay: Duration::ZERO,
        sync_commits: false,
        ..MetaConfig::default()
    }
}

fn entry(parent: u64, name: &str) -> Request<pb::EntryRequest> {
    Request::new(pb::EntryRequest {
        parent,
        name: name.as_bytes().to_vec().into(),
    })
}

#[tokio::test]
async fn rpcs_answer_through_the_engine_and_fail_with_errno_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let (service, _engine, _log) = service(&dir, fast_config()).await;

    let session = service
        .open_session(Request::new(pb::OpenSessionRequest {
            description: "unit test".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(session.session_id.len(), 16);
    assert_eq!(session.store_url, "memory://");
    assert_eq!(session.gateway_id, GATEWAY_ID.to_vec());
    assert_eq!(session.gateway_address, "gateway.example:7070");
    assert_eq!(session.heartbeat_interval_ms, 1500);

    let created = service
        .create(Request::new(pb::CreateRequest {
            session_id: session.session_id.clone(),
            parent: crate::meta::ROOT_INO,
            name: b"f".to_vec().into(),
            mode: 0o640,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .attr
        .unwrap();
    assert_eq!(created.kind, pb::FileKind::File as i32);
    assert_eq!(created.mode, 0o640);
    let found = service
        .lookup(entry(crate::meta::ROOT_INO, "f"))
        .await
        .unwrap()
        .into_inner()
        .attr
        .unwrap();
    assert_eq!(found.ino, created.ino);

    let missing = service
        .lookup(entry(crate::meta::ROOT_INO, "nope"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(errno_of(&missing), libc::ENOENT);
    assert!(missing.message().starts_with("Lookup: "), "{missing:?}");

    for limit in [0, MAX_READDIR_LIMIT + 1] {
        let refused = service
            .read_dir(Request::new(pb::ReadDirRequest {
                ino: crate::meta::ROOT_INO,
                after_cookie: 0,
                limit,
            }))
            .await
            .unwrap_err();
        assert_eq!(errno_of(&refused), libc::EINVAL, "limit {limit}");
    }
    let listing = service
        .read_dir(Request::new(pb::ReadDirRequest {
            ino: crate::meta::ROOT_INO,
            after_cookie: 0,
            limit: 10,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listing.entries.len(), 1);
    assert_eq!(&listing.entries[0].name[..], b"f");

    let confused_mkdir = service
        .mkdir(Request::new(pb::CreateRequest {
            parent: crate::meta::ROOT_INO,
            name: b"d".to_vec().into(),
            kind: pb::FileKind::Fifo as i32,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(errno_of(&confused_mkdir), libc::EINVAL);

    let bad_slice = service
        .record_pending_slice(Request::new(pb::PendingSliceRequest {
            session_id: session.session_id.clone(),
            slice: Some(pb::Slice {
                slice_id: 1,
                offset_in_chunk: 0,
                len: 10,
                gateway_id: vec![1, 2, 3].into(),
            }),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_slice.code(), Code::InvalidArgument);
    assert_eq!(errno_of(&bad_slice), libc::EINVAL);

    let ids = service
        .allocate_slice_ids(Request::new(pb::AllocateSliceIdsRequest {
            count: 5,
            session_id: session.session_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids.count, 5);
    assert!(ids.first > 0, "slice id 0 is the hole");

    let statfs = service
        .stat_fs(Request::new(pb::Empty {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(statfs.files, 2);
}

async fn staging_log(dir: &tempfile::TempDir) -> Arc<StagingLog> {
    small_test_volume(dir.path(), true).await
}

async fn stage(log: &StagingLog, key: &shared::BlockKey) {
    let data = vec![key.block_index as u8; key.len() as usize];
    log.write_block(
        *key,
        crate::node::record_with(key, &data),
        crc32c::crc32c(&data),
        crate::staging::Wait::Durable,
    )
    .await
    .unwrap();
}

async fn object_keys(store: &dyn ObjectStore) -> Vec<String> {
    let mut keys: Vec<String> = store
        .list(None)
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    keys
}

#[tokio::test]
async fn an_expired_sessions_pending_slice_is_dropped_from_staging_and_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let log = staging_log(&dir).await;
    let engine = engine(&dir, fast_config()).await;
    let store = Arc::new(FaultyStore::refusing_deletes());
    let cleaner = DataCleaner {
        records: Arc::new(crate::node::workers::EngineRecords(engine.clone())),
        staging: log.clone(),
        store: store.clone(),
        batch: 10,
    };

    // A client records a 5 MiB slice (two blocks) and stages both; block 0 was even uploaded.
    // Staged by this gateway (the cleaner takes only its own gateway's slices).
    let session = engine.open_session("", "dies").await.unwrap();
    let slice_id = engine.allocate_slice_ids(session, 1).await.unwrap().start;
    let slice = Slice {
        slice_id,
        offset_in_chunk: 0,
        len: 5 << 20,
        gateway_id: log.sb.gateway_id,
    };
    engine.record_pending_slice(session, &slice).await.unwrap();
    // Another gateway's deleted slice is not this cleaner's to take.
    let other_id = engine.allocate_slice_ids(session, 1).await.unwrap().start;
    let other = Slice {
        slice_id: other_id,
        offset_in_chunk: 0,
        len: 10,
        gateway_id: GATEWAY_ID,
    };
    engine.record_pending_slice(session, &other).await.unwrap();
    let keys = crate::meta::DeletedSlice {
        slice_id,
        len: slice.len,
        gateway_id: log.sb.gateway_id,
        due_ns: 0,
    }
    .block_keys();
    assert_eq!(keys.len(), 2);
    for key in &keys {
        stage(&log, key).await;
    }
    store
        .put(&keys[0].object_path(), PutPayload::from(vec![0u8; 4]))
        .await
        .unwrap();

    // A session heartbeating within the timeout survives; a silent one expires.
    let alive = engine.open_session("", "alive").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    engine.heartbeat(alive, &Default::default()).await.unwrap();
    let closed = expire_silent_sessions(&engine, Duration::from_millis(10))
        .await
        .unwrap();
    assert_eq!(closed, vec![session]);
    let remaining: Vec<_> = engine
        .list_sessions()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(remaining, vec![alive]);

    // The store refuses deletions: the staged blocks are dropped, the entry stays queued.
    let round = cleaner.clean_due().await.unwrap();
    assert_eq!((round.taken, round.cleaned, round.failed), (1, 0, 1));
    assert_eq!(round.blocks_dropped, 2);
    for key in &keys {
        assert_eq!(log.entry(key).unwrap().state, BlockState::Deleted, "{key}");
    }
    assert_eq!(object_keys(store.as_ref()).await, vec![keys[0].to_string()]);
    assert_eq!(
        engine
            .take_due_deleted_slices(None, i64::MAX, 10)
            .await
            .unwrap()
            .len(),
        2,
        "this gateway's slice stays queued, and the other gateway's was never taken"
    );

    // The store is back: the next round deletes the object and acknowledges the slice.
    store.refuse_deletes.store(false, Ordering::SeqCst);
    let round = cleaner.clean_due().await.unwrap();
    assert_eq!((round.taken, round.cleaned, round.failed), (1, 1, 0));
    assert_eq!(
        round.blocks_dropped, 0,
        "already dropped in the first round"
    );
    assert!(object_keys(store.as_ref()).await.is_empty());
    let left: Vec<u64> = engine
        .take_due_deleted_slices(None, i64::MAX, 10)
        .await
        .unwrap()
        .iter()
        .map(|s| s.slice_id)
        .collect();
    assert_eq!(
        left,
        vec![other_id],
        "the other gateway cleans its own slice"
    );
    assert_eq!(cleaner.clean_due().await.unwrap().taken, 0);
    log.shutdown().await;
}

#[tokio::test]
async fn workers_stop_when_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let log = staging_log(&dir).await;
    let engine = engine(&dir, fast_config()).await;
    let tasks = crate::tasks::Tasks::new();
    let node = Node::new(
        log.clone(),
        engine,
        Arc::new(InMemory::new()),
        ClientSettings {
            store_url: "memory://".into(),
            gateway_id: GATEWAY_ID,
            gateway_address: "gateway.example:7070".into(),
            heartbeat_interval: Duration::from_millis(20),
            direct_threshold: 0,
        },
        crate::limits::Limits::default(),
    );
    workers::start(
        &node,
        workers::WorkerConfig {
            heartbeat_interval: Duration::from_millis(20),
            cleanup_interval: Duration::from_millis(20),
            cleanup_batch: 4,
        },
        &tasks,
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    // A worker that ignored the stop would be aborted after the bound, and be slow to stop.
    tasks.drain(Duration::from_secs(30)).await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "workers stop when drained"
    );
    assert_eq!(tasks.fatal(), None);
    log.shutdown().await;
}

fn write_slice_request(
    session: crate::meta::SessionId,
    ino: u64,
    slice: &Slice,
    data: &[u8],
) -> Request<pb::WriteSliceRequest> {
    Request::new(pb::WriteSliceRequest {
        commit: Some(pb::CommitSliceRequest {
            session_id: shared::meta::session_to_wire(session).into(),
            ino,
            chunk_index: 0,
            slice: Some(slice_to_proto(slice)),
            new_size: u64::from(slice.offset_in_chunk + slice.len),
            mtime_ns: 1,
            ..Default::default()
        }),
        data: data.to_vec().into(),
        crc32c: crc32c::crc32c(data),
    })
}

/// A gateway's service with a session, an empty file `f` and a slice id leased for `data`.
struct WriteSliceCase {
    service: MetaService,
    engine: Arc<dyn MetaEngine>,
    log: Arc<StagingLog>,
    session: crate::meta::SessionId,
    file: crate::meta::Attr,
    slice: Slice,
}

impl WriteSliceCase {
    async fn new(dir: &tempfile::TempDir, data: &[u8]) -> WriteSliceCase {
        let (service, engine, log) = service(dir, fast_config()).await;
        let session = engine.open_session("", "writer").await.unwrap();
        let node = crate::meta::NewNode {
            kind: FileKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
        };
        let file = engine
            .create(session, crate::meta::ROOT_INO, b"f", &node)
            .await
            .unwrap();
        let slice = Slice {
            slice_id: engine.allocate_slice_ids(session, 1).await.unwrap().start,
            offset_in_chunk: 0,
            len: data.len() as u32,
            gateway_id: GATEWAY_ID,
        };
        WriteSliceCase {
            service,
            engine,
            log,
            session,
            file,
            slice,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_slice_stages_the_block_and_commits_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = b"one row of an append log\n".to_vec();
    let WriteSliceCase {
        service,
        engine,
        log,
        session,
        file,
        slice,
    } = WriteSliceCase::new(&dir, &data).await;

    let attr = service
        .write_slice(write_slice_request(session, file.ino, &slice, &data))
        .await
        .unwrap()
        .into_inner()
        .attr
        .unwrap();
    assert_eq!(attr.size, data.len() as u64);
    let key = shared::BlockKey::new(slice.slice_id, 0, slice.len).unwrap();
    let (staged, state) = log.read_block(&key).await.unwrap();
    assert_eq!(&staged[..], &data[..]);
    assert_eq!(state, BlockState::Staged);
    assert_eq!(engine.read_chunk(file.ino, 0).await.unwrap(), vec![slice]);

    // The same call again (a retry whose first answer was lost) changes nothing: the chunk does
    // not hold the id twice, which would have the older copy queued for deletion as shadowed.
    service
        .write_slice(write_slice_request(session, file.ino, &slice, &data))
        .await
        .unwrap();
    assert_eq!(engine.read_chunk(file.ino, 0).await.unwrap(), vec![slice]);
    assert_eq!(
        engine
            .take_due_deleted_slices(None, i64::MAX, 10)
            .await
            .unwrap(),
        vec![]
    );

    // Mode, owner and atime set while the data waited travel with it (and with a retry).
    let mut with_attrs = write_slice_request(session, file.ino, &slice, &data).into_inner();
    let commit = with_attrs.commit.as_mut().unwrap();
    (commit.mode, commit.uid, commit.gid, commit.atime_ns) =
        (Some(0o600), Some(1234), Some(5678), Some(99));
    let attr = service
        .write_slice(Request::new(with_attrs))
        .await
        .unwrap()
        .into_inner()
        .attr
        .unwrap();
    assert_eq!(
        (attr.mode, attr.uid, attr.gid, attr.atime_ns),
        (0o600, 1234, 5678, 99)
    );
    let stored = engine.getattr(file.ino).await.unwrap();
    assert_eq!(
        (stored.mode, stored.uid, stored.gid, stored.atime_ns),
        (0o600, 1234, 5678, 99)
    );

    // What the gateway must refuse, each with the errno the client returns, nothing committed.
    let other = Slice {
        slice_id: engine.allocate_slice_ids(session, 1).await.unwrap().start,
        ..slice
    };
    let wrong_gateway = Slice {
        gateway_id: [1; 16],
        ..other
    };
    let refused = service
        .write_slice(write_slice_request(
            session,
            file.ino,
            &wrong_gateway,
            &data,
        ))
        .await
        .unwrap_err();
    assert_eq!(errno_of(&refused), libc::EINVAL, "{refused:?}");
    assert!(refused.message().contains("names gateway"), "{refused:?}");
    let refused = service
        .write_slice(write_slice_request(session, file.ino, &other, &data[1..]))
        .await
        .unwrap_err();
    assert_eq!(errno_of(&refused), libc::EINVAL, "{refused:?}");
    let mut corrupt = write_slice_request(session, file.ino, &other, &data);
    corrupt.get_mut().crc32c ^= 1;
    let refused = service.write_slice(corrupt).await.unwrap_err();
    assert_eq!(refused.code(), Code::DataLoss, "{refused:?}");
    assert_eq!(engine.read_chunk(file.ino, 0).await.unwrap(), vec![slice]);
}

/// A `WriteSlice` whose commit fails once its block is staged leaves the slice pending under
/// its session, so that the block goes when the session ends rather than staying named by
/// nothing; and a write another session's id names stages nothing.
/// `Open` with `with_first_chunk` answers the file's chunk 0 (read after the open records the
/// handle); not asked, or for a directory, it answers none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_answers_the_first_chunk_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let data = b"a module\n".to_vec();
    let WriteSliceCase {
        service,
        engine,
        session,
        file,
        slice,
        ..
    } = WriteSliceCase::new(&dir, &data).await;
    let open = |ino: u64, with_first_chunk: bool| {
        service.open(Request::new(pb::HandleRequest {
            session_id: shared::meta::session_to_wire(session).into(),
            ino,
            with_first_chunk,
        }))
    };
    let empty = open(file.ino, true).await.unwrap().into_inner();
    assert!(empty.first_chunk_given);
    assert_eq!(empty.first_chunk, vec![]);
    service
        .write_slice(write_slice_request(session, file.ino, &slice, &data))
        .await
        .unwrap();
    let opened = open(file.ino, true).await.unwrap().into_inner();
    assert_eq!(opened.attr.unwrap().size, data.len() as u64);
    assert!(opened.first_chunk_given);
    assert_eq!(opened.first_chunk, vec![slice_to_proto(&slice)]);
    let not_asked = open(file.ino, false).await.unwrap().into_inner();
    assert!(!not_asked.first_chunk_given);
    assert_eq!(not_asked.first_chunk, vec![]);
    // Each open recorded a handle, as without the chunk.
    engine
        .release(session, &[file.ino, file.ino, file.ino])
        .await
        .unwrap();

    let dir_attr = engine
        .mkdir(crate::meta::ROOT_INO, b"d", 0o755, 0, 0)
        .await
        .unwrap();
    let answer = open(dir_attr.ino, true).await.unwrap().into_inner();
    assert!(!answer.first_chunk_given, "a directory has no chunk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_slice_whose_commit_fails_leaves_its_block_to_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let data = b"bytes that never make it into the file".to_vec();
    let WriteSliceCase {
        service,
        engine,
        log,
        session,
        file,
        slice,
    } = WriteSliceCase::new(&dir, &data).await;
    let key = shared::BlockKey::new(slice.slice_id, 0, slice.len).unwrap();

    // Another session's write under this id is refused before anything is staged.
    let thief = engine.open_session("", "thief").await.unwrap();
    let refused = service
        .write_slice(write_slice_request(thief, file.ino, &slice, &data))
        .await
        .unwrap_err();
    assert_eq!(errno_of(&refused), libc::EPERM, "{refused:?}");
    assert!(log.read_block(&key).await.is_err(), "nothing staged");
    assert_eq!(
        engine.pending_slice(session, slice.slice_id).await.unwrap(),
        None
    );

    // A chunk past the largest file: checked by the commit only, after the block is staged.
    let mut past_the_end = write_slice_request(session, file.ino, &slice, &data).into_inner();
    past_the_end.commit.as_mut().unwrap().chunk_index = u64::MAX / shared::layout::CHUNK_SIZE;
    let refused = service
        .write_slice(Request::new(past_the_end))
        .await
        .unwrap_err();
    assert_eq!(errno_of(&refused), libc::EFBIG, "{refused:?}");
    assert!(
        log.read_block(&key).await.is_ok(),
        "staged before the commit"
    );
    assert_eq!(engine.read_chunk(file.ino, 0).await.unwrap(), vec![]);
    assert_eq!(
        engine.pending_slice(session, slice.slice_id).await.unwrap(),
        Some((slice.len, GATEWAY_ID)),
        "recorded as pending once the commit failed"
    );
    engine.close_session(session).await.unwrap();
    let queued = engine
        .take_due_deleted_slices(None, i64::MAX, 10)
        .await
        .unwrap();
    assert_eq!(
        queued.iter().map(|q| q.slice_id).collect::<Vec<_>>(),
        vec![slice.slice_id],
        "queued for deletion with the session: {queued:?}"
    );
    log.shutdown().await;
}

/// A block may be staged only on the gateway its slice's pending record names: its readers ask
/// that gateway, so a block staged elsewhere would be unreadable until uploaded.
#[tokio::test]
async fn a_block_is_staged_only_on_the_gateway_its_slice_names() {
    let dir = tempfile::tempdir().unwrap();
    let log = staging_log(&dir).await;
    let engine = engine(&dir, fast_config()).await;
    let node = Node::new(
        log.clone(),
        engine.clone(),
        Arc::new(InMemory::new()),
        ClientSettings {
            store_url: "memory://".into(),
            gateway_id: GATEWAY_ID,
            gateway_address: "gateway.example:7070".into(),
            heartbeat_interval: Duration::from_millis(1500),
            direct_threshold: 0,
        },
        crate::limits::Limits::default(),
    );
    let tenant = crate::access::Tenant::anonymous();
    let session = engine.open_session("", "client").await.unwrap();
    let wire = shared::meta::session_to_wire(session);
    let ids = engine.allocate_slice_ids(session, 2).await.unwrap();
    let mine = Slice {
        slice_id: ids.start,
        offset_in_chunk: 0,
        len: 100,
        gateway_id: GATEWAY_ID,
    };
    let elsewhere = Slice {
        slice_id: ids.start + 1,
        gateway_id: [0xee; 16],
        ..mine
    };
    for slice in [&mine, &elsewhere] {
        engine.record_pending_slice(session, slice).await.unwrap();
    }
    let key = |slice: &Slice| shared::BlockKey::new(slice.slice_id, 0, 100).unwrap();
    node.may_stage(&tenant, &wire, &key(&mine)).await.unwrap();
    let refused = node
        .may_stage(&tenant, &wire, &key(&elsewhere))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("not on this one"), "{refused}");
    log.shutdown().await;
}
