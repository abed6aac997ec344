//! The object store is tried once at start: a small probe object is written, read back and
//! deleted under the store's prefix. A gateway that cannot upload would otherwise listen, accept
//! writes and fill its device while only `status` shows the store error; this says at once what
//! is wrong (no such bucket, credentials refused or missing, access denied, unreachable).
//!
//! Then the prefix is claimed for this file system: an object [`OWNER_OBJECT`] names the file
//! system whose blocks live there. Two file systems writing one prefix would overwrite each
//! other's blocks (slice ids are per file system), so a gateway finding another's name refuses
//! to start, and gc refuses to delete anything there.

use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// What `serve --store-check` does with a store that fails the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreCheckMode {
    /// Refuse to start, naming the problem.
    Fail,
    /// Log the problem and start anyway (uploads retry until the store answers).
    Warn,
    /// Do not probe.
    Off,
}

/// Why the probe failed, in the words an operator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreProblem {
    NoSuchBucket,
    CredentialsRefused,
    NoCredentials,
    AccessDenied,
    Unreachable,
    OtherBytes,
    /// The prefix holds another file system's blocks.
    OtherFileSystem,
    Failed,
}

impl std::fmt::Display for StoreProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreProblem::NoSuchBucket => "names a bucket that does not exist",
            StoreProblem::CredentialsRefused => {
                "refused the credentials (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            }
            StoreProblem::NoCredentials => {
                "got no credentials: none are set (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and \
                 no instance role answered"
            }
            StoreProblem::AccessDenied => "denied access to the probe object (check the policy)",
            StoreProblem::Unreachable => "cannot be reached",
            StoreProblem::OtherBytes => "returned other bytes than were written",
            StoreProblem::OtherFileSystem => {
                "belongs to another stagefs file system (two file systems writing one prefix \
                 would overwrite each other's blocks: give each its own bucket or prefix)"
            }
            StoreProblem::Failed => "failed the probe",
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("object store {url} {problem}: {detail}")]
pub struct StoreCheckError {
    pub url: String,
    pub problem: StoreProblem,
    /// What the store said (bounded).
    pub detail: String,
}

/// The object that names the file system a store prefix belongs to.
pub const OWNER_OBJECT: &str = "stagefs-file-system";

/// The owner object's text for file system `id`.
fn owner_text(id: &[u8; 16]) -> String {
    format!("stagefs file system {}\n", uuid::Uuid::from_bytes(*id))
}

/// Claims the store's prefix for file system `id`: writes [`OWNER_OBJECT`] when there is none,
/// and fails with [`StoreProblem::OtherFileSystem`] when it names another.
pub async fn claim(
    store: &dyn ObjectStore,
    id: &[u8; 16],
    url: &str,
) -> Result<(), StoreCheckError> {
    let fail = |problem, detail: String| StoreCheckError {
        url: url.to_string(),
        problem,
        detail,
    };
    let ours = owner_text(id);
    match owner(store).await.map_err(|(p, d)| fail(p, d))? {
        Some(text) if text == ours => return Ok(()),
        Some(text) => {
            return Err(fail(
                StoreProblem::OtherFileSystem,
                format!(
                    "{OWNER_OBJECT} says {:?}; this is {:?}",
                    shared::clip(text.trim(), 100),
                    ours.trim()
                ),
            ))
        }
        None => {}
    }
    store
        .put(&Path::from(OWNER_OBJECT), PutPayload::from(ours.clone()))
        .await
        .map_err(|e| {
            let (problem, detail) = classify("PUT", &e);
            fail(problem, detail)
        })?;
    // Two file systems claiming an empty prefix at once: the one whose claim was overwritten
    // finds the other's name now.
    match owner(store).await.map_err(|(p, d)| fail(p, d))? {
        Some(text) if text == ours => Ok(()),
        other => Err(fail(
            StoreProblem::OtherFileSystem,
            format!("{OWNER_OBJECT} was claimed meanwhile: {other:?}"),
        )),
    }
}

/// Whether the store's prefix belongs to file system `id`.
pub async fn owned_by(store: &dyn ObjectStore, id: &[u8; 16]) -> Result<bool, String> {
    match owner(store).await {
        Ok(text) => Ok(text.as_deref() == Some(owner_text(id).as_str())),
        Err((_, detail)) => Err(detail),
    }
}

async fn owner(store: &dyn ObjectStore) -> Result<Option<String>, (StoreProblem, String)> {
    match store.get(&Path::from(OWNER_OBJECT)).await {
        Ok(found) => {
            let bytes = found.bytes().await.map_err(|e| classify("GET", &e))?;
            Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(classify("GET", &e)),
    }
}

/// The probe object's name starts so.
const PROBE_PREFIX: &str = "stagefs-store-probe";

/// How long the whole probe may take before the store counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes, reads back and deletes a probe object. `url` names the store in the error.
pub async fn probe(store: &dyn ObjectStore, url: &str) -> Result<(), StoreCheckError> {
    match tokio::time::timeout(PROBE_TIMEOUT, probe_once(store)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err((problem, detail))) => Err(StoreCheckError {
            url: url.to_string(),
            problem,
            detail,
        }),
        Err(_) => Err(StoreCheckError {
            url: url.to_string(),
            problem: StoreProblem::Unreachable,
            detail: format!("no answer within {PROBE_TIMEOUT:?}"),
        }),
    }
}

async fn probe_once(store: &dyn ObjectStore) -> Result<(), (StoreProblem, String)> {
    // A listing names a missing bucket even where a PUT would create one (some S3-compatible
    // servers do). A policy may allow objects but not listings: that is no reason to refuse.
    if let Err(error) = store
        .list_with_delimiter(Some(&Path::from(PROBE_PREFIX)))
        .await
    {
        let (problem, detail) = classify("LIST", &error);
        if problem != StoreProblem::AccessDenied {
            return Err((problem, detail));
        }
    }
    let path = Path::from(format!("{PROBE_PREFIX}-{:016x}", rand::random::<u64>()));
    let body = Bytes::from(format!("stagefs store probe {path}"));
    store
        .put(&path, PutPayload::from(body.clone()))
        .await
        .map_err(|e| classify("PUT", &e))?;
    let read = async {
        let got = store.get(&path).await?.bytes().await?;
        Ok::<_, object_store::Error>(got)
    }
    .await;
    // Delete whatever the read found, so a failed probe leaves nothing behind.
    let deleted = store.delete(&path).await;
    let got = read.map_err(|e| classify("GET", &e))?;
    if got != body {
        return Err((
            StoreProblem::OtherBytes,
            format!("{} bytes written, {} read back", body.len(), got.len()),
        ));
    }
    deleted.map_err(|e| classify("DELETE", &e))
}

/// The problem an error of the store points at, and the error's text (its whole chain).
fn classify(op: &str, error: &object_store::Error) -> (StoreProblem, String) {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    let has = |needle: &str| text.contains(needle);
    let problem = if has("NoSuchBucket") {
        StoreProblem::NoSuchBucket
    } else if has("InvalidAccessKeyId")
        || has("SignatureDoesNotMatch")
        || has("NotSignedUp")
        || has("InvalidToken")
        || has("ExpiredToken")
        || matches!(error, object_store::Error::Unauthenticated { .. })
    {
        StoreProblem::CredentialsRefused
    } else if has("169.254.169.254") || has("credential") {
        // The AWS client asks the instance-metadata endpoint when no keys are set.
        StoreProblem::NoCredentials
    } else if has("AccessDenied") || matches!(error, object_store::Error::PermissionDenied { .. }) {
        StoreProblem::AccessDenied
    } else if matches!(error, object_store::Error::NotFound { .. }) && op == "PUT" {
        // A PUT finds nothing missing but its bucket.
        StoreProblem::NoSuchBucket
    } else if has("error sending request") || has("connect") || has("timed out") || has("dns error")
    {
        StoreProblem::Unreachable
    } else {
        StoreProblem::Failed
    };
    let detail = format!("{op}: {text}");
    (problem, shared::clip(&detail, 600).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_working_store_passes_and_keeps_nothing() {
        let store = object_store::memory::InMemory::new();
        probe(&store, "memory://").await.unwrap();
        let left: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(store.list(None))
            .await
            .unwrap();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn a_prefix_is_claimed_once_and_refused_to_another_file_system() {
        let store = object_store::memory::InMemory::new();
        let (ours, theirs) = ([1; 16], [2; 16]);
        claim(&store, &ours, "memory://").await.unwrap();
        claim(&store, &ours, "memory://").await.unwrap();
        assert!(owned_by(&store, &ours).await.unwrap());
        let error = claim(&store, &theirs, "memory://").await.unwrap_err();
        assert_eq!(error.problem, StoreProblem::OtherFileSystem);
        assert!(!owned_by(&store, &theirs).await.unwrap());
    }

    #[test]
    fn errors_name_the_problem() {
        let source = || -> Box<dyn std::error::Error + Send + Sync> {
            "<Error><Code>NoSuchBucket</Code></Error>".into()
        };
        let missing = object_store::Error::Generic {
            store: "S3",
            source: source(),
        };
        assert_eq!(classify("PUT", &missing).0, StoreProblem::NoSuchBucket);
        let refused = object_store::Error::PermissionDenied {
            path: "p".into(),
            source: "<Code>InvalidAccessKeyId</Code>".into(),
        };
        assert_eq!(
            classify("PUT", &refused).0,
            StoreProblem::CredentialsRefused
        );
        let denied = object_store::Error::PermissionDenied {
            path: "p".into(),
            source: "<Code>AccessDenied</Code>".into(),
        };
        assert_eq!(classify("PUT", &denied).0, StoreProblem::AccessDenied);
        let imds = object_store::Error::Generic {
            store: "S3",
            source: "Error performing PUT http://169.254.169.254/latest/api/token".into(),
        };
        assert_eq!(classify("PUT", &imds).0, StoreProblem::NoCredentials);
        let long = object_store::Error::Generic {
            store: "S3",
            source: "x".repeat(10_000).into(),
        };
        assert!(classify("PUT", &long).1.len() <= 610);
    }
}
