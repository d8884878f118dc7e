use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshshm_proto::{default_socket_path, Role};

use crate::conn::{AnyConn, Conn};
use crate::error::{Error, Result};
use crate::shm::{HelloOpts, ShmLink};
use crate::tcp::TcpLink;
use crate::{Call, Response};

/// Which transport a [`Client`] uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Shared memory through the proxy's control socket (the default).
    Shm,
    /// Loopback TCP to the proxy's TCP listener (the baseline).
    Tcp(SocketAddr),
}

/// How a [`Client`] connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Control socket; `None` for [`default_socket_path`].
    pub socket: Option<PathBuf>,
    /// Shm (default) or TCP.
    pub transport: Transport,
    /// Where to go over TCP when shm cannot be set up (default: the
    /// `MESHSHM_TCP_FALLBACK` environment variable, else none).
    pub tcp_fallback: Option<SocketAddr>,
    /// The identity this app presents (the service it is), for access rules.
    pub service: String,
    /// Optional token presented at the handshake.
    pub token: String,
    /// Requested ring size per direction in bytes (0: the proxy's default).
    pub ring_size: u64,
    /// Doorbell spin budget: at most this many polls of the ring before
    /// sleeping (0 = never spin).
    pub spin: u32,
    /// Whether the spin budget follows the load (default `true`): the whole
    /// budget while answers come during the poll, less each time a wait
    /// outlasts it, none (with a probe every few waits) once answers take
    /// longer, so a trickle of requests costs no polling CPU. `false`:
    /// every wait polls its whole budget first.
    pub spin_adaptive: bool,
    /// Limit for connecting and the handshake.
    pub connect_timeout: Duration,
    /// A [`crate::Pipeline`] over TCP: gather requests into writes of this
    /// many bytes, the rest going out at the next poll (0, the default:
    /// one write per request). Fewer syscalls with many in flight, more
    /// latency with few. Other clients and shm ignore it.
    pub tcp_batch: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            socket: None,
            transport: Transport::Shm,
            tcp_fallback: std::env::var("MESHSHM_TCP_FALLBACK")
                .ok()
                .and_then(|s| s.parse().ok()),
            service: String::new(),
            token: String::new(),
            ring_size: 0,
            spin: 2000,
            spin_adaptive: true,
            connect_timeout: Duration::from_secs(5),
            tcp_batch: 0,
        }
    }
}

/// Largest message the TCP transport accepts (the proxy's default maximum).
const TCP_MAX_MESSAGE: usize = meshshm_ring::DEFAULT_MAX_MESSAGE as usize;

/// How often a connection handed out to a call is first checked for a
/// proxy that died while nobody waited on it (one poll syscall).
const PROBE_EVERY: Duration = Duration::from_millis(50);

struct State {
    conn: Option<Arc<dyn AnyConn>>,
    /// Last liveness check of `conn` (see PROBE_EVERY).
    probed: Instant,
    next_attempt: Option<Instant>,
    backoff: Duration,
    last_err: Option<Error>,
}

struct Inner {
    opts: ClientOptions,
    state: Mutex<State>,
    reader_thread: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(c) = self
            .state
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .conn
            .take()
        {
            c.close();
        }
    }
}

/// A client of the mesh: calls services through the sidecar proxy.
///
/// One `Client` is shared by any number of threads (it is `Clone` and
/// `Sync`); each call gets its own stream, and responses are matched by
/// stream id in whatever order they come. The calling threads read the
/// responses themselves (one leads while the others wait), so a call costs
/// no thread hop. If the proxy dies, calls in flight fail at once with
/// [`Error::ProxyGone`], and a later call reconnects (with backoff).
///
/// ```no_run
/// let client = meshshm::Client::connect(None)?;
/// let reply = client.call("echo", "Echo", b"hello", std::time::Duration::from_secs(1))?;
/// assert_eq!(reply, b"hello");
/// # Ok::<(), meshshm::Error>(())
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Connect over shared memory to the proxy at `socket` (default path if `None`).
    ///
    /// # Errors
    /// When the proxy cannot be reached or refuses the connection.
    pub fn connect(socket: Option<&std::path::Path>) -> Result<Client> {
        Client::with_options(ClientOptions {
            socket: socket.map(PathBuf::from),
            ..ClientOptions::default()
        })
    }

    /// Connect with explicit options.
    ///
    /// # Errors
    /// When neither the transport nor the fallback can be set up.
    pub fn with_options(opts: ClientOptions) -> Result<Client> {
        Client::build(opts, false)
    }

    pub(crate) fn build(opts: ClientOptions, reader_thread: bool) -> Result<Client> {
        let c = Client {
            inner: Arc::new(Inner {
                opts,
                state: Mutex::new(State {
                    conn: None,
                    probed: Instant::now(),
                    next_attempt: None,
                    backoff: Duration::ZERO,
                    last_err: None,
                }),
                reader_thread,
            }),
        };
        c.conn()?;
        Ok(c)
    }

    /// Call `service`/`method` with `body`; wait at most `timeout`.
    ///
    /// # Errors
    /// [`Error::Status`] when the service answers with an error status;
    /// [`Error::Timeout`], [`Error::ProxyGone`], [`Error::Connect`] otherwise.
    pub fn call(
        &self,
        service: &str,
        method: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let r = self.invoke(&Call::with_timeout(service, method, body, timeout))?;
        deadline_as_timeout(r.into_result(), timeout)
    }

    /// Make a call with every option; a non-OK status is returned in the
    /// [`Response`], not as an error.
    ///
    /// # Errors
    /// Transport errors, timeouts.
    pub fn invoke(&self, call: &Call<'_>) -> Result<Response> {
        self.conn()?.invoke(call)
    }

    /// "shm" or "tcp": the transport now in use.
    pub fn transport(&self) -> &'static str {
        self.conn().map(|c| c.transport()).unwrap_or("none")
    }

    /// Calls now in flight.
    pub fn in_flight(&self) -> usize {
        self.conn().map(|c| c.in_flight()).unwrap_or(0)
    }

    pub(crate) fn conn(&self) -> Result<Arc<dyn AnyConn>> {
        let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        // A connection nobody waited on may have outlived its proxy (killed,
        // restarted): look before sending a call into a dead ring, so that
        // an idle client's next call goes to the new proxy instead of failing.
        let probe = st.probed.elapsed() >= PROBE_EVERY;
        if probe {
            st.probed = Instant::now();
        }
        if let Some(c) = &st.conn {
            if c.accepting() && !(probe && c.peer_closed()) {
                return Ok(c.clone());
            }
            st.conn = None;
        }
        let now = Instant::now();
        if let (Some(t), Some(e)) = (st.next_attempt, &st.last_err) {
            if now < t {
                return Err(e.clone());
            }
        }
        match self.open() {
            Ok(c) => {
                st.backoff = Duration::ZERO;
                st.next_attempt = None;
                st.last_err = None;
                st.conn = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                st.backoff =
                    (st.backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                st.next_attempt = Some(now + st.backoff);
                st.last_err = Some(e.clone());
                Err(e)
            }
        }
    }

    fn open(&self) -> Result<Arc<dyn AnyConn>> {
        let reader = self.inner.reader_thread;
        Ok(match connect_link(&self.inner.opts)? {
            Linked::Shm(link) => {
                tracing::debug!(session = link.welcome.session_id, "meshshm shm session up");
                with_reader(Conn::new(link), reader)
            }
            Linked::Tcp(link) => with_reader(Conn::new(link), reader),
        })
    }
}

fn with_reader<L: crate::conn::Link>(c: Arc<Conn<L>>, reader: bool) -> Arc<dyn AnyConn> {
    if reader {
        c.start_reader();
    }
    c
}

/// A connection's transport, set up and not yet given its call protocol.
// (Lives only from the handshake to its owner, once per connection: not
// worth a box.)
#[allow(clippy::large_enum_variant)]
pub(crate) enum Linked {
    Shm(ShmLink),
    Tcp(TcpLink),
}

/// Set up the transport `o` asks for: shm through the control socket (or
/// loopback TCP to the fallback when shm cannot be set up and one is
/// given), or TCP.
pub(crate) fn connect_link(o: &ClientOptions) -> Result<Linked> {
    match &o.transport {
        Transport::Tcp(addr) => tcp_link(*addr, o),
        Transport::Shm => {
            let path = o.socket.clone().unwrap_or_else(default_socket_path);
            let hello = HelloOpts {
                role: Role::Client,
                service: &o.service,
                token: &o.token,
                ring_size: o.ring_size,
                spin: o.spin,
                spin_adaptive: o.spin_adaptive,
                timeout: o.connect_timeout,
            };
            match ShmLink::connect(&path, &hello) {
                Ok(link) => Ok(Linked::Shm(link)),
                Err(Error::Rejected(r)) => Err(Error::Rejected(r)),
                Err(e) => match o.tcp_fallback {
                    Some(addr) => {
                        tracing::warn!(error = %e, %addr, "shared memory unavailable; falling back to loopback TCP");
                        tcp_link(addr, o)
                    }
                    None => Err(e),
                },
            }
        }
    }
}

/// The proxy's DEADLINE_EXCEEDED and the client's own timer are the same
/// event seen from two sides: report both as [`Error::Timeout`].
pub(crate) fn deadline_as_timeout(r: Result<Vec<u8>>, timeout: Duration) -> Result<Vec<u8>> {
    match r {
        Err(Error::Status { code, .. }) if code == meshshm_proto::status::DEADLINE_EXCEEDED => {
            Err(Error::Timeout(timeout))
        }
        other => other,
    }
}

fn tcp_link(addr: SocketAddr, o: &ClientOptions) -> Result<Linked> {
    TcpLink::connect(addr, o.connect_timeout, TCP_MAX_MESSAGE).map(Linked::Tcp)
}

impl Call<'_> {
    /// A call with no timeout, normal priority, no headers.
    pub fn new<'a>(service: &'a str, method: &'a str, body: &'a [u8]) -> Call<'a> {
        Call {
            service,
            method,
            body,
            headers: &[],
            timeout: None,
            priority: 1,
        }
    }

    /// A call with a timeout, normal priority, no headers.
    pub fn with_timeout<'a>(
        service: &'a str,
        method: &'a str,
        body: &'a [u8],
        timeout: Duration,
    ) -> Call<'a> {
        Call {
            timeout: Some(timeout),
            ..Call::new(service, method, body)
        }
    }
}
