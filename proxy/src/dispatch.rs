//! What a session does with one request, whatever transport it came on.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use meshshm_proto::{status, RequestMeta};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use std::sync::Arc;

use crate::gov::{Decision, Peer, Tally};
use crate::router::Resp;
use crate::Shared;

/// How a request will be answered.
pub enum Outcome {
    /// Built-in echo: the session writes the body straight back.
    Echo,
    /// Answered at once (an error).
    Reply(Resp),
    /// Forwarded; the answer comes on the session's completion channel.
    Spawned,
    /// The stream id belongs to a request still in flight: a protocol
    /// violation (the session closes; answering would make two responses
    /// with one id, and forgetting the first would let a peer run
    /// untracked, unbounded work).
    Reused,
}

/// Completions of forwarded requests: (stream id, the task that ran it,
/// response). The task id tells a completion of a cancelled request from
/// one of a later request that reused its stream id.
pub type Done = mpsc::UnboundedSender<(u64, tokio::task::Id, Resp)>;

/// The requests of one connection that are in flight upstream, and the
/// bytes the proxy holds for them (their metadata and bodies, copied out of
/// the connection to be forwarded): a session stops reading requests while
/// they pass `shm.max_buffered`.
#[derive(Default)]
pub struct InFlight {
    calls: HashMap<u64, (AbortHandle, usize)>,
    bytes: usize,
}

impl InFlight {
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Bytes of request held for the calls in flight.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn contains(&self, stream_id: u64) -> bool {
        self.calls.contains_key(&stream_id)
    }

    fn insert(&mut self, stream_id: u64, h: AbortHandle, bytes: usize) {
        self.bytes += bytes;
        if let Some((_, old)) = self.calls.insert(stream_id, (h, bytes)) {
            self.bytes -= old;
        }
    }

    /// Forget a call (cancelled); its task, to abort.
    pub fn remove(&mut self, stream_id: u64) -> Option<AbortHandle> {
        let (h, bytes) = self.calls.remove(&stream_id)?;
        self.bytes -= bytes;
        Some(h)
    }

    /// Every call's task (the connection is closing).
    pub fn drain(&mut self) -> impl Iterator<Item = AbortHandle> + '_ {
        self.bytes = 0;
        self.calls.drain().map(|(_, (h, _))| h)
    }
}

/// Take a completion: the stream's entry if it still belongs to `task`
/// (false: the request was cancelled meanwhile; drop the response).
pub fn complete(inflight: &mut InFlight, stream_id: u64, task: tokio::task::Id) -> bool {
    if inflight.calls.get(&stream_id).map(|(h, _)| h.id()) == Some(task) {
        inflight.remove(stream_id);
        true
    } else {
        false
    }
}

/// One request as a transport read it.
pub struct Inbound<'a> {
    pub stream_id: u64,
    pub meta: &'a [u8],
    pub body: &'a [u8],
    /// When it arrived: its latency (echo included) and deadline count from
    /// here. A transport that reads a batch reads the clock once for all of
    /// it (a vDSO call, but one per request showed in the profile).
    pub arrived: Instant,
}

/// Route one request: the `[access.call]` uid rules, then governance
/// (access rules, attribute routing, overload; crate::gov), then the route
/// (skipped for a service this session's calls already showed to be a
/// plain echo under the current configuration: `Governor::echo_known`).
/// Its metrics are partly counted in `tally`: the caller adds them to the
/// shared ones (`Governor::flush`) before its answers go out.
pub fn handle_request(
    sh: &Arc<Shared>,
    tally: &mut Tally,
    peer: &Peer,
    req: Inbound<'_>,
    done: &Done,
    inflight: &mut InFlight,
) -> Outcome {
    let Inbound {
        stream_id,
        meta,
        body,
        arrived: t0,
    } = req;
    if !inflight.is_empty() && inflight.contains(stream_id) {
        return Outcome::Reused;
    }
    let m = match RequestMeta::decode(meta) {
        Ok(m) => m,
        Err(e) => {
            return Outcome::Reply(Resp::error(
                status::INVALID_ARGUMENT,
                &format!("request metadata: {e}"),
            ))
        }
    };
    if sh.gov.echo_known(tally, m.service, t0) {
        return Outcome::Echo;
    }
    let uid = peer.uid;
    let decision = if !sh.router.may_call(uid, m.service) {
        tracing::debug!(
            ?uid,
            service = m.service,
            "call refused by the access rules"
        );
        let r = Resp::error(
            status::PERMISSION_DENIED,
            &format!(
                "{} may not call service {:?}",
                uid.map_or("a TCP peer".to_owned(), |u| format!("uid {u}")),
                m.service
            ),
        );
        return Outcome::Reply(r);
    } else {
        sh.gov.decide(
            tally, &sh.router, peer, m.service, m.method, m.priority, m.headers, t0,
        )
    };
    match decision {
        Decision::Echo => Outcome::Echo,
        Decision::Reply(r) => Outcome::Reply(r),
        Decision::NotFound => Outcome::Reply(Resp::error(
            status::NOT_FOUND,
            &format!("no route for service {:?}", m.service),
        )),
        Decision::Forward(job) => {
            let deadline =
                (m.timeout_ms > 0).then(|| t0 + Duration::from_millis(m.timeout_ms as u64));
            let done = done.clone();
            let held = meta.len() + body.len();
            let (meta, body) = (meta.to_vec(), body.to_vec());
            let sh = sh.clone();
            let h = tokio::spawn(async move {
                let r = job.run(sh, meta, body, deadline).await;
                let _ = done.send((stream_id, tokio::task::id(), r));
            });
            inflight.insert(stream_id, h.abort_handle(), held);
            Outcome::Spawned
        }
    }
}
