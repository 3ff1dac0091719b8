//! Bodies: metered pass-through bodies and the proxy's own short answers.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

use crate::backend::Backend;
use crate::limits::Permit;

/// Errors inside response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the proxy sends.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Reports bytes for one microVM to [`Backend::traffic`].
#[derive(Clone)]
pub(crate) struct Meter {
    backend: Arc<dyn Backend>,
    microvm_id: Arc<str>,
}

impl Meter {
    pub(crate) fn new(backend: Arc<dyn Backend>, microvm_id: &str) -> Self {
        Meter {
            backend,
            microvm_id: Arc::from(microvm_id),
        }
    }

    pub(crate) fn add(&self, bytes: u64) {
        if bytes > 0 {
            self.backend.traffic(&self.microvm_id, bytes);
        }
    }

    pub(crate) fn microvm_id(&self) -> &str {
        &self.microvm_id
    }
}

impl fmt::Debug for Meter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Meter")
            .field("microvm_id", &self.microvm_id)
            .finish()
    }
}

/// A body passed through frame by frame, each data frame counted. It may hold
/// the microVM's connection permit (released when the body ends or is dropped)
/// and a hook run once at the end of the stream (to reuse the guest connection).
pub(crate) struct Metered<B> {
    inner: B,
    meter: Meter,
    permit: Option<Permit>,
    on_end: Option<Box<dyn FnOnce() + Send>>,
}

impl<B> Metered<B> {
    pub(crate) fn new(inner: B, meter: Meter) -> Self {
        Metered {
            inner,
            meter,
            permit: None,
            on_end: None,
        }
    }

    pub(crate) fn with_permit(mut self, permit: Permit) -> Self {
        self.permit = Some(permit);
        self
    }

    pub(crate) fn on_end(mut self, hook: impl FnOnce() + Send + 'static) -> Self {
        self.on_end = Some(Box::new(hook));
        self
    }

    fn finish(&mut self) {
        self.permit = None;
        if let Some(hook) = self.on_end.take() {
            hook();
        }
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.meter.add(data.len() as u64);
                }
                // hyper stops polling a body that says it has ended, so the
                // end may never be seen as `None`.
                if this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // The stream is broken: release the permit, but do not reuse anything.
                this.permit = None;
                this.on_end = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> fmt::Debug for Metered<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metered")
            .field("meter", &self.meter)
            .finish_non_exhaustive()
    }
}

/// A `{"message": ...}` answer from the proxy itself.
pub(crate) fn error_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let text = serde_json::json!({ "message": message }).to_string();
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub(crate) fn full(data: impl Into<Bytes>) -> ProxyBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Roughly how many bytes a message head took on the wire (for traffic counts).
pub(crate) fn head_len(headers: &HeaderMap, first_line: usize) -> u64 {
    let fields: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    (first_line + fields + 2) as u64
}
