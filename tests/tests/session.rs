//! The session path end to end, with the real proxy binary and clients in
//! this and other processes (issue: session protocol, client shim, proxy).

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshshm::{Call, Client, ClientOptions, Error, Server, Transport};
use meshshm_tests::{bin, body, eventually, fnv, shm_leftovers_of, KillOnDrop, Proxy, ProxyOpts};

const T: Duration = Duration::from_secs(10);

/// Sizes from empty to several MiB: the largest are fragmented in the
/// 2 MiB rings (max frame payload 1 MiB).
const SIZES: &[usize] = &[
    0,
    1,
    63,
    64,
    1000,
    4096,
    65_536,
    1 << 20,
    (1 << 20) + 7,
    5 << 20,
];

/// One suite, run against each transport.
fn conformance(c: &Client) {
    for (i, &n) in SIZES.iter().enumerate() {
        let b = body(i as u64, n);
        let r = c
            .call("echo", "Echo", &b, T)
            .unwrap_or_else(|e| panic!("{n} bytes: {e}"));
        assert_eq!(r.len(), n);
        assert!(r == b, "{n}-byte echo differs");
    }
    // Unknown service: an error response, not a dropped request.
    match c.call("no-such-service", "X", b"x", T) {
        Err(Error::Status { code, message }) => {
            assert_eq!(code, meshshm::status::NOT_FOUND);
            assert!(message.contains("no-such-service"), "{message}");
        }
        other => panic!("expected NOT_FOUND, got {other:?}"),
    }
    // Headers and priority travel; echo ignores them but must accept them.
    let h: &[(&str, &[u8])] = &[("tenant", b"blue"), ("x-trace", b"1234")];
    let r = c
        .invoke(&Call {
            headers: h,
            priority: 2,
            timeout: Some(T),
            ..Call::new("echo", "Echo", b"with headers")
        })
        .unwrap();
    assert_eq!(r.status, 0);
    assert_eq!(r.body, b"with headers");
}

#[test]
fn shm_and_tcp_give_identical_answers() {
    let p = Proxy::start();
    let shm = p.client();
    assert_eq!(shm.transport(), "shm");
    conformance(&shm);
    let tcp = p.tcp_client();
    assert_eq!(tcp.transport(), "tcp");
    conformance(&tcp);
    for (i, &n) in SIZES.iter().enumerate() {
        let b = body(100 + i as u64, n);
        assert_eq!(
            shm.call("echo", "E", &b, T).unwrap(),
            tcp.call("echo", "E", &b, T).unwrap()
        );
    }
    drop((shm, tcp));
    assert!(p.log_text().contains("shm session up"));
}

#[test]
fn clients_in_other_processes_over_shm_and_tcp() {
    let p = Proxy::start();
    let data = body(7, 300_000);
    let file = p.dir.0.join("body.bin");
    std::fs::write(&file, &data).unwrap();
    let run = |extra: &[String]| {
        let out = Command::new(bin("meshshm"))
            .arg("--socket")
            .arg(&p.socket)
            .args(["call", "echo", "Echo", "--file"])
            .arg(&file)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let a = run(&[]);
    let b = run(&["--tcp".into(), p.tcp.to_string()]);
    assert!(a == data && b == data);
    // Errors give a message and a non-zero exit.
    let out = Command::new(bin("meshshm"))
        .arg("--socket")
        .arg(&p.socket)
        .args(["call", "nowhere", "X", "--data", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

fn many_in_flight(c: &Client) {
    let threads = 8;
    let per = 300;
    let done = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|s| {
        for t in 0..threads {
            let (c, done) = (c.clone(), done.clone());
            s.spawn(move || {
                for i in 0..per {
                    let seed = (t * 1_000_000 + i) as u64;
                    let b = body(seed, [8, 100, 1500, 40_000][i % 4]);
                    let r = c.call("echo", "E", &b, T).expect("call");
                    assert_eq!(fnv(&r), fnv(&b), "response does not match its request");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    assert_eq!(done.load(Ordering::Relaxed), threads * per);
}

#[test]
fn many_threads_share_one_client() {
    let p = Proxy::start();
    many_in_flight(&p.client());
    many_in_flight(&p.tcp_client());
}

#[test]
fn async_client_many_in_flight() {
    let p = Proxy::start();
    let rt = tokio_rt();
    for transport in [Transport::Shm, Transport::Tcp(p.tcp)] {
        let opts = options(&p, transport);
        rt.block_on(async {
            let c = meshshm::AsyncClient::connect(opts).await.unwrap();
            let mut tasks = Vec::new();
            for i in 0..256u64 {
                let c = c.clone();
                tasks.push(tokio::spawn(async move {
                    let b = body(i, 100 + (i as usize * 37) % 5000);
                    let r = c.call("echo", "E", &b, T).await.unwrap();
                    assert_eq!(r, b);
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
    }
}

/// The async client's reader is a task on the runtime that opened the
/// connection. When that runtime is gone, the next call (on another
/// runtime) opens a new connection instead of waiting for a reader that no
/// longer exists; over both transports, with large bodies too.
#[test]
fn async_client_outlives_the_runtime_that_connected_it() {
    let p = Proxy::start();
    for transport in [Transport::Shm, Transport::Tcp(p.tcp)] {
        let opts = options(&p, transport);
        let first = tokio_rt();
        let c = first.block_on(async {
            let c = meshshm::AsyncClient::connect(opts).await.unwrap();
            let b = body(1, 3000);
            assert_eq!(c.call("echo", "E", &b, T).await.unwrap(), b);
            c
        });
        drop(first);
        for round in 0..3u64 {
            let rt = current_thread_rt();
            rt.block_on(async {
                for (i, size) in [0usize, 64, 70_000, 1 << 20].into_iter().enumerate() {
                    let b = body(round * 10 + i as u64, size);
                    let r = tokio::time::timeout(T, c.call("echo", "E", &b, T))
                        .await
                        .expect("a call after the first runtime ended hung")
                        .unwrap();
                    assert_eq!(r, b);
                }
            });
        }
    }
}

/// Many large calls at once from one thread: more request bytes than the
/// rings (or socket buffers) hold, so sends must wait for room while the
/// responses that make room come back on the same thread. Nothing may
/// block that thread while it waits.
#[test]
fn async_client_large_calls_on_one_thread_do_not_deadlock() {
    let p = Proxy::start();
    for transport in [Transport::Shm, Transport::Tcp(p.tcp)] {
        let opts = options(&p, transport);
        let rt = current_thread_rt();
        rt.block_on(async {
            let c = meshshm::AsyncClient::connect(opts).await.unwrap();
            let mut tasks = Vec::new();
            for i in 0..24u64 {
                let c = c.clone();
                tasks.push(tokio::task::spawn(async move {
                    let b = body(i, 1 << 20);
                    let r = c.call("echo", "E", &b, T).await.unwrap();
                    assert!(r == b, "call {i}: wrong body");
                }));
            }
            join_within(tasks, "large concurrent calls on one thread").await;
        });
    }
}

/// Answers larger than half of small rings, many at once: the proxy takes a
/// request only when its answer fits in the app's ring now (else the request
/// waits in the app's ring), and most answers must first wait for a pad to
/// the end of the ring to be read. Every call completes with its own body,
/// from tasks on one thread and from threads, and nothing hangs.
#[test]
fn answers_that_wait_for_room_in_small_rings() {
    let p = Proxy::start();
    let opts = ClientOptions {
        ring_size: 64 << 10,
        ..options(&p, Transport::Shm)
    };
    // 20 KiB .. 60 KiB: single frames (under the 64 KiB ring's frame limit),
    // mostly too large to fit twice, so the end of the ring is often padded.
    let size = |i: u64| (20 << 10) + (i as usize * 7919) % (40 << 10);
    // On one thread, and on two workers (the reader and the callers in
    // line then run on either).
    for rt in [current_thread_rt(), tokio_rt()] {
        rt.block_on(async {
            let c = meshshm::AsyncClient::connect(opts.clone()).await.unwrap();
            let mut tasks = Vec::new();
            for i in 0..32u64 {
                let c = c.clone();
                tasks.push(tokio::task::spawn(async move {
                    for k in 0..8 {
                        let b = body(i * 100 + k, size(i * 8 + k));
                        let r = c.call("echo", "E", &b, T).await.unwrap();
                        assert!(r == b, "call {i}/{k}: wrong body");
                    }
                }));
            }
            join_within(tasks, "calls waiting for room").await;
        });
    }
    let c = Client::with_options(opts).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let c = &c;
            s.spawn(move || {
                for k in 0..40 {
                    let b = body(t * 1000 + k, size(t * 40 + k));
                    assert_eq!(
                        c.call("echo", "E", &b, T).unwrap(),
                        b,
                        "thread {t} call {k}"
                    );
                }
            });
        }
    });
}

/// Async calls of every size through 64 KiB rings, many larger than half
/// the ring (fragments, whose rest is often left to the connection), a
/// third of them with timeouts short enough to fire mid-message (their
/// Cancel is then owed behind the rest): every call that answers gets its
/// own body, and the session stays whole (a frame out of order would be a
/// protocol violation and close it), on one thread and on two workers.
#[test]
fn fragmented_async_calls_and_their_cancels_keep_the_session_whole() {
    let p = Proxy::start();
    let opts = ClientOptions {
        ring_size: 64 << 10,
        ..options(&p, Transport::Shm)
    };
    let size = |n: u64| 100 + (n as usize * 15_401) % (200 << 10);
    for rt in [current_thread_rt(), tokio_rt()] {
        rt.block_on(async {
            let c = meshshm::AsyncClient::connect(opts.clone()).await.unwrap();
            let timed_out = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for i in 0..24u64 {
                let (c, timed_out) = (c.clone(), timed_out.clone());
                tasks.push(tokio::task::spawn(async move {
                    for k in 0..6u64 {
                        let n = i * 6 + k;
                        let b = body(n, size(n));
                        if n % 3 == 0 {
                            match c.call("echo", "E", &b, Duration::from_micros(300)).await {
                                Ok(r) => assert!(r == b, "call {n}: wrong body"),
                                Err(Error::Timeout(_)) => {
                                    timed_out.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => panic!("call {n}: {e}"),
                            }
                        } else {
                            let r = c.call("echo", "E", &b, T).await.unwrap();
                            assert!(r == b, "call {n}: wrong body");
                        }
                    }
                }));
            }
            join_within(tasks, "fragmented calls").await;
            assert!(
                timed_out.load(Ordering::Relaxed) > 0,
                "no call timed out: the test did not cancel mid-message"
            );
            for n in 0..4u64 {
                let b = body(1000 + n, size(1000 + n) + (100 << 10));
                assert_eq!(c.call("echo", "E", &b, T).await.unwrap(), b, "after: {n}");
            }
        });
    }
}

/// An app that sends large requests to a service that never answers cannot
/// make the proxy hold more than `shm.max_buffered` for it: past that the
/// proxy stops reading its requests (they wait in the app's ring) until
/// some complete. Here 48 × 1 MiB against a 4 MiB budget: the proxy's
/// private memory grows by a few MiB, not by 48 (it did before the budget),
/// another app's calls go through meanwhile, and the held calls time out.
/// (The rest of the first app's requests then wait their turn in its ring,
/// behind the held ones: backpressure, as with `shm.max_in_flight`.)
#[test]
fn an_app_cannot_make_the_proxy_hold_more_than_max_buffered() {
    let p = Proxy::start_with(ProxyOpts {
        replace: vec![(
            "max_buffered = 67108864".into(),
            "max_buffered = 4194304".into(),
        )],
        ..Default::default()
    });
    let _server = Server::bind(Some(&p.socket), "hold").unwrap();
    // A ring that takes all 48 requests at once: only the budget stops the
    // proxy from reading them.
    let opts = ClientOptions {
        ring_size: 64 << 20,
        ..options(&p, Transport::Shm)
    };
    let anon_kb = |pid: i32| -> u64 {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        st.lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("RssAnon in /proc/PID/status")
    };
    let rt = tokio_rt();
    rt.block_on(async {
        let c = meshshm::AsyncClient::connect(opts.clone()).await.unwrap();
        let other = meshshm::AsyncClient::connect(opts).await.unwrap();
        assert_eq!(c.call("echo", "E", b"warm", T).await.unwrap(), b"warm");
        assert_eq!(other.call("echo", "E", b"warm", T).await.unwrap(), b"warm");
        let before = anon_kb(p.pid());
        let calls: Vec<_> = (0..48u64)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move {
                    let b = body(i, 1 << 20);
                    c.call("hold", "H", &b, Duration::from_millis(2500)).await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let held = anon_kb(p.pid()).saturating_sub(before);
        println!("proxy RssAnon grew by {held} KiB");
        for i in 0..4u64 {
            let b = body(100 + i, 300_000);
            let r = other
                .call("echo", "E", &b, Duration::from_millis(500))
                .await;
            assert_eq!(r.unwrap(), b, "another app's call {i}");
        }
        for t in calls {
            let r = t.await.unwrap();
            assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
        }
        assert!(
            held < 16 << 10,
            "the proxy's private memory grew by {held} KiB holding calls nobody answers"
        );
    });
}

/// A proxy that takes 4 requests at a time from an app, a server app
/// ("hold") that never answers, and shm options with 64 KiB rings: calls to
/// "hold" fill the ring and keep it full until they time out.
fn holding_proxy() -> (Proxy, Server, ClientOptions) {
    let p = Proxy::start_with(ProxyOpts {
        replace: vec![("max_in_flight = 4096".into(), "max_in_flight = 4".into())],
        ..Default::default()
    });
    let server = Server::bind(Some(&p.socket), "hold").unwrap();
    let opts = ClientOptions {
        ring_size: 64 << 10,
        ..options(&p, Transport::Shm)
    };
    (p, server, opts)
}

/// A local task that counts a tick every 5 ms while its thread is free.
fn spawn_ticker(ticks: std::rc::Rc<std::cell::Cell<u32>>) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_local(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            ticks.set(ticks.get() + 1);
        }
    })
}

/// An async call whose request waits for room in the ring waits as a
/// future: the other tasks of its thread go on meanwhile, and the call's
/// timeout covers the wait. (The proxy takes 4 requests at a time here and
/// the server app never answers, so the 64 KiB ring stays full.)
#[test]
fn async_call_waiting_for_room_leaves_the_thread_to_other_tasks() {
    let (_p, _server, opts) = holding_proxy();
    let rt = current_thread_rt();
    rt.block_on(async {
        let c = meshshm::AsyncClient::connect(opts).await.unwrap();
        let ticks = std::rc::Rc::new(std::cell::Cell::new(0u32));
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let ticker = spawn_ticker(ticks.clone());
                let t0 = Instant::now();
                let calls: Vec<_> = (0..40u64)
                    .map(|i| {
                        let c = c.clone();
                        tokio::task::spawn_local(async move {
                            let b = body(i, 8 << 10);
                            c.call("hold", "H", &b, Duration::from_millis(800)).await
                        })
                    })
                    .collect();
                let all = async {
                    let mut out = Vec::new();
                    for t in calls {
                        out.push(t.await.unwrap());
                    }
                    out
                };
                let results = tokio::time::timeout(Duration::from_secs(20), all)
                    .await
                    .expect("calls waiting for room hung");
                let took = t0.elapsed();
                ticker.abort();
                for r in &results {
                    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
                }
                // 800 ms at one tick per 5 ms: 160 if nothing held the thread.
                assert!(
                    ticks.get() >= 40,
                    "only {} ticks in {took:?}: a wait for room blocked the thread",
                    ticks.get()
                );
            })
            .await;
    });
}

/// A message larger than the ring, sent by an async call while the proxy
/// reads nothing from this app (its in-flight limit is taken by calls a
/// server holds): the rest of the message waits with the connection, not
/// on the thread — other tasks run and the call's timeout fires on time —
/// and when the proxy reads again it goes out whole, behind it the call's
/// Cancel, and the connection serves large and small calls as before.
#[test]
fn async_message_larger_than_the_ring_does_not_hold_the_thread() {
    let (_p, _server, opts) = holding_proxy();
    let rt = current_thread_rt();
    rt.block_on(async {
        let c = meshshm::AsyncClient::connect(opts).await.unwrap();
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                // The proxy stops reading this app's ring until these end
                // (it times them out itself, as the client does).
                let held: Vec<_> = (0..4u64)
                    .map(|i| {
                        let c = c.clone();
                        tokio::task::spawn_local(async move {
                            c.call("hold", "H", &body(i, 16), Duration::from_millis(1500))
                                .await
                        })
                    })
                    .collect();
                tokio::time::sleep(Duration::from_millis(100)).await;
                let ticks = std::rc::Rc::new(std::cell::Cell::new(0u32));
                let ticker = spawn_ticker(ticks.clone());
                let big = body(7, 1 << 20);
                let t0 = Instant::now();
                let r = c.call("echo", "E", &big, Duration::from_millis(300)).await;
                let took = t0.elapsed();
                ticker.abort();
                assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
                assert!(
                    took < Duration::from_millis(1000),
                    "a 300 ms timeout fired after {took:?}: the send held the thread"
                );
                // 300 ms at one tick per 5 ms: 60 if nothing held the thread.
                assert!(
                    ticks.get() >= 20,
                    "only {} ticks in {took:?}: the send held the thread",
                    ticks.get()
                );
                for h in held {
                    let r = h.await.unwrap();
                    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
                }
                for i in 0..4u64 {
                    let b = body(10 + i, (1 << 20) + 12_345 * i as usize);
                    assert_eq!(c.call("echo", "E", &b, T).await.unwrap(), b);
                    let b = body(20 + i, 100);
                    assert_eq!(c.call("echo", "E", &b, T).await.unwrap(), b);
                }
            })
            .await;
    });
}

/// The blocking API on an async client's connection, called from inside
/// the runtime's only thread (which its reader task needs): the caller
/// reads its answer itself instead of waiting forever for the task.
#[test]
fn blocking_call_on_the_async_clients_runtime_thread_completes() {
    let p = Proxy::start();
    for transport in [Transport::Shm, Transport::Tcp(p.tcp)] {
        let opts = options(&p, transport);
        let rt = current_thread_rt();
        rt.block_on(async {
            let c = meshshm::AsyncClient::connect(opts).await.unwrap();
            for i in 0..20u64 {
                let b = body(i, 100 + i as usize * 700);
                assert_eq!(c.blocking().call("echo", "E", &b, T).unwrap(), b);
                assert_eq!(c.call("echo", "E", &b, T).await.unwrap(), b);
            }
        });
    }
}

/// Await every task (each panics on a wrong answer) within `T`.
async fn join_within(tasks: Vec<tokio::task::JoinHandle<()>>, what: &str) {
    let all = async {
        for t in tasks {
            t.await.unwrap();
        }
    };
    if tokio::time::timeout(T, all).await.is_err() {
        panic!("{what} hung");
    }
}

/// Options for a client of `p` over `transport`.
fn options(p: &Proxy, transport: Transport) -> ClientOptions {
    ClientOptions {
        socket: Some(p.socket.clone()),
        transport,
        ..Default::default()
    }
}

fn current_thread_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn serve(p: &Proxy, service: &str, cmd: &[&str]) -> KillOnDrop {
    p.serve_cli(service, cmd)
}

#[test]
fn server_app_over_shm_answers_other_apps() {
    let p = Proxy::start();
    let _srv = serve(&p, "upper", &["--", "tr", "a-z", "A-Z"]);
    let c = p.client();
    assert_eq!(
        c.call("upper", "Shout", b"hello mesh", T).unwrap(),
        b"HELLO MESH"
    );
    // Over TCP too, and from several threads.
    let tcp = p.tcp_client();
    std::thread::scope(|s| {
        for i in 0..4 {
            let (c, tcp) = (c.clone(), tcp.clone());
            s.spawn(move || {
                let msg = format!("caller {i}");
                assert_eq!(
                    c.call("upper", "S", msg.as_bytes(), T).unwrap(),
                    msg.to_uppercase().as_bytes()
                );
                assert_eq!(
                    tcp.call("upper", "S", msg.as_bytes(), T).unwrap(),
                    msg.to_uppercase().as_bytes()
                );
            });
        }
    });
}

#[test]
fn server_in_process_sees_metadata_and_replies_out_of_order() {
    let p = Proxy::start();
    let server = Server::bind(Some(&p.socket), "svc").unwrap();
    let c = p.client();
    let caller = {
        let c = c.clone();
        std::thread::spawn(move || {
            std::thread::scope(|s| {
                let hs: Vec<_> = (0..4)
                    .map(|i| {
                        let c = c.clone();
                        s.spawn(move || {
                            let n = format!("{i}");
                            let h: &[(&str, &[u8])] = &[("n", n.as_bytes())];
                            let body = format!("req{i}");
                            c.invoke(&Call {
                                headers: h,
                                timeout: Some(T),
                                ..Call::new("svc", "Get", body.as_bytes())
                            })
                            .unwrap()
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            })
        })
    };
    // Collect all four, then answer in reverse order.
    let mut reqs = Vec::new();
    while reqs.len() < 4 {
        if let Some(r) = server.next(Some(T)).unwrap() {
            assert_eq!(r.service, "svc");
            assert_eq!(r.method, "Get");
            assert!(r.deadline.is_some());
            reqs.push(r);
        }
    }
    for r in reqs.iter().rev() {
        let n = r
            .headers
            .iter()
            .find(|(k, _)| k == "n")
            .map(|(_, v)| v.clone())
            .unwrap();
        let mut out = r.body.clone();
        out.extend_from_slice(b":");
        out.extend_from_slice(&n);
        server.reply(r.id, 0, &out).unwrap();
    }
    let resps = caller.join().unwrap();
    for (i, r) in resps.iter().enumerate() {
        assert_eq!(r.body, format!("req{i}:{i}").as_bytes());
    }
    // A server error status reaches the caller.
    let c2 = c.clone();
    let h = std::thread::spawn(move || c2.call("svc", "Fail", b"", T));
    let r = loop {
        if let Some(r) = server.next(Some(T)).unwrap() {
            break r;
        }
    };
    server
        .reply_with(r.id, meshshm::status::PERMISSION_DENIED, "no", &[], b"")
        .unwrap();
    match h.join().unwrap() {
        Err(Error::Status { code, message }) => {
            assert_eq!(code, meshshm::status::PERMISSION_DENIED);
            assert_eq!(message, "no");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn timeout_fails_the_call_and_cancels() {
    let p = Proxy::start();
    let server = Server::bind(Some(&p.socket), "slow").unwrap();
    let c = p.client();
    let t0 = Instant::now();
    match c.call("slow", "Never", b"x", Duration::from_millis(200)) {
        Err(Error::Timeout(_)) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(200),
        "returned early: {took:?}"
    );
    // The server did get the request, with the deadline.
    let r = server
        .next(Some(T))
        .unwrap()
        .expect("request reached the server");
    assert!(r.deadline.is_some());
    // The server hears that its caller gave up (the proxy's Cancel).
    assert!(
        eventually(T, || server.is_cancelled(r.id).unwrap()),
        "the cancel did not reach the server app"
    );
    // A late reply is dropped quietly; the client goes on working.
    server.reply(r.id, 0, b"late").unwrap();
    assert_eq!(c.call("echo", "E", b"after", T).unwrap(), b"after");
    // A request whose caller still waits is not cancelled, until answered.
    let waiting = std::thread::spawn({
        let c = p.client();
        move || c.call("slow", "Soon", b"y", T)
    });
    let r = server.next(Some(T)).unwrap().expect("second request");
    std::thread::sleep(Duration::from_millis(50));
    assert!(!server.is_cancelled(r.id).unwrap());
    server.reply(r.id, 0, b"answer").unwrap();
    assert!(server.is_cancelled(r.id).unwrap(), "answered: nobody waits");
    assert_eq!(waiting.join().unwrap().unwrap(), b"answer");
}

#[test]
fn proxy_to_proxy_chain() {
    // app -> proxy A (shm) -> proxy B (TCP) -> server app (shm)
    let b = Proxy::start();
    let _srv = serve(&b, "inventory", &["--", "tr", "a-z", "A-Z"]);
    let a = Proxy::start_with(ProxyOpts {
        routes: vec![("inventory".into(), format!("proxy:{}", b.tcp))],
        ..Default::default()
    });
    let c = a.client();
    assert_eq!(
        c.call("inventory", "Count", b"apples", T).unwrap(),
        b"APPLES"
    );
    // Many in flight through the pooled proxy-to-proxy connections.
    std::thread::scope(|s| {
        for i in 0..6 {
            let c = c.clone();
            s.spawn(move || {
                for j in 0..30 {
                    let m = format!("item-{i}-{j}");
                    assert_eq!(
                        c.call("inventory", "C", m.as_bytes(), T).unwrap(),
                        m.to_uppercase().as_bytes()
                    );
                }
            });
        }
    });
    // Large bodies cross both hops.
    let big: Vec<u8> = body(9, 3 << 20).iter().map(|b| b'a' + b % 26).collect();
    let up: Vec<u8> = big.iter().map(|b| b.to_ascii_uppercase()).collect();
    assert!(c.call("inventory", "Big", &big, T).unwrap() == up);
    // A service B does not have: the error comes back through A.
    let a2 = Proxy::start_with(ProxyOpts {
        routes: vec![("ghost".into(), format!("proxy:{}", b.tcp))],
        ..Default::default()
    });
    match a2.client().call("ghost", "X", b"", T) {
        Err(Error::Status { code, .. }) => assert_eq!(code, meshshm::status::NOT_FOUND),
        other => panic!("{other:?}"),
    }
}

#[test]
fn proxy_killed_under_load_then_clients_reconnect() {
    let mut p = Proxy::start_with(ProxyOpts {
        args: vec!["--backing".into(), "/dev/shm".into()],
        ..Default::default()
    });
    let first_pid = p.pid();
    let socket = p.socket.clone();
    let server = Server::bind(Some(&socket), "hang").unwrap();
    let c = p.client();
    // Calls in flight that the proxy will never answer (the server holds them).
    let hs: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let r = c.call("hang", "Wait", b"x", Duration::from_secs(30));
                (r, t0.elapsed())
            })
        })
        .collect();
    let mut got = 0;
    while got < 4 {
        if server.next(Some(T)).unwrap().is_some() {
            got += 1;
        }
    }
    let killed = Instant::now();
    p.kill9();
    for h in hs {
        let (r, _) = h.join().unwrap();
        assert!(
            matches!(r, Err(Error::ProxyGone(_))),
            "expected ProxyGone, got {r:?}"
        );
    }
    let failed_after = killed.elapsed();
    assert!(
        failed_after < Duration::from_secs(2),
        "calls took {failed_after:?} to fail"
    );
    // The server notices too.
    assert!(matches!(server.next(Some(T)), Err(Error::ProxyGone(_))));
    // While the proxy is down calls fail fast.
    assert!(c.call("echo", "E", b"x", T).is_err());
    // A new proxy on the same socket: the same Client reconnects by itself.
    let p2 = Proxy::start_with(ProxyOpts {
        socket: Some(socket.clone()),
        ..Default::default()
    });
    assert!(
        eventually(T, || c
            .call("echo", "E", b"back", T)
            .map(|r| r == b"back")
            .unwrap_or(false)),
        "client did not reconnect"
    );
    drop(p2);
    // Killed with SIGKILL, the proxy left no named segment behind.
    assert!(
        shm_leftovers_of(first_pid).is_empty(),
        "{:?}",
        shm_leftovers_of(first_pid)
    );
}

#[test]
fn killed_client_frees_its_session_and_others_go_on() {
    let p = Proxy::start_with(ProxyOpts {
        args: vec!["--backing".into(), "/dev/shm".into()],
        ..Default::default()
    });
    let steady = p.client();
    let mut victim = Command::new(bin("meshshm-loadgen"))
        .arg("--socket")
        .arg(&p.socket)
        .args([
            "--threads",
            "3",
            "--secs",
            "30",
            "--sizes",
            "64,200000,3000000",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    assert!(eventually(T, || p
        .log_text()
        .matches("shm session up")
        .count()
        >= 2));
    std::thread::sleep(Duration::from_millis(300));
    victim.kill().unwrap();
    victim.wait().unwrap();
    assert!(
        eventually(T, || p.log_text().contains("app closed the control socket")),
        "proxy did not notice the dead client:\n{}",
        p.log_text()
    );
    for i in 0..200 {
        let b = body(i, 3000);
        assert_eq!(steady.call("echo", "E", &b, T).unwrap(), b);
    }
    // Named segments were unlinked right after the handshake.
    assert!(
        shm_leftovers_of(p.pid()).is_empty(),
        "{:?}",
        shm_leftovers_of(p.pid())
    );
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let mut p = Proxy::start();
    let c = p.client();
    assert_eq!(c.call("echo", "E", b"x", T).unwrap(), b"x");
    assert!(p.terminate(), "proxy did not exit cleanly on SIGTERM");
    assert!(!p.socket.exists(), "socket file left behind");
    assert!(c
        .call("echo", "E", b"x", Duration::from_millis(500))
        .is_err());
}

#[test]
fn default_socket_path_rule_is_shared_by_proxy_and_cli() {
    // No --socket anywhere: both sides derive $XDG_RUNTIME_DIR/meshshm/proxy.sock.
    let dir = meshshm_tests::TempDir::new("xdg");
    let mut proxy = Command::new(bin("meshshm-proxy"))
        .args(["--tcp", "off"])
        .env("XDG_RUNTIME_DIR", &dir.0)
        .env_remove("MESHSHM_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sock = dir.0.join("meshshm/proxy.sock");
    assert!(
        eventually(T, || sock.exists()),
        "proxy did not create {}",
        sock.display()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.0.join("meshshm"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    let out = Command::new(bin("meshshm"))
        .args(["call", "echo", "E", "--data", "via default path"])
        .env("XDG_RUNTIME_DIR", &dir.0)
        .env_remove("MESHSHM_SOCKET")
        .output()
        .unwrap();
    // $MESHSHM_SOCKET wins over the rest.
    let out2 = Command::new(bin("meshshm"))
        .args(["call", "echo", "E", "--data", "via env"])
        .env("MESHSHM_SOCKET", &sock)
        .env("XDG_RUNTIME_DIR", "/nonexistent")
        .output()
        .unwrap();
    meshshm_tests::signal(proxy.id() as i32, 15);
    let _ = proxy.wait();
    assert_eq!(
        out.stdout,
        b"via default path",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out2.stdout,
        b"via env",
        "{}",
        String::from_utf8_lossy(&out2.stderr)
    );
}

#[test]
fn server_shutdown_wakes_a_blocked_next() {
    let p = Proxy::start();
    let server = Arc::new(Server::bind(Some(&p.socket), "quiet").unwrap());
    let s2 = server.clone();
    let h = std::thread::spawn(move || s2.next(None));
    std::thread::sleep(Duration::from_millis(100));
    server.shutdown();
    assert!(matches!(h.join().unwrap(), Err(Error::Closed)));
}

#[test]
fn proxy_deadline_and_client_timeout_are_the_same_error() {
    let p = Proxy::start();
    let _server = Server::bind(Some(&p.socket), "mute").unwrap();
    // The proxy's timer (deadline in the request) and the client's fire
    // close together; either way the caller sees Error::Timeout.
    for _ in 0..3 {
        match p.client().call("mute", "X", b"", Duration::from_millis(50)) {
            Err(Error::Timeout(_)) => {}
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
}
