//! Request bodies read whole within a byte limit.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};

use crate::request::error::ProxyError;
use crate::serve::limits::RequestPermit;

/// Reads a whole request body, refusing more than `limit` bytes (the emulators' reader).
pub async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge(limit)),
        Err(e) => Err(BodyError::Read(e.to_string())),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the request body could not be read: {0}")]
    Read(String),
}

/// The body's bytes, at most `limit` of them, each charged to `permit` as it arrives.
async fn read_limited<B>(
    body: B,
    limit: usize,
    permit: &mut RequestPermit,
) -> Result<Bytes, ProxyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut body = std::pin::pin!(body);
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            let e: Box<dyn std::error::Error + Send + Sync> = e.into();
            ProxyError::invalid_request(format!("The request body could not be read: {e}"))
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry nothing we read
        };
        total = total.saturating_add(data.len());
        if total > limit {
            return Err(ProxyError::invalid_request(format!(
                "The request body is larger than {limit} bytes. A token request is a small \
                 form: its largest part is the service-account token."
            )));
        }
        permit.buffer(data.len())?;
        chunks.push(data);
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => Bytes::from(chunks.concat()),
    })
}

/// Reads a token request's body: at most `limit` bytes, each one accounted in `permit` (the
/// process's and the peer's budget of buffered bytes) as it arrives, all within `deadline`.
pub async fn read_request_body<B>(
    body: B,
    limit: usize,
    deadline: Duration,
    permit: &mut RequestPermit,
) -> Result<Bytes, ProxyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let read = read_limited(body, limit, permit);
    match tokio::time::timeout(deadline, read).await {
        Ok(result) => result,
        Err(_) => Err(ProxyError::RequestTimeout(format!(
            "The request body did not arrive within {} s. Send the whole form at once.",
            deadline.as_secs()
        ))),
    }
}
