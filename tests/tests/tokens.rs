//! Safe to share, tenants: a gateway started with `--tokens FILE` serves only callers that
//! present a known token, and each only what its access level allows, checked at the gateway.
//!
//! * no token, a wrong one, or a malformed header: `UNAUTHENTICATED` on raw RPCs of both
//!   services, and `stagefs mount` fails with a message that says a token is needed;
//! * an `rw` token mounts, writes and reads; an `ro` token mounts and reads, and every change fails
//!   with EROFS through the mount and with `PERMISSION_DENIED`/EROFS on a raw RPC (so a client
//!   that ignores its own read-only flag changes nothing either);
//! * only an `admin` token may pause uploads, retry quarantined blocks or delete blocks;
//! * a session belongs to the tenant that opened it: another tenant's calls find no such session;
//! * a token with `root = "/team-a"` sees that directory as the root: its mount lists, reads and
//!   writes only that tree (uploaded blocks read through the gateway, which withholds the
//!   store's address), and every RPC naming an inode or block of another tree fails as if it
//!   did not exist, or is refused;
//! * rotation: the file is edited and the gateway sent SIGHUP; the old secret is refused from then
//!   on, the new one works, and a broken file leaves the tokens in force.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use client::fs::GatewayAccess;
use proto::meta::{self as pb};
use proto::staging::{DeleteBlocksRequest, RetryQuarantinedRequest, SetUploadsPausedRequest};
use stagefs_tests::rpc::{
    attr_of, errno_of, expect_errno, mkdir_request, name, open_session, read_chunk, with_token,
};
use stagefs_tests::*;
use tonic::Code;

const TRAINING: &str = "training-0123456789abcdef0123456789abcdef";
const READERS: &str = "readers-0123456789abcdef0123456789abcdef";
const OPS: &str = "ops-0123456789abcdef0123456789abcdef0123";
const ROTATED: &str = "training-rotated-0123456789abcdef012345";
const TEAM: &str = "team-a-0123456789abcdef0123456789abcdef0";

fn tokens_file(entries: &[(&str, &str, &str)]) -> String {
    entries
        .iter()
        .map(|(name, secret, access)| {
            format!(
                "[[token]]\nname = \"{name}\"\nsecret = \"{secret}\"\naccess = \"{access}\"\n\n"
            )
        })
        .collect()
}

fn token_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, format!("{secret}\n")).unwrap();
    path
}

#[test]
fn tokens_decide_who_may_connect_and_what_they_may_do() {
    let dir = TestDir::new("tokens-config");
    let tokens = dir.join("tokens.toml");
    fs::write(
        &tokens,
        tokens_file(&[
            ("training", TRAINING, "rw"),
            ("readers", READERS, "ro"),
            ("ops", OPS, "admin"),
        ]),
    )
    .unwrap();
    let stack = FuseStack::start("tokens", |gateway| gateway.tokens(&tokens, OPS));
    let gateway = stack.gateway.addr().to_string();

    // No token, a wrong one: refused before any service code runs, on both services.
    stack.block_on(async {
        for (what, caller) in [
            ("no token", GatewayAccess::default()),
            (
                "a wrong token",
                with_token("wrong-0123456789abcdef0123456789abcdef"),
            ),
        ] {
            let mut meta = stack.gateway.meta_client_as(&caller).await;
            let refused = meta.stat_fs(pb::Empty {}).await.unwrap_err();
            assert_eq!(refused.code(), Code::Unauthenticated, "{what}: {refused:?}");
            let mut staging = stack.gateway.client_as(&caller).await;
            let refused = status_of(&mut staging).await.unwrap_err();
            assert_eq!(refused.code(), Code::Unauthenticated, "{what}: {refused:?}");
        }
    });
    let refused_at = stack.dir.join("refused");
    fs::create_dir(&refused_at).unwrap();
    let stderr = failing_mount(&gateway, &refused_at, &[]);
    assert!(
        stderr.contains("requires a token"),
        "the mount says why: {stderr}"
    );

    // rw: a mount writes and reads.
    let training_file = token_file(stack.dir.path(), "training.token", TRAINING);
    let writer = stack
        .mount("writer")
        .args(["--token-file", training_file.to_str().unwrap()])
        .start();
    fs::write(writer.join("shared.txt"), b"written by training").unwrap();
    fs::create_dir(writer.join("dir")).unwrap();

    // ro: reads, and every change is EROFS, through the mount (the gateway refuses it: the
    // mount itself is not read-only)...
    let reader = stack.mount("reader").env("STAGEFS_TOKEN", READERS).start();
    assert_eq!(
        fs::read(reader.join("shared.txt")).unwrap(),
        b"written by training"
    );
    assert_errno(
        File::create(reader.join("new.txt")),
        libc::EROFS,
        "create with a read-only token",
    );
    assert_errno(
        fs::create_dir(reader.join("newdir")),
        libc::EROFS,
        "mkdir with a read-only token",
    );
    assert_errno(
        fs::remove_file(reader.join("shared.txt")),
        libc::EROFS,
        "unlink with a read-only token",
    );
    assert_errno(
        fs::OpenOptions::new()
            .write(true)
            .open(reader.join("shared.txt"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"overwrite").map(|()| f))
            .and_then(|f| f.sync_all()),
        libc::EROFS,
        "overwrite with a read-only token",
    );
    assert_eq!(
        fs::read(writer.join("shared.txt")).unwrap(),
        b"written by training",
        "nothing the read-only tenant tried changed the file"
    );

    stack.block_on(async {
        // ... and on raw RPCs, which a client that ignores its own flags could send.
        let mut meta = stack.gateway.meta_client_as(&with_token(READERS)).await;
        expect_errno(
            "Mkdir with a read-only token",
            meta.mkdir(mkdir_request("raw")).await,
            libc::EROFS,
            Code::PermissionDenied,
        );
        let session = meta
            .open_session(pb::OpenSessionRequest {
                description: "reader".into(),
            })
            .await
            .expect("a read-only tenant may open a session")
            .into_inner();
        expect_errno(
            "AllocateSliceIds with a read-only token",
            meta.allocate_slice_ids(pb::AllocateSliceIdsRequest {
                count: 1,
                session_id: session.session_id.clone(),
            })
            .await,
            libc::EROFS,
            Code::PermissionDenied,
        );
        let mut staging = stack.gateway.client_as(&with_token(READERS)).await;
        let key = block_key(1 << 40, 0, 4096);
        let refused = write_block(&mut staging, &key, &block_bytes(&key, 1))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

        // A session belongs to its tenant: another tenant's calls find none.
        let mut training_meta = stack.gateway.meta_client_as(&with_token(TRAINING)).await;
        let refused = training_meta
            .heartbeat(pb::HeartbeatRequest {
                session_id: session.session_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(errno_of(&refused), libc::EIO, "{refused:?}");
        assert!(refused.message().contains("does not exist"), "{refused:?}");
        meta.heartbeat(pb::HeartbeatRequest {
            session_id: session.session_id,
            ..Default::default()
        })
        .await
        .expect("its own tenant's heartbeat");

        // A tenant lists its own mounts only; an admin lists every tenant's.
        let tenants = |mounts: Vec<pb::MountInfo>| {
            mounts
                .into_iter()
                .map(|m| (m.tenant, m.description))
                .collect::<Vec<_>>()
        };
        let own = tenants(
            meta.list_mounts(pb::Empty {})
                .await
                .unwrap()
                .into_inner()
                .mounts,
        );
        let session_of_readers = ("readers".to_string(), "reader".to_string());
        assert!(own.contains(&session_of_readers), "{own:?}");
        assert!(own.iter().all(|(tenant, _)| tenant == "readers"), "{own:?}");
        let training = tenants(
            training_meta
                .list_mounts(pb::Empty {})
                .await
                .unwrap()
                .into_inner()
                .mounts,
        );
        assert!(
            training.iter().all(|(tenant, _)| tenant == "training"),
            "training sees another tenant's mount: {training:?}"
        );
        let mut ops = stack.gateway.meta_client_as(&with_token(OPS)).await;
        let all = tenants(
            ops.list_mounts(pb::Empty {})
                .await
                .unwrap()
                .into_inner()
                .mounts,
        );
        assert!(all.contains(&session_of_readers), "{all:?}");
        assert!(
            all.iter().any(|(tenant, _)| tenant == "training"),
            "the admin sees every tenant's mounts: {all:?}"
        );

        // Admin-only operations.
        for (who, secret) in [("rw", TRAINING), ("ro", READERS)] {
            let mut staging = stack.gateway.client_as(&with_token(secret)).await;
            let refused = staging
                .set_uploads_paused(SetUploadsPausedRequest { paused: true })
                .await
                .unwrap_err();
            assert_eq!(refused.code(), Code::PermissionDenied, "{who}: {refused:?}");
            let refused = staging
                .retry_quarantined(RetryQuarantinedRequest {})
                .await
                .unwrap_err();
            assert_eq!(refused.code(), Code::PermissionDenied, "{who}: {refused:?}");
            let refused = staging
                .delete_blocks(DeleteBlocksRequest {
                    keys: vec![key.clone()],
                })
                .await
                .unwrap_err();
            assert_eq!(refused.code(), Code::PermissionDenied, "{who}: {refused:?}");
        }
        let mut admin = stack.gateway.client_as(&with_token(OPS)).await;
        admin
            .set_uploads_paused(SetUploadsPausedRequest { paused: true })
            .await
            .expect("an admin pauses uploads");
        assert!(status_of(&mut admin).await.unwrap().uploads_paused);
        admin
            .set_uploads_paused(SetUploadsPausedRequest { paused: false })
            .await
            .unwrap();
    });

    // Rotation: training gets a new secret, readers are gone; SIGHUP makes it so.
    fs::write(
        &tokens,
        tokens_file(&[("training", ROTATED, "rw"), ("ops", OPS, "admin")]),
    )
    .unwrap();
    stack.gateway.signal(nix::sys::signal::Signal::SIGHUP);
    stack.block_on(async {
        within(
            Duration::from_secs(30),
            "the old secret is refused",
            async {
                loop {
                    let mut meta = stack.gateway.meta_client_as(&with_token(TRAINING)).await;
                    if let Err(status) = meta.stat_fs(pb::Empty {}).await {
                        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        )
        .await;
        for (secret, works) in [(ROTATED, true), (READERS, false), (OPS, true)] {
            let mut meta = stack.gateway.meta_client_as(&with_token(secret)).await;
            assert_eq!(meta.stat_fs(pb::Empty {}).await.is_ok(), works, "{secret}");
        }
    });
    // A broken file is not taken: the tokens in force stay.
    fs::write(&tokens, "[[token]]\nname = \"half\"\n").unwrap();
    stack.gateway.signal(nix::sys::signal::Signal::SIGHUP);
    stack.block_on(async {
        within(Duration::from_secs(30), "the reload is refused", async {
            while !stack.gateway.log().contains("tokens not reloaded") {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let mut meta = stack.gateway.meta_client_as(&with_token(ROTATED)).await;
        meta.stat_fs(pb::Empty {})
            .await
            .expect("the rotated secret still works");
    });
    assert!(stack.gateway.log().contains("SIGHUP: tokens reloaded"));
    drop(reader);
    drop(writer);
}

#[test]
fn a_gateway_without_tokens_warns_that_it_is_open() {
    let stack = FuseStack::start("tokens-open", |gateway| gateway);
    let log = stack.gateway.log();
    assert!(
        log.contains("serving without --tokens"),
        "the gateway warns at start: {}",
        tail(&log, 20)
    );
}

/// A block is staged only by the session that recorded its slice as pending, within the
/// recorded length, until the slice's commit: not without a session (unless by an admin), not by
/// another session of the same tenant, not by another tenant's session, not past the recorded
/// length, not after the commit. Refusals are EPERM (`PERMISSION_DENIED`), and a refused block
/// is not on the gateway.
#[test]
fn blocks_are_staged_only_by_the_session_that_holds_their_slice() {
    let dir = TestDir::new("tokens-blocks");
    let tokens = dir.join("tokens.toml");
    fs::write(
        &tokens,
        tokens_file(&[
            ("training", TRAINING, "rw"),
            ("readers", READERS, "rw"),
            ("ops", OPS, "admin"),
        ]),
    )
    .unwrap();
    let stack = FuseStack::start("tokens-blocks", |gateway| gateway.tokens(&tokens, OPS));
    stack.block_on(async {
        let mut meta = stack.gateway.meta_client_as(&with_token(TRAINING)).await;
        let mut staging = stack.gateway.client_as(&with_token(TRAINING)).await;
        let owner = open_session(&mut meta, "owner").await;
        let sibling = open_session(&mut meta, "sibling").await.session_id;
        let mut other_meta = stack.gateway.meta_client_as(&with_token(READERS)).await;
        let stranger = open_session(&mut other_meta, "another tenant's")
            .await
            .session_id;
        let slice_id = meta
            .allocate_slice_ids(pb::AllocateSliceIdsRequest {
                count: 1,
                session_id: owner.session_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .first;
        let slice = pb::Slice {
            slice_id,
            offset_in_chunk: 0,
            len: 5000,
            gateway_id: owner.gateway_id.clone(),
        };
        meta.record_pending_slice(pb::PendingSliceRequest {
            session_id: owner.session_id.clone(),
            slice: Some(slice.clone()),
        })
        .await
        .unwrap();
        let key = block_key(slice_id, 0, 5000);
        let data = block_bytes(&key, 1);
        let frames = |session: &Bytes| with_session(block_frames(&key, &data), session);
        for (what, session) in [
            ("no session", Bytes::new()),
            ("another session of the tenant", sibling.clone()),
        ] {
            expect_errno(
                what,
                write_frames(&mut staging, frames(&session)).await,
                libc::EPERM,
                Code::PermissionDenied,
            );
        }
        let refused = write_frames(&mut staging, frames(&stranger)).await;
        assert!(refused.is_err(), "another tenant's session: {refused:?}");
        let past = block_key(slice_id, 1, 100);
        expect_errno(
            "a block past the recorded length",
            write_frames(
                &mut staging,
                with_session(
                    block_frames(&past, &block_bytes(&past, 1)),
                    &owner.session_id,
                ),
            )
            .await,
            libc::EPERM,
            Code::PermissionDenied,
        );
        assert!(
            stat_blocks(&mut staging, std::slice::from_ref(&key)).await[0].state
                == proto::staging::BlockState::Unknown as i32,
            "a refused block is not staged"
        );
        write_frames(&mut staging, frames(&owner.session_id))
            .await
            .expect("the owner stages its block");
        let file = stagefs_tests::rpc::create(&mut meta, &owner.session_id, 1, "owned").await;
        meta.commit_slice(pb::CommitSliceRequest {
            session_id: owner.session_id.clone(),
            ino: file.ino,
            chunk_index: 0,
            slice: Some(slice.clone()),
            new_size: 5000,
            mtime_ns: 1,
            ..Default::default()
        })
        .await
        .unwrap();
        expect_errno(
            "the owner, after the commit",
            write_frames(&mut staging, frames(&owner.session_id)).await,
            libc::EPERM,
            Code::PermissionDenied,
        );
        // An admin's tools may stage without a session.
        let mut admin = stack.gateway.client_as(&with_token(OPS)).await;
        let loose = block_key(slice_id + 1_000_000, 0, 10);
        write_block(&mut admin, &loose, &block_bytes(&loose, 2))
            .await
            .expect("an admin stages without a session");
    });
}

async fn status_of(client: &mut Client) -> Result<proto::staging::StatusResponse, tonic::Status> {
    client
        .status(proto::staging::StatusRequest {})
        .await
        .map(|r| r.into_inner())
}

/// A token with `root = "/team-a"`: its root is that directory, through a mount and on raw
/// RPCs; inode numbers, chunks and blocks of other trees are out of its reach.
#[test]
fn a_token_with_a_root_reaches_only_its_tree() {
    let dir = TestDir::new("tokens-root-config");
    let tokens = dir.join("tokens.toml");
    fs::write(
        &tokens,
        format!(
            "{}[[token]]\nname = \"team\"\nsecret = \"{TEAM}\"\naccess = \"rw\"\n\
             root = \"/team-a\"\n",
            tokens_file(&[("training", TRAINING, "rw"), ("ops", OPS, "admin")])
        ),
    )
    .unwrap();
    let stack = FuseStack::start("tokens-root", |gateway| gateway.tokens(&tokens, OPS));
    let gateway = stack.gateway.addr().to_string();
    let team_token = token_file(stack.dir.path(), "team.token", TEAM);
    let team_args = ["--token-file", team_token.to_str().unwrap()];
    let training_token = token_file(stack.dir.path(), "training.token", TRAINING);
    let training_args = ["--token-file", training_token.to_str().unwrap()];

    // Before its root exists, the tenant's mount fails and says why.
    let early = stack.dir.join("early");
    fs::create_dir(&early).unwrap();
    let stderr = failing_mount(&gateway, &early, &team_args);
    assert!(
        stderr.contains("root /team-a"),
        "the mount says why: {stderr}"
    );

    let whole = stack.mount("whole").args(training_args).start();
    fs::create_dir_all(whole.join("team-a/sub")).unwrap();
    fs::create_dir(whole.join("other")).unwrap();
    let inside = Pattern::new(1).bytes(0, 5 << 20);
    fs::write(whole.join("team-a/sub/inside.bin"), &inside).unwrap();
    fs::write(whole.join("other/secret.txt"), b"not for team-a").unwrap();
    // Blocks written straight to the store, which no gateway ever held: the confined mount,
    // not given the store, reads them through the gateway.
    let stored = Pattern::new(2).bytes(0, 300_000);
    let through = stack
        .mount("through")
        .args(training_args)
        .args(["--write-mode", "through"])
        .start();
    fs::write(through.join("team-a/stored.bin"), &stored).unwrap();
    drop(through);

    let team = stack.mount("team").args(team_args).start();
    let listed = |path: &Path| {
        let mut names: Vec<String> = fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    assert_eq!(listed(team.path()), ["stored.bin", "sub"]);
    assert_eq!(fs::read(team.join("sub/inside.bin")).unwrap(), inside);
    assert_eq!(fs::read(team.join("stored.bin")).unwrap(), stored);
    fs::write(team.join("sub/by-team.txt"), b"from team-a").unwrap();
    fs::rename(team.join("sub/by-team.txt"), team.join("moved.txt")).unwrap();
    assert_eq!(
        fs::read(whole.join("team-a/moved.txt")).unwrap(),
        b"from team-a"
    );
    // A file unlinked while open stays the tenant's to use.
    {
        use std::io::{Read, Seek, Write};
        let mut held = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(team.join("scratch"))
            .unwrap();
        held.write_all(b"scratch space").unwrap();
        held.sync_all().unwrap();
        fs::remove_file(team.join("scratch")).unwrap();
        held.set_len(7).unwrap();
        assert_eq!(held.metadata().unwrap().len(), 7);
        held.rewind().unwrap();
        let mut back = String::new();
        held.read_to_string(&mut back).unwrap();
        assert_eq!(back, "scratch");
    }

    stack.block_on(async {
        let mut training = stack.gateway.meta_client_as(&with_token(TRAINING)).await;
        let lookup = |parent: u64, entry: &'static str| {
            let mut training = training.clone();
            async move {
                attr_of(
                    training
                        .lookup(pb::EntryRequest {
                            parent,
                            name: name(entry),
                        })
                        .await
                        .unwrap_or_else(|e| panic!("Lookup {entry}: {e:?}")),
                )
            }
        };
        let other = lookup(1, "other").await;
        let secret = lookup(other.ino, "secret.txt").await;
        let team_dir = lookup(1, "team-a").await;
        let inside_attr = lookup(lookup(team_dir.ino, "sub").await.ino, "inside.bin").await;
        let secret_slice = read_chunk(&mut training, secret.ino).await[0].clone();
        let secret_key = block_key(secret_slice.slice_id, 0, secret_slice.len as usize);
        let inside_slice = read_chunk(&mut training, inside_attr.ino).await[0].clone();
        let inside_key = block_key(inside_slice.slice_id, 0, 4 << 20);

        let mut meta = stack.gateway.meta_client_as(&with_token(TEAM)).await;
        let session = open_session(&mut meta, "team, raw").await;
        assert!(
            session.store_url.is_empty() && session.read_through_gateway,
            "a confined tenant is not given the store: {session:?}"
        );
        // Its root is inode 1; `..` of it is itself; the real number names the same directory.
        let root = attr_of(meta.get_attr(pb::InodeRequest { ino: 1 }).await.unwrap());
        assert_eq!(root.ino, 1);
        let up = meta
            .lookup(pb::EntryRequest {
                parent: 1,
                name: name(".."),
            })
            .await
            .unwrap();
        assert_eq!(attr_of(up).ino, 1, "`..` of the root stays in the root");
        let by_number = meta
            .get_attr(pb::InodeRequest { ino: team_dir.ino })
            .await
            .unwrap();
        assert_eq!(attr_of(by_number).ino, 1);
        // Errors name the root as the tenant knows it, too.
        let missing = meta
            .lookup(pb::EntryRequest {
                parent: 1,
                name: name("missing"),
            })
            .await
            .unwrap_err();
        assert!(
            missing.message().contains("directory 1")
                && !missing
                    .message()
                    .contains(&format!("directory {}", team_dir.ino)),
            "{missing:?}"
        );

        // Every RPC naming an inode of another tree fails as for an inode that does not exist.
        let session_id = session.session_id.clone();
        let outside: Vec<(&str, Result<(), tonic::Status>)> = vec![
            (
                "GetAttr",
                meta.get_attr(pb::InodeRequest { ino: secret.ino })
                    .await
                    .map(drop),
            ),
            (
                "Lookup in another tree",
                meta.lookup(pb::EntryRequest {
                    parent: other.ino,
                    name: name("secret.txt"),
                })
                .await
                .map(drop),
            ),
            (
                "ReadDir",
                meta.read_dir(pb::ReadDirRequest {
                    ino: other.ino,
                    after_cookie: 0,
                    limit: 10,
                })
                .await
                .map(drop),
            ),
            (
                "ReadChunk",
                meta.read_chunk(pb::ReadChunkRequest {
                    ino: secret.ino,
                    chunk_index: 0,
                })
                .await
                .map(drop),
            ),
            (
                "Open",
                meta.open(pb::HandleRequest {
                    session_id: session_id.clone(),
                    ino: secret.ino,
                    // Refused before its chunk is read, as ReadChunk above is.
                    with_first_chunk: true,
                })
                .await
                .map(drop),
            ),
            (
                "SetAttr",
                meta.set_attr(pb::SetAttrRequest {
                    ino: secret.ino,
                    size: Some(0),
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
            (
                "Unlink",
                meta.unlink(pb::EntryRequest {
                    parent: other.ino,
                    name: name("secret.txt"),
                })
                .await
                .map(drop),
            ),
            (
                "Rename out of the tree",
                meta.rename(pb::RenameRequest {
                    parent: 1,
                    name: name("stored.bin"),
                    new_parent: other.ino,
                    new_name: name("taken"),
                    flags: 0,
                })
                .await
                .map(drop),
            ),
            (
                "Link into the tree",
                meta.link(pb::LinkRequest {
                    ino: secret.ino,
                    new_parent: 1,
                    new_name: name("stolen"),
                })
                .await
                .map(drop),
            ),
            (
                "GetXattr",
                meta.get_xattr(pb::XattrRequest {
                    ino: secret.ino,
                    name: name("user.x"),
                })
                .await
                .map(drop),
            ),
            (
                "DirUsage",
                meta.dir_usage(pb::InodeRequest { ino: other.ino })
                    .await
                    .map(drop),
            ),
        ];
        for (what, result) in outside {
            expect_errno(what, result, libc::ENOENT, Code::NotFound);
        }

        // Blocks: only by naming a file of the tree whose chunk lists the block's slice.
        let mut staging = stack.gateway.client_as(&with_token(TEAM)).await;
        let status = status_of(&mut staging).await.unwrap();
        assert!(
            status.store_url.is_empty() && status.device_path.is_empty(),
            "a confined tenant is told neither where the store nor where the device is: {status:?}"
        );
        let read = |key: &str, ino: u64, from_store: bool| proto::staging::ReadBlockRequest {
            key: key.to_string(),
            ino,
            chunk_index: 0,
            from_store,
            ..Default::default()
        };
        for (what, request, code) in [
            (
                "without naming its file",
                read(&secret_key, 0, true),
                Code::PermissionDenied,
            ),
            (
                "naming a file of the tree whose chunk does not list it",
                read(&secret_key, inside_attr.ino, true),
                Code::PermissionDenied,
            ),
            (
                "naming its file, outside the tree",
                read(&secret_key, secret.ino, true),
                Code::NotFound,
            ),
        ] {
            let refused = staging.read_block(request).await.unwrap_err();
            assert_eq!(refused.code(), code, "{what}: {refused:?}");
        }
        let served = staging
            .read_block(read(&inside_key, inside_attr.ino, true))
            .await
            .expect("a block of the tree, named by its file")
            .into_inner();
        assert_eq!(&served.data[..], &inside[..4 << 20]);
    });

    // Nothing outside was touched, and the whole-tree tenant still sees all.
    assert_eq!(
        fs::read(whole.join("other/secret.txt")).unwrap(),
        b"not for team-a"
    );
    assert_eq!(
        listed(&whole.join("team-a")),
        ["moved.txt", "stored.bin", "sub"]
    );
    drop(team);
    drop(whole);
}
