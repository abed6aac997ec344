//! Object store URLs: `file:///dir`, `memory://`, `s3://bucket[/prefix]`.
//!
//! S3 settings come from the usual `AWS_*` variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, ...) and can be overridden by [`S3Options`].
//! The store's own retries are kept short: the gateway's upload drain owns retrying, with
//! backoff and quarantine, so an outage shows up in its status instead of inside one request.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub allow_http: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreUrlError {
    #[error("store URL {url:?} is not a URL: {source}")]
    Parse {
        url: String,
        source: url::ParseError,
    },
    #[error("store URL {url:?} has unsupported scheme {scheme:?} (use file:///dir, memory:// or s3://bucket)")]
    Scheme { url: String, scheme: String },
    #[error("store URL {url:?} names no bucket")]
    NoBucket { url: String },
    #[error("cannot use local store directory {dir:?}: {source}")]
    LocalDir { dir: String, source: std::io::Error },
    #[error("cannot configure object store {url:?}: {source}")]
    Configure {
        url: String,
        source: object_store::Error,
    },
}

/// Opens the object store a URL names.
pub fn open_store(url: &str, s3: &S3Options) -> Result<Arc<dyn ObjectStore>, StoreUrlError> {
    let parsed = url::Url::parse(url).map_err(|source| StoreUrlError::Parse {
        url: url.into(),
        source,
    })?;
    match parsed.scheme() {
        "memory" => Ok(Arc::new(InMemory::new())),
        "file" => {
            let dir = parsed.path().to_string();
            std::fs::create_dir_all(&dir).map_err(|source| StoreUrlError::LocalDir {
                dir: dir.clone(),
                source,
            })?;
            let store = LocalFileSystem::new_with_prefix(&dir).map_err(|source| {
                StoreUrlError::Configure {
                    url: url.into(),
                    source,
                }
            })?;
            Ok(Arc::new(store))
        }
        "s3" => {
            let bucket = parsed
                .host_str()
                .filter(|b| !b.is_empty())
                .ok_or_else(|| StoreUrlError::NoBucket { url: url.into() })?;
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(RetryConfig {
                    max_retries: 2,
                    retry_timeout: Duration::from_secs(10),
                    ..Default::default()
                })
                .with_client_options(
                    ClientOptions::new()
                        .with_connect_timeout(Duration::from_secs(5))
                        .with_timeout(Duration::from_secs(60)),
                );
            if let Some(endpoint) = &s3.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            if let Some(region) = &s3.region {
                builder = builder.with_region(region);
            }
            if s3.allow_http {
                builder = builder.with_allow_http(true);
            }
            let store: Arc<dyn ObjectStore> =
                Arc::new(builder.build().map_err(|source| StoreUrlError::Configure {
                    url: url.into(),
                    source,
                })?);
            let prefix = parsed.path().trim_matches('/');
            if prefix.is_empty() {
                Ok(store)
            } else {
                Ok(Arc::new(PrefixStore::new(store, Path::from(prefix))))
            }
        }
        other => Err(StoreUrlError::Scheme {
            url: url.into(),
            scheme: other.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_schemes_and_missing_buckets() {
        assert!(matches!(
            open_store("ftp://x", &S3Options::default()),
            Err(StoreUrlError::Scheme { .. })
        ));
        assert!(matches!(
            open_store("not a url", &S3Options::default()),
            Err(StoreUrlError::Parse { .. })
        ));
        assert!(open_store("memory://", &S3Options::default()).is_ok());
    }
}
