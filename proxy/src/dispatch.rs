//! What a session does with one request, whatever transport it came on.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use meshshm_proto::{status, RequestMeta};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::router::{call_upstream, Resp, Route, Router};

/// How a request will be answered.
pub enum Outcome {
    /// Built-in echo: the session writes the body straight back.
    Echo,
    /// Answered at once (an error).
    Reply(Resp),
    /// Forwarded; the answer comes on the session's completion channel.
    Spawned,
}

/// Completions of forwarded requests: (stream id, response).
pub type Done = mpsc::UnboundedSender<(u64, Resp)>;

pub fn handle_request(
    router: &Router,
    stream_id: u64,
    meta: &[u8],
    body: &[u8],
    done: &Done,
    inflight: &mut HashMap<u64, AbortHandle>,
) -> Outcome {
    let m = match RequestMeta::decode(meta) {
        Ok(m) => m,
        Err(e) => {
            return Outcome::Reply(Resp::error(
                status::INVALID_ARGUMENT,
                &format!("request metadata: {e}"),
            ))
        }
    };
    let deadline =
        (m.timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(m.timeout_ms as u64));
    match router.route(m.service) {
        Route::Echo => Outcome::Echo,
        Route::NotFound => Outcome::Reply(Resp::error(
            status::NOT_FOUND,
            &format!("no route for service {:?}", m.service),
        )),
        route => {
            let done = done.clone();
            let (meta, body) = (meta.to_vec(), body.to_vec());
            let h = tokio::spawn(async move {
                let r = call_upstream(route, meta, body, deadline).await;
                let _ = done.send((stream_id, r));
            });
            inflight.insert(stream_id, h.abort_handle());
            Outcome::Spawned
        }
    }
}
