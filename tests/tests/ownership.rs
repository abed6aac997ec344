//! Safe to share, ownership: what one client's session holds (its slice ids, its open handles, the
//! session itself) no other session can touch.
//!
//! A victim writes through a real mount: a 5 MiB file (two blocks, staged with `WriteBlocks` and
//! committed) and a small one (one `WriteSlice`), and keeps a third open after unlinking it. An
//! attacker with an independent gRPC client built from `proto/` then tries every move that used
//! to destroy committed data: recording the victim's slice ids as its own pending slices,
//! committing them into its own file, `WriteSlice` with them, staging other bytes under their
//! block keys in its own session (`WriteBlock`), releasing the victim's handles, taking, keeping
//! or giving back the lease of a directory the victim's mount made,
//! closing or heartbeating sessions it does not own (forged ids, malformed ids). Every attempt is
//! refused with the errno the proto promises; then the attacker closes its session, and once the
//! gateway's cleanup has demonstrably run after the attacks (a canary slice of the attacker's own
//! is dropped), the victim's files read back identical through a fresh mount, its open-unlinked
//! file through the handle it kept, and its blocks are still staged.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use bytes::Bytes;
use proto::meta::{self as pb};
use proto::staging::BlockState;
use stagefs_tests::rpc::{create, expect_errno, name, read_chunk, Meta};
use stagefs_tests::*;
use tonic::Code;

const ROOT: u64 = 1;
const BIG: u64 = 5 << 20;
const SMALL: u64 = 3000;

async fn lookup(meta: &mut Meta, entry: &str) -> pb::Attr {
    meta.lookup(pb::EntryRequest {
        parent: ROOT,
        name: name(entry),
    })
    .await
    .unwrap_or_else(|e| panic!("Lookup {entry}: {e:?}"))
    .into_inner()
    .attr
    .unwrap()
}

async fn take_dir_lease(meta: &mut Meta, session: &Bytes, dir: u64) -> bool {
    meta.take_dir_lease(pb::DirLeaseRequest {
        session_id: session.clone(),
        dir,
    })
    .await
    .unwrap_or_else(|e| panic!("TakeDirLease of {dir}: {e:?}"))
    .into_inner()
    .granted
}

fn keys_of(slices: &[pb::Slice]) -> Vec<String> {
    slices
        .iter()
        .flat_map(|s| {
            shared::meta::slice_block_keys(s.slice_id, s.len)
                .into_iter()
                .map(|k| k.to_string())
        })
        .collect()
}

fn commit(session: &Bytes, ino: u64, slice: &pb::Slice) -> pb::CommitSliceRequest {
    pb::CommitSliceRequest {
        session_id: session.clone(),
        ino,
        chunk_index: 0,
        slice: Some(slice.clone()),
        new_size: u64::from(slice.len),
        mtime_ns: 1,
        ..Default::default()
    }
}

fn released(session: &Bytes, ino: u64) -> pb::ReleaseRequest {
    pb::ReleaseRequest {
        session_id: session.clone(),
        inos: vec![ino],
    }
}

#[track_caller]
fn assert_file(path: &std::path::Path, pattern: &Pattern, len: u64, what: &str) {
    let mut file = File::open(path).unwrap_or_else(|e| panic!("{what}: open: {e}"));
    assert_eq!(file.metadata().unwrap().len(), len, "{what}: size");
    pattern
        .verify(&mut file, len)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

#[test]
fn another_session_cannot_touch_what_a_session_owns() {
    // Deleted data is due at once and cleanup ticks every second, so a wrongly queued slice
    // would be dropped within the test; uploads wait an hour, so the victim's blocks stay staged.
    let stack = FuseStack::start("ownership", |gateway| {
        gateway.args(["--deleted-data-delay", "0s", "--upload-delay", "1h"])
    });
    let victim = stack.mount("victim").start();
    let (big, small, kept) = (Pattern::new(1), Pattern::new(2), Pattern::new(3));
    for (file, pattern, len) in [("big", &big, BIG), ("small", &small, SMALL)] {
        let mut out = File::create(victim.join(file)).unwrap();
        pattern.write_to(&mut out, len, 1 << 20).unwrap();
        out.sync_all().unwrap();
    }
    let mut open_unlinked = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(victim.join("kept"))
        .unwrap();
    kept.write_to(&mut open_unlinked, SMALL, 1 << 20).unwrap();
    open_unlinked.sync_all().unwrap();
    // Made by the victim's mount, which holds its lease.
    std::fs::create_dir(victim.join("leased")).unwrap();

    stack.block_on(async {
        let mut meta = stack.gateway.meta_client().await;
        let mut staging = stack.gateway.client().await;
        let big_ino = lookup(&mut meta, "big").await.ino;
        let small_ino = lookup(&mut meta, "small").await.ino;
        let kept_ino = lookup(&mut meta, "kept").await.ino;
        std::fs::remove_file(victim.join("kept")).unwrap();
        let victim_slices: Vec<pb::Slice> = [
            read_chunk(&mut meta, big_ino).await,
            read_chunk(&mut meta, small_ino).await,
        ]
        .concat();
        assert!(victim_slices.len() >= 2, "{victim_slices:?}");
        let victim_keys = keys_of(&victim_slices);

        let attacker = meta
            .open_session(pb::OpenSessionRequest {
                description: "attacker".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .session_id;
        assert_eq!(attacker.len(), 16, "a session id is 128 bits");
        let own = create(&mut meta, &attacker, ROOT, "attacker's").await;

        for slice in &victim_slices {
            let id = slice.slice_id;
            expect_errno(
                &format!("RecordPendingSlice of the victim's slice {id}"),
                meta.record_pending_slice(pb::PendingSliceRequest {
                    session_id: attacker.clone(),
                    slice: Some(slice.clone()),
                })
                .await,
                libc::EPERM,
                Code::PermissionDenied,
            );
            expect_errno(
                &format!("CommitSlice of the victim's slice {id} into the attacker's file"),
                meta.commit_slice(commit(&attacker, own.ino, slice)).await,
                libc::EPERM,
                Code::PermissionDenied,
            );
            let data = vec![0u8; slice.len.min(4096) as usize];
            let short = pb::Slice {
                len: data.len() as u32,
                ..slice.clone()
            };
            expect_errno(
                &format!("WriteSlice of the victim's slice {id} into the attacker's file"),
                meta.write_slice(pb::WriteSliceRequest {
                    commit: Some(commit(&attacker, own.ino, &short)),
                    crc32c: crc32c::crc32c(&data),
                    data: data.into(),
                })
                .await,
                libc::EPERM,
                Code::PermissionDenied,
            );
            // Other bytes under the victim's block key, in the attacker's session: staged,
            // they would be uploaded over the victim's object once its own block left staging.
            let key = keys_of(std::slice::from_ref(slice)).remove(0);
            let forged = block_bytes(&key, 99);
            expect_errno(
                &format!("WriteBlock of the victim's block {key} in the attacker's session"),
                write_frames(
                    &mut staging,
                    with_session(block_frames(&key, &forged), &attacker),
                )
                .await,
                libc::EPERM,
                Code::PermissionDenied,
            );
        }
        expect_errno(
            "Release of the victim's open-unlinked file by another session",
            meta.release(released(&attacker, kept_ino)).await,
            libc::EBADF,
            Code::FailedPrecondition,
        );
        let forged = Bytes::from(rand::random::<[u8; 16]>().to_vec());
        expect_errno(
            "Release under a forged session id",
            meta.release(released(&forged, kept_ino)).await,
            libc::EIO,
            Code::Internal,
        );
        expect_errno(
            "CloseSession of a forged session id",
            meta.close_session(pb::SessionRequest {
                session_id: forged.clone(),
            })
            .await,
            libc::EIO,
            Code::Internal,
        );
        expect_errno(
            "Heartbeat of a forged session id",
            meta.heartbeat(pb::HeartbeatRequest {
                session_id: forged.clone(),
                ..Default::default()
            })
            .await,
            libc::EIO,
            Code::Internal,
        );
        expect_errno(
            "Release under a sequential 64-bit id of the old format",
            meta.release(released(
                &Bytes::from(2u64.to_be_bytes().to_vec()),
                kept_ino,
            ))
            .await,
            libc::EINVAL,
            Code::InvalidArgument,
        );
        let leased = lookup(&mut meta, "leased").await.ino;
        let granted = take_dir_lease(&mut meta, &attacker, leased).await;
        assert!(
            !granted,
            "the victim's directory lease went to another session"
        );
        let kept_by_attacker = meta
            .keep_dir_leases(pb::KeepDirLeasesRequest {
                session_id: attacker.clone(),
                keep: vec![leased],
                release: vec![leased],
            })
            .await
            .unwrap()
            .into_inner()
            .held;
        assert_eq!(
            kept_by_attacker,
            [false],
            "another session keeps the victim's lease"
        );
        let granted = take_dir_lease(&mut meta, &attacker, leased).await;
        assert!(!granted, "another session gave the victim's lease back");
        expect_errno(
            "KeepDirLeases under a forged session id",
            meta.keep_dir_leases(pb::KeepDirLeasesRequest {
                session_id: forged.clone(),
                keep: vec![leased],
                release: vec![leased],
            })
            .await,
            libc::EIO,
            Code::Internal,
        );
        expect_errno(
            "KeepDirLeases naming 4,097 directories",
            meta.keep_dir_leases(pb::KeepDirLeasesRequest {
                session_id: attacker.clone(),
                keep: vec![leased; shared::meta::MAX_DIR_LEASES_PER_CALL + 1],
                release: Vec::new(),
            })
            .await,
            libc::EINVAL,
            Code::InvalidArgument,
        );
        expect_errno(
            "OpenSession with a 7 MiB description",
            meta.open_session(pb::OpenSessionRequest {
                description: "x".repeat(7 << 20),
            })
            .await,
            libc::EINVAL,
            Code::InvalidArgument,
        );
        meta.close_session(pb::SessionRequest {
            session_id: attacker.clone(),
        })
        .await
        .unwrap();

        // A canary: a slice of a new session's own, committed and deleted after every attack.
        // Once the gateway dropped it, cleanup has run with whatever the attacks queued.
        let canary_session = meta
            .open_session(pb::OpenSessionRequest {
                description: "canary".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let sid = canary_session.session_id;
        let canary = create(&mut meta, &sid, ROOT, "canary").await;
        let ids = meta
            .allocate_slice_ids(pb::AllocateSliceIdsRequest {
                count: 1,
                session_id: sid.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let data = b"canary".to_vec();
        let slice = pb::Slice {
            slice_id: ids.first,
            offset_in_chunk: 0,
            len: data.len() as u32,
            gateway_id: canary_session.gateway_id.clone(),
        };
        meta.write_slice(pb::WriteSliceRequest {
            commit: Some(commit(&sid, canary.ino, &slice)),
            crc32c: crc32c::crc32c(&data),
            data: data.into(),
        })
        .await
        .unwrap();
        meta.release(released(&sid, canary.ino)).await.unwrap();
        meta.unlink(pb::EntryRequest {
            parent: ROOT,
            name: name("canary"),
        })
        .await
        .unwrap();
        let canary_keys = keys_of(&[slice]);
        within(
            Duration::from_secs(60),
            "the canary slice is dropped",
            async {
                loop {
                    let stats = stat_blocks(&mut staging, &canary_keys).await;
                    if matches!(
                        state_of(&stats[0]),
                        BlockState::Deleted | BlockState::Unknown
                    ) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        )
        .await;
        for (key, stat) in victim_keys
            .iter()
            .zip(stat_blocks(&mut staging, &victim_keys).await)
        {
            assert_eq!(state_of(&stat), BlockState::Staged, "victim block {key}");
        }
    });

    let reader = stack.mount("reader").start();
    assert_file(&reader.join("big"), &big, BIG, "big, through a fresh mount");
    assert_file(
        &reader.join("small"),
        &small,
        SMALL,
        "small, through a fresh mount",
    );
    open_unlinked.seek(SeekFrom::Start(0)).unwrap();
    let mut back = Vec::new();
    open_unlinked.read_to_end(&mut back).unwrap();
    assert_eq!(
        back,
        kept.bytes(0, SMALL as usize),
        "the open-unlinked file"
    );
    open_unlinked.write_all(b"still writable").unwrap();
    drop(open_unlinked);
    drop(reader);
    drop(victim);
}
