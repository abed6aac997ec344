//! The gateway's `Meta` service end to end: a real `stagefs-gateway` process with s3s-fs, driven
//! over gRPC the way a client mount drives it.
//!
//! * the namespace: sessions, mkdir/create/lookup/readdir/rename/unlink/rmdir/symlink/xattrs, and
//!   the errno every refusal carries in `stagefs-errno` (with the gRPC code the proto promises);
//! * data: slice ids, a pending slice, its blocks written with `WriteBlock`, the commit, and
//!   `ReadChunk`; then deletion: once `--deleted-data-delay` has passed, staged blocks are dropped
//!   at the gateway (never uploaded) and uploaded objects are deleted from S3;
//! * sessions: a client that stops heartbeating expires and the slice it never committed is
//!   cleaned up; a live one is untouched;
//! * durability: metadata written before a SIGKILL is all there after the restart.
//!
//! The I/O engine does not matter to any of this, so every scenario runs on `psync` only.

use std::time::Duration;

use bytes::Bytes;
use proto::meta::{self as pb};
use proto::staging::BlockState;
use stagefs_tests::rpc::{attr_of, create, errno_of, expect_errno, name, read_chunk, Meta};
use stagefs_tests::*;
use tonic::{Code, Status};

const SEED: u64 = 0x3e7a;
const ROOT: u64 = 1;
const ENGINE: &str = "psync";
/// How long background cleanup may take in these scenarios (it ticks every second).
const CLEANUP_LIMIT: Duration = Duration::from_secs(30);

async fn open_session(meta: &mut Meta, description: &str) -> pb::OpenSessionResponse {
    meta.open_session(pb::OpenSessionRequest {
        description: description.into(),
    })
    .await
    .unwrap_or_else(|e| panic!("OpenSession: {e:?}"))
    .into_inner()
}

async fn mkdir(meta: &mut Meta, parent: u64, dir: &str) -> Result<pb::Attr, Status> {
    meta.mkdir(pb::CreateRequest {
        parent,
        name: name(dir),
        kind: pb::FileKind::Dir as i32,
        mode: 0o755,
        uid: 1000,
        gid: 1000,
        ..Default::default()
    })
    .await
    .map(attr_of)
}

async fn lookup(meta: &mut Meta, parent: u64, entry: &str) -> Result<pb::Attr, Status> {
    meta.lookup(pb::EntryRequest {
        parent,
        name: name(entry),
    })
    .await
    .map(attr_of)
}

async fn unlink(meta: &mut Meta, parent: u64, entry: &str) {
    meta.unlink(pb::EntryRequest {
        parent,
        name: name(entry),
    })
    .await
    .unwrap_or_else(|e| panic!("Unlink {entry}: {e:?}"));
}

/// Every name in directory `ino`, read in pages of 2 so paging is exercised too.
async fn list_dir(meta: &mut Meta, ino: u64) -> Vec<String> {
    let mut names = Vec::new();
    let mut after_cookie = 0;
    loop {
        let page = meta
            .read_dir(pb::ReadDirRequest {
                ino,
                after_cookie,
                limit: 2,
            })
            .await
            .unwrap_or_else(|e| panic!("ReadDir {ino}: {e:?}"))
            .into_inner()
            .entries;
        for entry in &page {
            names.push(String::from_utf8_lossy(&entry.name).into_owned());
            after_cookie = entry.cookie;
        }
        if page.len() < 2 {
            return names;
        }
    }
}

/// A fresh slice id of the metadata engine, leased to `session`.
async fn allocate_slice_id(meta: &mut Meta, session: &Bytes) -> u64 {
    let ids = meta
        .allocate_slice_ids(pb::AllocateSliceIdsRequest {
            count: 1,
            session_id: session.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("AllocateSliceIds: {e:?}"))
        .into_inner();
    assert_eq!(ids.count, 1);
    ids.first
}

/// The block keys of a slice of `len` bytes: blocks of at most 4 MiB.
fn slice_keys(slice_id: u64, len: u32) -> Vec<String> {
    let len = u64::from(len);
    (0..len.div_ceil(shared::BLOCK_SIZE))
        .map(|index| {
            let block_len = (len - index * shared::BLOCK_SIZE).min(shared::BLOCK_SIZE);
            block_key(slice_id, index as u32, block_len as usize)
        })
        .collect()
}

/// Stages a slice the way a client does: `RecordPendingSlice`, then every block with
/// `WriteBlock` (acknowledged = durable on the device). Returns the block keys.
async fn stage_slice(
    meta: &mut Meta,
    staging: &mut Client,
    session: &Bytes,
    slice: &pb::Slice,
) -> Vec<String> {
    meta.record_pending_slice(pb::PendingSliceRequest {
        session_id: session.clone(),
        slice: Some(slice.clone()),
    })
    .await
    .unwrap_or_else(|e| panic!("RecordPendingSlice {}: {e:?}", slice.slice_id));
    let keys = slice_keys(slice.slice_id, slice.len);
    for key in &keys {
        write_block(staging, key, &block_bytes(key, SEED))
            .await
            .unwrap_or_else(|e| panic!("WriteBlock {key}: {e:?}"));
    }
    keys
}

async fn commit_slice(
    meta: &mut Meta,
    session: &Bytes,
    ino: u64,
    slice: &pb::Slice,
) -> Result<pb::Attr, Status> {
    meta.commit_slice(pb::CommitSliceRequest {
        session_id: session.clone(),
        ino,
        chunk_index: 0,
        slice: Some(slice.clone()),
        new_size: u64::from(slice.offset_in_chunk) + u64::from(slice.len),
        mtime_ns: 1_700_000_000_000_000_000,
        ..Default::default()
    })
    .await
    .map(attr_of)
}

fn new_slice(slice_id: u64, len: u32, gateway_id: &Bytes) -> pb::Slice {
    pb::Slice {
        slice_id,
        offset_in_chunk: 0,
        len,
        gateway_id: gateway_id.clone(),
    }
}

/// Waits until every key is deleted at the gateway: StatBlocks says DELETED (or UNKNOWN once its
/// segment was reused) and ReadBlock answers NOT_FOUND.
async fn wait_dropped_at_gateway(staging: &mut Client, keys: &[String], what: &str) {
    within(CLEANUP_LIMIT, what, async {
        loop {
            let states: Vec<BlockState> = stat_blocks(staging, keys)
                .await
                .iter()
                .map(state_of)
                .collect();
            if states
                .iter()
                .all(|s| matches!(s, BlockState::Deleted | BlockState::Unknown))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    for key in keys {
        let status = read_block(staging, key)
            .await
            .expect_err("a dropped block is not served");
        assert_eq!(status.code(), Code::NotFound, "ReadBlock {key}: {status:?}");
    }
}

/// The gateway id of `Status` (a uuid string) as its 16 bytes.
fn uuid_bytes(text: &str) -> Vec<u8> {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    assert_eq!(hex.len(), 32, "not a uuid: {text}");
    (0..16)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

async fn namespace_round_trips() {
    let dir = TestDir::new("meta-namespace");
    let s3 = S3Server::start_in(dir.join("s3")).await;
    let gateway = Gateway::builder(dir.path(), &s3, ENGINE).start().await;
    let mut meta = gateway.meta_client().await;
    let mut staging = gateway.client().await;

    let session = open_session(&mut meta, "namespace test").await;
    assert_eq!(session.store_url, s3.store_url());
    assert_eq!(
        session.gateway_id.to_vec(),
        uuid_bytes(&status(&mut staging).await.gateway_id),
        "OpenSession names the gateway whose device staged the blocks"
    );
    assert_eq!(session.gateway_address, gateway.addr().to_string());
    assert_eq!(session.heartbeat_interval_ms, 5000, "default heartbeat");
    assert!(
        dir.join("device.img.meta.redb").is_file(),
        "the database defaults to <device>.meta.redb"
    );
    let sid = session.session_id;

    let projects = mkdir(&mut meta, ROOT, "projects").await.unwrap();
    assert_eq!(projects.kind, pb::FileKind::Dir as i32);
    let file = create(&mut meta, &sid, projects.ino, "a.txt").await;
    assert_eq!(
        lookup(&mut meta, projects.ino, "a.txt").await.unwrap(),
        file
    );
    for extra in ["b", "c", "d"] {
        create(&mut meta, &sid, projects.ino, extra).await;
    }
    assert_eq!(list_dir(&mut meta, ROOT).await, vec!["projects"]);
    let mut listed = list_dir(&mut meta, projects.ino).await;
    listed.sort();
    assert_eq!(listed, vec!["a.txt", "b", "c", "d"]);

    meta.rename(pb::RenameRequest {
        parent: projects.ino,
        name: name("a.txt"),
        new_parent: ROOT,
        new_name: name("moved.txt"),
        flags: 0,
    })
    .await
    .unwrap();
    assert_eq!(
        lookup(&mut meta, ROOT, "moved.txt").await.unwrap().ino,
        file.ino
    );
    expect_errno(
        "Lookup of a renamed-away name",
        lookup(&mut meta, projects.ino, "a.txt").await,
        libc::ENOENT,
        Code::NotFound,
    );
    expect_errno(
        "Rename RENAME_NOREPLACE onto an existing name",
        meta.rename(pb::RenameRequest {
            parent: projects.ino,
            name: name("b"),
            new_parent: projects.ino,
            new_name: name("c"),
            flags: 1,
        })
        .await,
        libc::EEXIST,
        Code::AlreadyExists,
    );

    // xattrs: set, get, list, remove, and a missing one.
    meta.set_xattr(pb::SetXattrRequest {
        ino: file.ino,
        name: name("user.tag"),
        value: name("checkpoint-7"),
        flags: 0,
    })
    .await
    .unwrap();
    let value = meta
        .get_xattr(pb::XattrRequest {
            ino: file.ino,
            name: name("user.tag"),
        })
        .await
        .unwrap()
        .into_inner()
        .value;
    assert_eq!(&value[..], b"checkpoint-7");
    let names = meta
        .list_xattr(pb::InodeRequest { ino: file.ino })
        .await
        .unwrap()
        .into_inner()
        .names;
    assert_eq!(names, vec![name("user.tag")]);
    expect_errno(
        "SetXattr XATTR_CREATE of an existing attribute",
        meta.set_xattr(pb::SetXattrRequest {
            ino: file.ino,
            name: name("user.tag"),
            value: name("other"),
            flags: 1,
        })
        .await,
        libc::EEXIST,
        Code::AlreadyExists,
    );
    meta.remove_xattr(pb::XattrRequest {
        ino: file.ino,
        name: name("user.tag"),
    })
    .await
    .unwrap();
    let missing = meta
        .get_xattr(pb::XattrRequest {
            ino: file.ino,
            name: name("user.tag"),
        })
        .await
        .expect_err("GetXattr of a removed attribute");
    assert_eq!(errno_of(&missing), libc::ENODATA, "{missing:?}");

    // Symlinks.
    let link = meta
        .symlink(pb::SymlinkRequest {
            parent: ROOT,
            name: name("latest"),
            target: name("projects/b"),
            uid: 1000,
            gid: 1000,
        })
        .await
        .map(attr_of)
        .unwrap();
    assert_eq!(link.kind, pb::FileKind::Symlink as i32);
    let target = meta
        .readlink(pb::InodeRequest { ino: link.ino })
        .await
        .unwrap()
        .into_inner()
        .target;
    assert_eq!(&target[..], b"projects/b");

    // The errno of each refusal, as the FUSE client will hand it to the kernel.
    expect_errno(
        "Lookup of a missing name",
        lookup(&mut meta, ROOT, "nope").await,
        libc::ENOENT,
        Code::NotFound,
    );
    expect_errno(
        "GetAttr of a missing inode",
        meta.get_attr(pb::InodeRequest { ino: 999_999 }).await,
        libc::ENOENT,
        Code::NotFound,
    );
    expect_errno(
        "Mkdir of an existing name",
        mkdir(&mut meta, ROOT, "projects").await,
        libc::EEXIST,
        Code::AlreadyExists,
    );
    expect_errno(
        "Rmdir of a non-empty directory",
        meta.rmdir(pb::EntryRequest {
            parent: ROOT,
            name: name("projects"),
        })
        .await,
        libc::ENOTEMPTY,
        Code::FailedPrecondition,
    );
    let long = "x".repeat(256);
    expect_errno(
        "Mkdir with a 256-byte name",
        mkdir(&mut meta, ROOT, &long).await,
        libc::ENAMETOOLONG,
        Code::InvalidArgument,
    );
    expect_errno(
        "Lookup of a 256-byte name",
        lookup(&mut meta, ROOT, &long).await,
        libc::ENAMETOOLONG,
        Code::InvalidArgument,
    );
    expect_errno(
        "Lookup through a file",
        lookup(&mut meta, file.ino, "x").await,
        libc::ENOTDIR,
        Code::FailedPrecondition,
    );
    expect_errno(
        "Unlink of a directory",
        meta.unlink(pb::EntryRequest {
            parent: ROOT,
            name: name("projects"),
        })
        .await,
        libc::EISDIR,
        Code::FailedPrecondition,
    );
    expect_errno(
        "Rename of a directory into itself",
        meta.rename(pb::RenameRequest {
            parent: ROOT,
            name: name("projects"),
            new_parent: projects.ino,
            new_name: name("inside"),
            flags: 0,
        })
        .await,
        libc::EINVAL,
        Code::InvalidArgument,
    );

    // Emptied, the directory goes.
    for entry in ["b", "c", "d"] {
        unlink(&mut meta, projects.ino, entry).await;
    }
    assert!(list_dir(&mut meta, projects.ino).await.is_empty());
    meta.rmdir(pb::EntryRequest {
        parent: ROOT,
        name: name("projects"),
    })
    .await
    .unwrap();
    let mut root = list_dir(&mut meta, ROOT).await;
    root.sort();
    assert_eq!(root, vec!["latest", "moved.txt"]);
    // b, c and d were created open (Create opens for the session): unlinked, they live on
    // until the session lets go of them.
    let statfs = meta.stat_fs(pb::Empty {}).await.unwrap().into_inner();
    assert_eq!(
        statfs.files, 6,
        "root, moved.txt, latest and three unlinked open files"
    );
    meta.close_session(pb::SessionRequest {
        session_id: sid.clone(),
    })
    .await
    .unwrap();
    let statfs = meta.stat_fs(pb::Empty {}).await.unwrap().into_inner();
    assert_eq!(statfs.files, 3, "root, moved.txt, latest");
    expect_errno(
        "Heartbeat of a closed session",
        meta.heartbeat(pb::HeartbeatRequest {
            session_id: sid.clone(),
            ..Default::default()
        })
        .await,
        libc::EIO,
        Code::Internal,
    );
}

async fn deleted_data_is_dropped_and_deleted_from_s3() {
    let dir = TestDir::new("meta-deleted-data");
    let s3 = S3Server::start_in(dir.join("s3")).await;
    let gateway = Gateway::builder(dir.path(), &s3, ENGINE)
        .args(["--deleted-data-delay", "1s", "--uploads-paused"])
        .start()
        .await;
    let mut meta = gateway.meta_client().await;
    let mut staging = gateway.client().await;
    let session = open_session(&mut meta, "data test").await;
    let sid = session.session_id;

    // File "uploaded": a 5 MiB slice (two blocks), committed, then drained to S3.
    let uploaded = create(&mut meta, &sid, ROOT, "uploaded").await;
    let uploaded_slice = new_slice(
        allocate_slice_id(&mut meta, &sid).await,
        5 << 20,
        &session.gateway_id,
    );
    let uploaded_keys = stage_slice(&mut meta, &mut staging, &sid, &uploaded_slice).await;
    let attr = commit_slice(&mut meta, &sid, uploaded.ino, &uploaded_slice)
        .await
        .unwrap();
    assert_eq!(attr.size, 5 << 20);
    assert_eq!(
        lookup(&mut meta, ROOT, "uploaded").await.unwrap().size,
        5 << 20
    );
    assert_eq!(
        read_chunk(&mut meta, uploaded.ino).await,
        vec![uploaded_slice.clone()]
    );
    set_uploads_paused(&mut staging, false).await;
    wait_uploaded(&mut staging, &uploaded_keys, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("WaitUploaded: {e:?}"));
    set_uploads_paused(&mut staging, true).await;
    assert_objects_identical(&s3, &uploaded_keys, SEED).await;

    // File "staged": 100 KiB that stays on the device (uploads are paused again).
    let staged = create(&mut meta, &sid, ROOT, "staged").await;
    let staged_slice = new_slice(
        allocate_slice_id(&mut meta, &sid).await,
        100_000,
        &session.gateway_id,
    );
    let staged_keys = stage_slice(&mut meta, &mut staging, &sid, &staged_slice).await;
    commit_slice(&mut meta, &sid, staged.ino, &staged_slice)
        .await
        .unwrap();
    assert_eq!(
        read_chunk(&mut meta, staged.ino).await,
        vec![staged_slice.clone()]
    );
    assert_eq!(
        state_of(&stat_blocks(&mut staging, &staged_keys).await[0]),
        BlockState::Staged
    );

    // Closing the handles Create opened (in one call, as a mount gathers them), then
    // unlinking, deletes both files and queues their data.
    expect_errno(
        "Release of more handles than one call may give back",
        meta.release(pb::ReleaseRequest {
            session_id: sid.clone(),
            inos: vec![staged.ino; shared::meta::MAX_RELEASE_BATCH + 1],
        })
        .await,
        libc::EINVAL,
        Code::InvalidArgument,
    );
    meta.release(pb::ReleaseRequest {
        session_id: sid.clone(),
        inos: vec![uploaded.ino, staged.ino],
    })
    .await
    .unwrap();
    unlink(&mut meta, ROOT, "uploaded").await;
    unlink(&mut meta, ROOT, "staged").await;
    expect_errno(
        "ReadChunk of a deleted file",
        meta.read_chunk(pb::ReadChunkRequest {
            ino: staged.ino,
            chunk_index: 0,
        })
        .await,
        libc::ENOENT,
        Code::NotFound,
    );

    wait_dropped_at_gateway(
        &mut staging,
        &staged_keys,
        "the staged blocks of the deleted file are dropped at the gateway",
    )
    .await;
    within(
        CLEANUP_LIMIT,
        "the uploaded objects of the deleted file disappear from S3",
        async {
            loop {
                let mut left = 0;
                for key in &uploaded_keys {
                    left += s3.exists(key).await as usize;
                }
                if left == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
    // The dropped blocks are never uploaded, even with the drain running again.
    set_uploads_paused(&mut staging, false).await;
    drain(&mut staging, Duration::from_secs(60)).await.unwrap();
    for key in &staged_keys {
        assert!(
            !s3.exists(key).await,
            "{key} was uploaded after its deletion"
        );
    }
    assert!(
        gateway.log().contains("deleted data cleaned up"),
        "the cleanup is logged"
    );
}

async fn silent_session_expires_and_its_pending_slice_is_cleaned() {
    let dir = TestDir::new("meta-session-expiry");
    let s3 = S3Server::start_in(dir.join("s3")).await;
    let gateway = Gateway::builder(dir.path(), &s3, ENGINE)
        .args([
            "--heartbeat-interval",
            "300ms",
            "--deleted-data-delay",
            "0s",
            "--uploads-paused",
        ])
        .start()
        .await;
    let mut meta = gateway.meta_client().await;
    let mut staging = gateway.client().await;

    let silent = open_session(&mut meta, "never heartbeats").await;
    assert_eq!(silent.heartbeat_interval_ms, 300);
    let alive = open_session(&mut meta, "heartbeats").await;
    let file = create(&mut meta, &alive.session_id, ROOT, "f").await;

    // Each session stages a slice and never commits it.
    let silent_slice = new_slice(
        allocate_slice_id(&mut meta, &silent.session_id).await,
        70_000,
        &silent.gateway_id,
    );
    let silent_keys = stage_slice(&mut meta, &mut staging, &silent.session_id, &silent_slice).await;
    let alive_slice = new_slice(
        allocate_slice_id(&mut meta, &alive.session_id).await,
        80_000,
        &alive.gateway_id,
    );
    let alive_keys = stage_slice(&mut meta, &mut staging, &alive.session_id, &alive_slice).await;

    let heartbeats = {
        let mut meta = meta.clone();
        let session_id = alive.session_id.clone();
        tokio::spawn(async move {
            loop {
                meta.heartbeat(pb::HeartbeatRequest {
                    session_id: session_id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("the live session's heartbeat failed: {e:?}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    wait_dropped_at_gateway(
        &mut staging,
        &silent_keys,
        "the silent session expires and its staged slice is dropped",
    )
    .await;
    expect_errno(
        "Heartbeat of an expired session",
        meta.heartbeat(pb::HeartbeatRequest {
            session_id: silent.session_id.clone(),
            ..Default::default()
        })
        .await,
        libc::EIO,
        Code::Internal,
    );
    expect_errno(
        "CommitSlice by an expired session",
        commit_slice(&mut meta, &silent.session_id, file.ino, &silent_slice).await,
        libc::EIO,
        Code::Internal,
    );
    assert!(
        gateway.log().contains("session expired"),
        "the expiry is logged"
    );

    // The live session and its slice are untouched, and it can still commit.
    assert_eq!(
        state_of(&stat_blocks(&mut staging, &alive_keys).await[0]),
        BlockState::Staged
    );
    let attr = commit_slice(&mut meta, &alive.session_id, file.ino, &alive_slice)
        .await
        .unwrap();
    assert_eq!(attr.size, 80_000);
    heartbeats.abort();
    let _ = heartbeats.await;
}

async fn metadata_survives_sigkill() {
    let dir = TestDir::new("meta-sigkill");
    let s3 = S3Server::start_in(dir.join("s3")).await;
    let mut gateway = Gateway::builder(dir.path(), &s3, ENGINE)
        .args(["--advertise", "gateway.example:7443"])
        .start()
        .await;
    let mut meta = gateway.meta_client().await;
    let mut staging = gateway.client().await;
    let session = open_session(&mut meta, "before the crash").await;
    assert_eq!(session.gateway_address, "gateway.example:7443");
    let sid = session.session_id;

    let keep = mkdir(&mut meta, ROOT, "keep").await.unwrap();
    let file = create(&mut meta, &sid, keep.ino, "weights.bin").await;
    let slice = new_slice(
        allocate_slice_id(&mut meta, &sid).await,
        300_000,
        &session.gateway_id,
    );
    let keys = stage_slice(&mut meta, &mut staging, &sid, &slice).await;
    let committed = commit_slice(&mut meta, &sid, file.ino, &slice)
        .await
        .unwrap();
    meta.set_xattr(pb::SetXattrRequest {
        ino: file.ino,
        name: name("user.step"),
        value: name("1200"),
        flags: 0,
    })
    .await
    .unwrap();
    // A namespace change is durable once synced (README, SEMANTICS), as a mount's fsync does.
    meta.sync(pb::Empty {}).await.unwrap();

    gateway.kill9();
    gateway.restart().await;
    let mut meta = gateway.meta_client().await;
    let mut staging = gateway.client().await;

    let found_dir = lookup(&mut meta, ROOT, "keep").await.unwrap();
    assert_eq!(found_dir.ino, keep.ino);
    let found = lookup(&mut meta, keep.ino, "weights.bin").await.unwrap();
    assert_eq!(
        (found.ino, found.size, found.mtime_ns),
        (committed.ino, committed.size, committed.mtime_ns),
        "the file's attributes after the restart"
    );
    assert_eq!(read_chunk(&mut meta, file.ino).await, vec![slice]);
    let value = meta
        .get_xattr(pb::XattrRequest {
            ino: file.ino,
            name: name("user.step"),
        })
        .await
        .unwrap()
        .into_inner()
        .value;
    assert_eq!(&value[..], b"1200");
    for key in &keys {
        assert_eq!(
            read_block(&mut staging, key).await.unwrap(),
            block_bytes(key, SEED)
        );
    }
    // The session outlives the restart: clients could not heartbeat while the gateway was down.
    meta.heartbeat(pb::HeartbeatRequest {
        session_id: sid.clone(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("Heartbeat of a session opened before the restart: {e:?}"));
    let next = open_session(&mut meta, "after the crash").await;
    assert_ne!(next.session_id, sid, "a new session has a new id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn meta_namespace_round_trips() {
    run_scenario(
        "meta_namespace_round_trips",
        Duration::from_secs(120),
        namespace_round_trips(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn meta_deleted_data_is_dropped_and_deleted_from_s3() {
    run_scenario(
        "meta_deleted_data_is_dropped_and_deleted_from_s3",
        Duration::from_secs(180),
        deleted_data_is_dropped_and_deleted_from_s3(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn meta_silent_session_expires_and_its_pending_slice_is_cleaned() {
    run_scenario(
        "meta_silent_session_expires_and_its_pending_slice_is_cleaned",
        Duration::from_secs(120),
        silent_session_expires_and_its_pending_slice_is_cleaned(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn meta_survives_sigkill() {
    run_scenario(
        "meta_survives_sigkill",
        Duration::from_secs(120),
        metadata_survives_sigkill(),
    )
    .await;
}
