//! The six transports and the server process behind each: a proxy per
//! shm/TCP transport (so each one's CPU is its own), the Unix-socket echo
//! server, and a ring-echo child per floor.

use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::ValueEnum;
use meshshm::{AsyncClient, Call, Client, ClientOptions};

use crate::floor::{self, FloorConn};
use crate::mux::MuxConn;
use crate::procs::ServerProc;
use crate::uds::{self, UdsConn};
use crate::wire::{check_echo, METHOD, SERVICE};

/// What is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
pub enum Transport {
    /// shm through the proxy; client and proxy poll a long time (fixed) before they sleep
    #[value(name = "shm-spin")]
    ShmSpin,
    /// shm through the proxy, waiting as shipped: a short adaptive poll, then the doorbell
    #[value(name = "shm-block")]
    ShmBlock,
    /// shm through the proxy; neither polls: every wait is a doorbell (one in flight only)
    #[value(name = "shm-park")]
    ShmPark,
    /// shm-block with the proxy's waiter forced to epoll (`--waiter epoll`)
    #[value(name = "shm-block-epoll")]
    ShmBlockEpoll,
    /// shm-block with the proxy's waiter forced to io_uring (`--waiter io_uring`)
    #[value(name = "shm-block-uring")]
    ShmBlockUring,
    /// loopback TCP through the proxy, the same frames
    #[value(name = "tcp")]
    Tcp,
    /// tcp with many in flight gathered into 16 KiB writes
    /// (`ClientOptions::tcp_batch`; one in flight: tcp's cell, not repeated)
    #[value(name = "tcp-batch")]
    TcpBatch,
    /// a plain Unix-socket echo server (reference)
    #[value(name = "uds")]
    Uds,
    /// bare two-process ring echo, spinning (floor)
    #[value(name = "ring-floor")]
    RingFloor,
    /// bare two-process ring echo, waiting as shm-block does (floor)
    #[value(name = "ring-floor-block")]
    RingFloorBlock,
    /// bare two-process ring echo, eventfd doorbells, no polling (floor; one in flight only)
    #[value(name = "ring-floor-park")]
    RingFloorPark,
}

impl Transport {
    pub const ALL: [Transport; 9] = [
        Transport::ShmSpin,
        Transport::ShmBlock,
        Transport::ShmPark,
        Transport::Tcp,
        Transport::TcpBatch,
        Transport::Uds,
        Transport::RingFloor,
        Transport::RingFloorBlock,
        Transport::RingFloorPark,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Transport::ShmSpin => "shm-spin",
            Transport::ShmBlock => "shm-block",
            Transport::ShmPark => "shm-park",
            Transport::ShmBlockEpoll => "shm-block-epoll",
            Transport::ShmBlockUring => "shm-block-uring",
            Transport::Tcp => "tcp",
            Transport::TcpBatch => "tcp-batch",
            Transport::Uds => "uds",
            Transport::RingFloor => "ring-floor",
            Transport::RingFloorBlock => "ring-floor-block",
            Transport::RingFloorPark => "ring-floor-park",
        }
    }

    /// How both sides wait: `spin` for the spinning pair, `block` for the
    /// blocking pair (and the proxy's waiter variants), no polling for the
    /// parked pair and the socket transports.
    pub fn spin(self, spin: Spin, block: Spin) -> Spin {
        match self {
            Transport::ShmSpin | Transport::RingFloor => spin,
            Transport::ShmBlock
            | Transport::ShmBlockEpoll
            | Transport::ShmBlockUring
            | Transport::RingFloorBlock => block,
            _ => Spin {
                client_polls: 0,
                server_us: 0,
                adaptive: false,
            },
        }
    }

    /// Whether this is measured through a proxy.
    pub fn via_proxy(self) -> bool {
        matches!(
            self,
            Transport::ShmSpin
                | Transport::ShmBlock
                | Transport::ShmPark
                | Transport::ShmBlockEpoll
                | Transport::ShmBlockUring
                | Transport::Tcp
                | Transport::TcpBatch
        )
    }

    /// Loopback TCP through the proxy (either way of writing).
    pub fn is_tcp(self) -> bool {
        matches!(self, Transport::Tcp | Transport::TcpBatch)
    }

    /// Whether cells with this many in flight are measured (tcp-batch with
    /// one in flight would repeat tcp's cell; the parked pair shows what
    /// the blocking pair's polling saves with one in flight).
    pub fn measures(self, concurrency: usize) -> bool {
        match self {
            Transport::TcpBatch => concurrency > 1,
            Transport::ShmPark | Transport::RingFloorPark => concurrency == 1,
            _ => true,
        }
    }

    /// The proxy `--waiter` this transport forces, if any.
    pub fn waiter(self) -> Option<&'static str> {
        match self {
            Transport::ShmBlockEpoll => Some("epoll"),
            Transport::ShmBlockUring => Some("io_uring"),
            _ => None,
        }
    }
}

/// tcp-batch: bytes of requests gathered per write (1 KiB, 128 in flight:
/// 4 KiB 0.99M req/s, 8 KiB 1.25–1.28M, 16 KiB 1.34–1.47M, 64 KiB
/// 0.91–1.01M; with 16 in flight all of them 0.8–0.9x of one write per
/// request).
const TCP_BATCH: usize = 16 << 10;

/// Spin settings.
#[derive(Debug, Clone, Copy)]
pub struct Spin {
    /// client polls before sleeping (`ClientOptions::spin`, `Waiter` spin)
    pub client_polls: u32,
    /// server µs of polling before sleeping (`--spin-us`, the floor child)
    pub server_us: u64,
    /// both budgets follow the load (`meshshm_ring::AdaptiveSpin`) rather
    /// than being polled whole before every sleep (`--spin-fixed`)
    pub adaptive: bool,
}

impl Spin {
    /// How the shim and the proxy wait by default: `ClientOptions::spin`
    /// polls and the proxy's `shm.spin_us` (proxy/src/default.toml), both
    /// adaptive.
    pub fn shipped() -> Spin {
        Spin {
            client_polls: ClientOptions::default().spin,
            server_us: 20,
            adaptive: true,
        }
    }
}

enum Kind {
    Proxy { socket: PathBuf, tcp: SocketAddr },
    Uds { socket: PathBuf },
    Floor { ctl: UnixStream },
}

/// A transport's server process, ready to take connections.
pub struct Backend {
    pub transport: Transport,
    proc: ServerProc,
    kind: Kind,
    spin: Spin,
    /// ring bytes per direction asked for (0: the proxy's default)
    ring: usize,
    /// The shim's async client, made once and kept. Its connection's reader
    /// is a task on the runtime that opened it; each many-in-flight cell
    /// has a runtime of its own, so when a cell ends the connection ends
    /// with it and the next cell's first call opens a new one (outside the
    /// measured part: the warm-up comes first).
    async_shim: std::cell::OnceCell<AsyncClient>,
    /// More shim async clients (sessions) for `--sessions`, kept likewise.
    more_shims: std::cell::RefCell<Vec<AsyncClient>>,
    /// Idle shm clients kept connected to the proxy (`--idle-sessions`).
    _idle: Vec<Client>,
}

/// How to start the servers.
pub struct Setup<'a> {
    pub proxy: &'a Path,
    pub proxy_threads: usize,
    pub dir: &'a Path,
    pub spin: Spin,
    /// how the blocking transports wait
    pub block: Spin,
    /// ring bytes per direction (0: the proxy's default, 2 MiB)
    pub ring_size: usize,
    /// `--waiter` for the proxies (None: the proxy's default)
    pub waiter: Option<&'a str>,
    /// idle shm sessions to open on each shm proxy before measuring
    pub idle_sessions: usize,
}

const READY: Duration = Duration::from_secs(20);

impl Backend {
    pub fn start(t: Transport, o: &Setup<'_>) -> Result<Backend, String> {
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let parent = std::process::id().to_string();
        let spin = t.spin(o.spin, o.block);
        let log = o.dir.join(format!("{}.log", t.name()));
        match t {
            Transport::ShmSpin
            | Transport::ShmBlock
            | Transport::ShmPark
            | Transport::ShmBlockEpoll
            | Transport::ShmBlockUring
            | Transport::Tcp
            | Transport::TcpBatch => {
                let socket = o.dir.join(format!("{}.sock", t.name()));
                let mut cmd = Command::new(&me);
                cmd.args(["exec", "--parent", &parent, "--"])
                    .arg(o.proxy)
                    .arg("--socket")
                    .arg(&socket)
                    .args(["--tcp", "127.0.0.1:0", "--spin-us"])
                    .arg(spin.server_us.to_string())
                    .arg("--threads")
                    .arg(o.proxy_threads.to_string())
                    .env("RUST_LOG", "warn");
                if !spin.adaptive {
                    cmd.arg("--spin-fixed");
                }
                if let Some(w) = t.waiter().or(o.waiter) {
                    cmd.args(["--waiter", w]);
                }
                let name = format!("meshshm-proxy ({})", t.name());
                let (proc, line) =
                    ServerProc::spawn(&name, cmd, log, "meshshm-proxy ready", READY)?;
                let tcp = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("tcp="))
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| format!("{name}: no tcp= address in {line:?}"))?;
                let mut b = Backend {
                    transport: t,
                    proc,
                    kind: Kind::Proxy { socket, tcp },
                    spin,
                    ring: o.ring_size,
                    async_shim: Default::default(),
                    more_shims: Default::default(),
                    _idle: Vec::new(),
                };
                if !t.is_tcp() {
                    // Idle apps: connected, one call each, then quiet (their
                    // sessions sleep on their doorbells in the proxy).
                    for _ in 0..o.idle_sessions {
                        let c = Client::with_options(ClientOptions {
                            ring_size: 64 << 10,
                            spin: 0,
                            ..b.shim_options()
                        })
                        .map_err(|e| format!("idle session: {e}"))?;
                        c.invoke(&Call::new(SERVICE, METHOD, b"idle"))
                            .map_err(|e| format!("idle session: {e}"))?;
                        b._idle.push(c);
                    }
                }
                Ok(b)
            }
            Transport::Uds => {
                let socket = o.dir.join("uds-echo.sock");
                let mut cmd = Command::new(&me);
                cmd.args(["uds-echo", "--parent", &parent, "--socket"])
                    .arg(&socket);
                let (proc, _) = ServerProc::spawn("uds-echo", cmd, log, "uds-echo ready", READY)?;
                Ok(Backend {
                    transport: t,
                    proc,
                    kind: Kind::Uds { socket },
                    spin,
                    ring: o.ring_size,
                    async_shim: Default::default(),
                    more_shims: Default::default(),
                    _idle: Vec::new(),
                })
            }
            Transport::RingFloor | Transport::RingFloorBlock | Transport::RingFloorPark => {
                let path = o.dir.join(format!("{}.sock", t.name()));
                let l =
                    UnixListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let mut cmd = Command::new(&me);
                cmd.args(["ring-echo", "--parent", &parent, "--connect"])
                    .arg(&path);
                let name = format!("ring-echo ({})", t.name());
                let (proc, _) = ServerProc::spawn(&name, cmd, log, "ring-echo ready", READY)?;
                // The child connected before it said ready.
                l.set_nonblocking(true).map_err(|e| e.to_string())?;
                let (ctl, _) = l
                    .accept()
                    .map_err(|e| format!("{name} did not connect: {e}"))?;
                ctl.set_nonblocking(false).map_err(|e| e.to_string())?;
                let _ = std::fs::remove_file(&path);
                Ok(Backend {
                    transport: t,
                    proc,
                    kind: Kind::Floor { ctl },
                    spin,
                    ring: o.ring_size,
                    async_shim: Default::default(),
                    more_shims: Default::default(),
                    _idle: Vec::new(),
                })
            }
        }
    }

    /// The server process (its CPU is the "proxy" column).
    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    /// Is it still running? (`Err` says how it ended, with its log.)
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.proc.exited() {
            None => Ok(()),
            Some(st) => Err(format!(
                "{} exited ({st}); its log:\n{}",
                self.proc.name(),
                self.proc.log_tail()
            )),
        }
    }

    fn shim_options(&self) -> ClientOptions {
        let Kind::Proxy { socket, tcp } = &self.kind else {
            unreachable!("shim options for a proxy transport only")
        };
        ClientOptions {
            socket: Some(socket.clone()),
            tcp_batch: if self.transport == Transport::TcpBatch {
                TCP_BATCH
            } else {
                0
            },
            transport: if self.transport.is_tcp() {
                meshshm::Transport::Tcp(*tcp)
            } else {
                meshshm::Transport::Shm
            },
            tcp_fallback: None,
            service: "meshshm-bench".into(),
            spin: self.spin.client_polls,
            spin_adaptive: self.spin.adaptive,
            ring_size: self.ring as u64,
            ..ClientOptions::default()
        }
    }

    fn floor_opts(&self) -> floor::FloorOpts {
        floor::FloorOpts {
            client_spin: self.spin.client_polls,
            server_spin_us: self.spin.server_us,
            adaptive: self.spin.adaptive,
            ring: if self.ring == 0 {
                floor::RING
            } else {
                self.ring
            },
        }
    }

    /// A connection for one request at a time.
    pub fn sync_conn(&self) -> Result<SyncConn, String> {
        Ok(match &self.kind {
            Kind::Proxy { .. } => SyncConn::Shim(
                Client::with_options(self.shim_options()).map_err(|e| e.to_string())?,
            ),
            Kind::Uds { socket } => SyncConn::Uds(UdsConn::connect(socket)?),
            Kind::Floor { ctl } => {
                SyncConn::Floor(Box::new(FloorConn::open(ctl, &self.floor_opts())?))
            }
        })
    }

    /// `n` connections for many requests in flight: `n` shm sessions
    /// through a proxy (`--sessions`); one connection for the others.
    pub async fn async_conns(&self, n: usize) -> Result<Vec<AsyncConn>, String> {
        let mut out = vec![self.async_conn().await?];
        if !matches!(self.kind, Kind::Proxy { .. }) {
            return Ok(out);
        }
        while self.more_shims.borrow().len() + 1 < n {
            let c = AsyncClient::connect(self.shim_options())
                .await
                .map_err(|e| e.to_string())?;
            self.more_shims.borrow_mut().push(c);
        }
        let more = self.more_shims.borrow();
        out.extend(
            more.iter()
                .take(n.saturating_sub(1))
                .cloned()
                .map(AsyncConn::Shim),
        );
        Ok(out)
    }

    /// A pipeline of its own, for a proxy transport (`None` for the
    /// references).
    pub fn pipeline(&self) -> Result<Option<meshshm::Pipeline>, String> {
        if !matches!(self.kind, Kind::Proxy { .. }) {
            return Ok(None);
        }
        meshshm::Pipeline::connect(&self.shim_options())
            .map(Some)
            .map_err(|e| format!("pipeline: {e}"))
    }

    /// A connection for many requests in flight (tokio tasks).
    pub async fn async_conn(&self) -> Result<AsyncConn, String> {
        Ok(match &self.kind {
            Kind::Proxy { .. } => {
                if self.async_shim.get().is_none() {
                    let c = AsyncClient::connect(self.shim_options())
                        .await
                        .map_err(|e| e.to_string())?;
                    let _ = self.async_shim.set(c);
                }
                AsyncConn::Shim(self.async_shim.get().expect("set above").clone())
            }
            Kind::Uds { socket } => AsyncConn::Mux(std::rc::Rc::new(uds::connect_mux(socket)?)),
            Kind::Floor { ctl } => AsyncConn::Mux(std::rc::Rc::new(floor::connect_mux(
                ctl,
                &self.floor_opts(),
            )?)),
        })
    }
}

/// One request at a time, on the calling thread.
pub enum SyncConn {
    Shim(Client),
    Uds(UdsConn),
    Floor(Box<FloorConn>),
}

impl SyncConn {
    /// Send `body`, wait for the echo, check it.
    pub fn call(&mut self, body: &[u8], resp: &mut Vec<u8>) -> Result<(), String> {
        match self {
            SyncConn::Shim(c) => {
                let r = c
                    .invoke(&Call::new(SERVICE, METHOD, body))
                    .map_err(|e| e.to_string())?;
                if r.status != meshshm::status::OK {
                    return Err(format!("status {}: {}", r.status, r.message));
                }
                *resp = r.body;
            }
            SyncConn::Uds(c) => c.call(body, resp)?,
            SyncConn::Floor(c) => c.call(body, resp)?,
        }
        check_echo(resp, body)
    }
}

/// Many requests in flight, shared by the tasks of one thread.
#[derive(Clone)]
pub enum AsyncConn {
    Shim(AsyncClient),
    Mux(std::rc::Rc<MuxConn>),
}

impl AsyncConn {
    /// Send `body`, await the echo, check it.
    pub async fn call(&self, body: &[u8]) -> Result<(), String> {
        let got = match self {
            AsyncConn::Shim(c) => {
                let r = c
                    .invoke(&Call::new(SERVICE, METHOD, body))
                    .await
                    .map_err(|e| e.to_string())?;
                if r.status != meshshm::status::OK {
                    return Err(format!("status {}: {}", r.status, r.message));
                }
                r.body
            }
            AsyncConn::Mux(m) => m.call(body).await?,
        };
        check_echo(&got, body)
    }
}
