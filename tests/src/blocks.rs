//! Blocks: keys, deterministic contents, and the gRPC calls that write, read and check them.

use std::time::Duration;

use bytes::Bytes;
use client::fs::GatewayChannel;
use proto::staging::staging_client::StagingClient;
use proto::staging::write_block_request::Frame;
use proto::staging::{
    BlockHeader, BlockStat, BlockState, DrainRequest, ReadBlockRequest, SetUploadsPausedRequest,
    StatBlocksRequest, StatusRequest, StatusResponse, WaitUploadedRequest, WriteBlockRequest,
    WriteBlockResponse,
};
use shared::BlockKey;
use tonic::{Code, Status};

use crate::s3::S3Server;

/// The client alias used everywhere in the tests.
pub type Client = StagingClient<GatewayChannel>;

/// Size of the data frames a block is streamed in (like the client: about 1 MiB).
pub const FRAME_BYTES: usize = 1 << 20;

/// The object key of block `block_index` (of `len` bytes) of slice `slice_id`.
pub fn block_key(slice_id: u64, block_index: u32, len: usize) -> String {
    BlockKey::new(
        slice_id,
        block_index,
        u32::try_from(len).expect("block length fits u32"),
    )
    .unwrap_or_else(|e| panic!("bad test block key: {e}"))
    .to_string()
}

/// The block length a valid key names.
pub fn key_len(key: &str) -> usize {
    key.parse::<BlockKey>()
        .unwrap_or_else(|e| panic!("{e}"))
        .len() as usize
}

/// The bytes block `key` holds in a test run with `seed`: pseudo-random, a function of (key, seed)
/// only, of the length the key names.
pub fn block_bytes(key: &str, seed: u64) -> Bytes {
    pattern_bytes(key, seed, key_len(key))
}

/// `len` pseudo-random bytes derived from (`label`, `seed`); works for labels that are not valid
/// keys (bad-input tests).
pub fn pattern_bytes(label: &str, seed: u64, len: usize) -> Bytes {
    // FNV-1a of the label, mixed with the seed, drives a splitmix64 stream.
    let mut state = label.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    }) ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&next().to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// The header frame of a block write.
pub fn header_frame(key: &str, total_len: u64, crc32c: u32) -> WriteBlockRequest {
    WriteBlockRequest {
        frame: Some(Frame::Header(BlockHeader {
            key: key.to_string(),
            total_len,
            crc32c,
            // No session: the tests' raw writers are admins (or the gateway is open).
            session_id: Default::default(),
        })),
    }
}

/// `frames` whose header names `session` (the writer's session, which must hold the block's
/// slice as pending).
pub fn with_session(mut frames: Vec<WriteBlockRequest>, session: &Bytes) -> Vec<WriteBlockRequest> {
    if let Some(WriteBlockRequest {
        frame: Some(Frame::Header(header)),
    }) = frames.first_mut()
    {
        header.session_id = session.clone();
    }
    frames
}

/// A data frame.
pub fn data_frame(data: Bytes) -> WriteBlockRequest {
    WriteBlockRequest {
        frame: Some(Frame::Data(data)),
    }
}

/// The frames of a correct write of `data` under `key`: header (with the real length and crc32c)
/// then [`FRAME_BYTES`] data frames.
pub fn block_frames(key: &str, data: &[u8]) -> Vec<WriteBlockRequest> {
    let data = Bytes::copy_from_slice(data);
    let mut frames = vec![header_frame(key, data.len() as u64, crc32c::crc32c(&data))];
    let mut at = 0;
    while at < data.len() {
        let end = (at + FRAME_BYTES).min(data.len());
        frames.push(data_frame(data.slice(at..end)));
        at = end;
    }
    frames
}

/// Streams arbitrary frames as one `WriteBlock` call.
pub async fn write_frames(
    client: &mut Client,
    frames: Vec<WriteBlockRequest>,
) -> Result<WriteBlockResponse, Status> {
    client
        .write_block(tokio_stream::iter(frames))
        .await
        .map(|response| response.into_inner())
}

/// Writes one block: a header frame, then 1 MiB data frames. `Ok` means the gateway acknowledged
/// it (durable on its device).
pub async fn write_block(
    client: &mut Client,
    key: &str,
    data: &[u8],
) -> Result<WriteBlockResponse, Status> {
    write_frames(client, block_frames(key, data)).await
}

/// Reads a whole block with `ReadBlock`. Panics if the response's crc32c field does not match its
/// data (the gateway must never serve bytes that fail their checksum).
pub async fn read_block(client: &mut Client, key: &str) -> Result<Bytes, Status> {
    let response = client
        .read_block(ReadBlockRequest {
            key: key.to_string(),
            offset: 0,
            length: 0,
            ..Default::default()
        })
        .await?
        .into_inner();
    let crc = crc32c::crc32c(&response.data);
    assert_eq!(
        crc,
        response.crc32c,
        "ReadBlock({key}) returned {} bytes whose crc32c {crc:#010x} differs from the response's crc32c {:#010x}",
        response.data.len(),
        response.crc32c
    );
    Ok(response.data)
}

/// Panics unless `actual == expected`, reporting lengths and the first differing offset instead of
/// dumping megabytes.
pub fn assert_same_bytes(what: &str, actual: &[u8], expected: &[u8]) {
    if actual == expected {
        return;
    }
    let first_diff = actual.iter().zip(expected).position(|(a, b)| a != b);
    panic!(
        "{what}: bytes differ: got {} bytes, expected {} bytes; first difference at offset {}",
        actual.len(),
        expected.len(),
        match first_diff {
            Some(at) => format!(
                "{at} (got {:#04x}, expected {:#04x})",
                actual[at], expected[at]
            ),
            None => format!(
                "{} (one is a prefix of the other)",
                actual.len().min(expected.len())
            ),
        }
    );
}

/// Where an intact block was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoundIn {
    /// `ReadBlock` served it from the gateway.
    Gateway,
    /// The gateway answered NOT_FOUND (uploaded and dropped) and the object store has it.
    Store,
}

/// Checks an acknowledged block: `ReadBlock` returns exactly `expected`, or NOT_FOUND and then the
/// object in `s3` is exactly `expected`. Anything else panics.
pub async fn assert_block_intact(
    client: &mut Client,
    s3: &S3Server,
    key: &str,
    expected: &[u8],
) -> FoundIn {
    match read_block(client, key).await {
        Ok(data) => {
            assert_same_bytes(
                &format!("ReadBlock({key}) of an acknowledged block"),
                &data,
                expected,
            );
            FoundIn::Gateway
        }
        Err(status) if status.code() == Code::NotFound => {
            match s3.get(key).await {
                Some(object) => assert_same_bytes(&format!("S3 object {key} (ReadBlock said NOT_FOUND)"), &object, expected),
                None => panic!(
                    "acknowledged block {key} is lost: ReadBlock says NOT_FOUND ({}) and the object store does not have it",
                    status.message()
                ),
            }
            FoundIn::Store
        }
        Err(status) => panic!("ReadBlock({key}) of an acknowledged block failed: {status:?}"),
    }
}

/// Checks a block that may or may not exist (written but never acknowledged): if `ReadBlock` serves
/// bytes they must be exactly `expected`; NOT_FOUND and DATA_LOSS are fine. Returns whether the
/// gateway served it.
pub async fn assert_served_bytes_valid(client: &mut Client, key: &str, expected: &[u8]) -> bool {
    match read_block(client, key).await {
        Ok(data) => {
            assert_same_bytes(
                &format!("ReadBlock({key}) of an unacknowledged write"),
                &data,
                expected,
            );
            true
        }
        Err(status) if matches!(status.code(), Code::NotFound | Code::DataLoss) => false,
        Err(status) => panic!("ReadBlock({key}) failed unexpectedly: {status:?}"),
    }
}

/// `Status`.
pub async fn status(client: &mut Client) -> StatusResponse {
    client
        .status(StatusRequest {})
        .await
        .unwrap_or_else(|e| panic!("Status failed: {e:?}"))
        .into_inner()
}

/// `SetUploadsPaused`.
pub async fn set_uploads_paused(client: &mut Client, paused: bool) {
    client
        .set_uploads_paused(SetUploadsPausedRequest { paused })
        .await
        .unwrap_or_else(|e| panic!("SetUploadsPaused({paused}) failed: {e:?}"));
}

/// `StatBlocks`, returned in the order of `keys`.
pub async fn stat_blocks(client: &mut Client, keys: &[String]) -> Vec<BlockStat> {
    let stats = client
        .stat_blocks(StatBlocksRequest {
            keys: keys.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("StatBlocks failed: {e:?}"))
        .into_inner()
        .blocks;
    keys.iter()
        .map(|key| {
            stats
                .iter()
                .find(|stat| &stat.key == key)
                .cloned()
                .unwrap_or_else(|| panic!("StatBlocks did not answer for {key}"))
        })
        .collect()
}

/// The state of a block stat as the enum.
pub fn state_of(stat: &BlockStat) -> BlockState {
    BlockState::try_from(stat.state).unwrap_or(BlockState::Unknown)
}

/// `WaitUploaded(keys)` with `timeout` as both the request's `timeout_ms` and (plus a margin) the
/// client-side limit.
pub async fn wait_uploaded(
    client: &mut Client,
    keys: &[String],
    timeout: Duration,
) -> Result<(), Status> {
    let mut request = tonic::Request::new(WaitUploadedRequest {
        keys: keys.to_vec(),
        timeout_ms: timeout.as_millis() as u64,
        ..Default::default()
    });
    request.set_timeout(timeout + Duration::from_secs(30));
    match tokio::time::timeout(
        timeout + Duration::from_secs(40),
        client.wait_uploaded(request),
    )
    .await
    {
        Ok(result) => result.map(|_| ()),
        Err(_) => panic!(
            "WaitUploaded of {} keys did not return within {:?} + 40 s",
            keys.len(),
            timeout
        ),
    }
}

/// `Drain` with `timeout` as both `timeout_ms` and (plus a margin) the client-side limit.
pub async fn drain(client: &mut Client, timeout: Duration) -> Result<StatusResponse, Status> {
    let mut request = tonic::Request::new(DrainRequest {
        timeout_ms: timeout.as_millis() as u64,
        ..Default::default()
    });
    request.set_timeout(timeout + Duration::from_secs(30));
    match tokio::time::timeout(timeout + Duration::from_secs(40), client.drain(request)).await {
        Ok(result) => result.map(|r| r.into_inner().status.unwrap_or_default()),
        Err(_) => panic!("Drain did not return within {timeout:?} + 40 s"),
    }
}

/// Checks that every key's object in `s3` is exactly its [`block_bytes`] for `seed`.
pub async fn assert_objects_identical(s3: &S3Server, keys: &[String], seed: u64) {
    for key in keys {
        match s3.get(key).await {
            Some(object) => assert_same_bytes(
                &format!("S3 object {key}"),
                &object,
                &block_bytes(key, seed),
            ),
            None => panic!(
                "S3 object {key} does not exist (the block was acknowledged and reported uploaded)"
            ),
        }
    }
}

/// Checks that every object in the bucket is a valid block key holding exactly its
/// [`block_bytes`] for `seed`: nothing torn, partial or foreign was uploaded. Returns the keys.
pub async fn assert_every_object_valid(s3: &S3Server, seed: u64) -> Vec<String> {
    let mut keys = Vec::new();
    for (key, size) in s3.list().await {
        let parsed: BlockKey = key.parse().unwrap_or_else(|e| {
            panic!("the object store holds {key:?}, which is not a block key: {e}")
        });
        assert_eq!(
            size,
            parsed.len(),
            "S3 object {key} has size {size}, its key says {}",
            parsed.len()
        );
        let object = s3
            .get(&key)
            .await
            .unwrap_or_else(|| panic!("S3 object {key} was listed but cannot be read"));
        assert_same_bytes(
            &format!("S3 object {key}"),
            &object,
            &block_bytes(&key, seed),
        );
        keys.push(key);
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_bytes_are_deterministic_and_key_dependent() {
        let a = block_key(42, 0, 1_000_001);
        let b = block_key(43, 0, 1_000_001);
        assert_eq!(block_bytes(&a, 1).len(), 1_000_001);
        assert_eq!(block_bytes(&a, 1), block_bytes(&a, 1));
        assert_ne!(block_bytes(&a, 1), block_bytes(&a, 2));
        assert_ne!(block_bytes(&a, 1), block_bytes(&b, 1));
    }

    #[test]
    fn block_frames_are_header_then_1_mib_frames() {
        let key = block_key(1, 0, 2 * FRAME_BYTES + 5);
        let data = block_bytes(&key, 0);
        let frames = block_frames(&key, &data);
        assert_eq!(frames.len(), 4);
        match &frames[0].frame {
            Some(Frame::Header(h)) => {
                assert_eq!(h.key, key);
                assert_eq!(h.total_len, data.len() as u64);
                assert_eq!(h.crc32c, crc32c::crc32c(&data));
            }
            other => panic!("first frame is not a header: {other:?}"),
        }
        let lens: Vec<usize> = frames[1..]
            .iter()
            .map(|f| match &f.frame {
                Some(Frame::Data(d)) => d.len(),
                other => panic!("not a data frame: {other:?}"),
            })
            .collect();
        assert_eq!(lens, vec![FRAME_BYTES, FRAME_BYTES, 5]);
    }
}
