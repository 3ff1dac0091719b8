//! The agent's side of the `AppLogs` and `DiscardAppLog` requests: the app's
//! captured output (`applog::AppLog`) served as stream frames.

use hearth_proto::{AppLogsRequest, DiscardAppLogRequest, ErrorKind, Frame, FrameKind, Reply};

use crate::applog::AppLog;
use crate::stream::{FrameSink, SessionError, StreamFailure};

/// Most bytes of encoded records in one `Data` frame (well under the frame
/// limit even for a record whose line is all escapes).
const MAX_BATCH: usize = 128 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AppLogError {
    #[error("{0}")]
    Session(#[from] SessionError),
}

impl StreamFailure for AppLogError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Internal
    }
}

/// Serves `AppLogs`: batches of records from `request.from`, then `Eof`, or
/// when following, new records as they come until the stream is dropped.
pub async fn serve(
    stream: u32,
    request: AppLogsRequest,
    sink: &FrameSink,
    log: &AppLog,
) -> Result<(), AppLogError> {
    let mut grown = log.subscribe();
    let mut cursor = request.from;
    loop {
        grown.borrow_and_update();
        let (payload, next) = log.batch(cursor, MAX_BATCH);
        if !payload.is_empty() {
            cursor = next;
            sink.send(Frame::new(stream, FrameKind::Data, payload))
                .await?;
            continue;
        }
        if !request.follow {
            sink.send(Frame::new(stream, FrameKind::Eof, bytes::Bytes::new()))
                .await?;
            return Ok(());
        }
        if grown.changed().await.is_err() {
            return Ok(());
        }
    }
}

/// Serves `DiscardAppLog`.
pub async fn discard(
    stream: u32,
    request: DiscardAppLogRequest,
    sink: &FrameSink,
    log: &AppLog,
) -> Result<(), AppLogError> {
    let next_seq = log.discard_before(request.before);
    sink.reply(stream, &Reply::AppLogDiscarded { next_seq })
        .await?;
    Ok(())
}
