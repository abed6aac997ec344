//! Tests only: an in-memory object store with the faults a real server cannot be made to produce
//! on demand (an outage for exactly N requests, a permission error for one key, deletions that
//! fail until told otherwise).

use std::sync::atomic::{AtomicBool, Ordering};

use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};

/// Decides, per PUT, whether it fails and how.
type PutFault = Box<dyn Fn(&Path) -> Option<object_store::Error> + Send + Sync>;

/// [`InMemory`], except that PUTs fail where `put_fault` says so and deletions fail while
/// `refuse_deletes` is set.
pub struct FaultyStore {
    inner: InMemory,
    put_fault: PutFault,
    pub refuse_deletes: AtomicBool,
}

impl FaultyStore {
    /// A store whose PUTs fail with what `fault` returns for their path (`None`: they succeed).
    pub fn failing_puts(
        fault: impl Fn(&Path) -> Option<object_store::Error> + Send + Sync + 'static,
    ) -> Self {
        FaultyStore {
            inner: InMemory::new(),
            put_fault: Box::new(fault),
            refuse_deletes: AtomicBool::new(false),
        }
    }

    /// A store that refuses every deletion until `refuse_deletes` is cleared.
    pub fn refusing_deletes() -> Self {
        let store = Self::failing_puts(|_| None);
        store.refuse_deletes.store(true, Ordering::SeqCst);
        store
    }
}

impl std::fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyStore")
            .field("refuse_deletes", &self.refuse_deletes)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultyStore")
    }
}

#[async_trait::async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        if let Some(error) = (self.put_fault)(location) {
            return Err(error);
        }
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        if self.refuse_deletes.load(Ordering::SeqCst) {
            return locations
                .map(|location| {
                    Err(object_store::Error::Generic {
                        store: "refusing",
                        source: format!("delete of {} refused (injected)", location?).into(),
                    })
                })
                .boxed();
        }
        self.inner.delete_stream(locations)
    }
    fn list(
        &self,
        prefix: Option<&Path>,
    ) -> BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
