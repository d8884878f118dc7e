package io.meshshm;

import com.sun.jna.Pointer;
import com.sun.jna.ptr.PointerByReference;
import java.nio.file.Path;
import java.time.Duration;
import java.util.function.Function;

/**
 * Registered with the proxy as the handler of one service.
 *
 * <p>{@link #next} is for one thread at a time; {@link #reply} may be called from any thread.
 *
 * <pre>{@code
 * try (Server server = Server.bind(null, "greeter")) {
 *     server.serve(req -> Reply.ok(("hello, " + new String(req.body())).getBytes()));
 * }
 * }</pre>
 */
public final class Server implements AutoCloseable {
    private static final int SLICE_MS = 200;

    private final Guard guard;
    private final String service;
    private volatile boolean stopped;

    private Server(Pointer ptr, String service) {
        this.guard = new Guard(ptr, Native::meshshm_server_close, "server");
        this.service = service;
    }

    /** Register as {@code service} with the proxy at {@code socketPath} ({@code null}: the default). */
    public static Server bind(String socketPath, String service) {
        PointerByReference out = new PointerByReference();
        Native.check(Native.meshshm_server_bind(Native.cstr(socketPath), Native.cstr(service), out));
        return new Server(out.getValue(), service);
    }

    /** Register as {@code service} with the proxy at {@code socketPath}. */
    public static Server bind(Path socketPath, String service) {
        return bind(socketPath.toString(), service);
    }

    /** The service this server answers for. */
    public String service() {
        return service;
    }

    /**
     * The next request, or {@code null} when {@code timeout} passes first ({@code null} timeout:
     * wait until a request comes or the server is stopped or closed).
     *
     * @throws MeshshmException.ProxyGone the proxy went away
     */
    public Request next(Duration timeout) {
        long deadline = timeout == null ? Long.MAX_VALUE : System.nanoTime() + timeout.toNanos();
        Native.Request req = new Native.Request();
        Native.Headers headers = new Native.Headers();
        while (!stopped) {
            long leftMs = timeout == null ? SLICE_MS : (deadline - System.nanoTime()) / 1_000_000;
            int slice = (int) Math.max(0, Math.min(SLICE_MS, leftMs));
            Pointer s;
            try {
                s = guard.enter();
            } catch (MeshshmException.Closed e) {
                return null;
            }
            int rc;
            try {
                rc = Native.meshshm_server_next_with_headers(s, req, headers, slice);
            } finally {
                guard.exit();
            }
            if (rc == MeshshmException.ERR_TIMEOUT) {
                if (timeout != null && System.nanoTime() >= deadline) {
                    return null;
                }
                continue;
            }
            Native.check(rc);
            try {
                return new Request(
                        req.id,
                        Native.str(req.service),
                        Native.str(req.method),
                        req.body.bytes(),
                        req.timeout_ms == 0 ? null : Duration.ofMillis(Integer.toUnsignedLong(req.timeout_ms)),
                        req.priority & 0xff,
                        headers.len == 0 ? java.util.List.of() : headers.toList());
            } finally {
                Native.meshshm_request_free(req);
                Native.meshshm_headers_free(headers);
            }
        }
        return null;
    }

    /** Answer request {@code id}. */
    public void reply(long id, int status, byte[] body, String message) {
        byte[] b = body == null ? new byte[0] : body;
        byte[] msg = Native.cstr(message);
        Pointer s = guard.enter();
        try {
            Native.check(Native.meshshm_server_reply_message(s, id, status, msg, b, b.length));
        } finally {
            guard.exit();
        }
    }

    /**
     * Whether no one waits for the answer to request {@code id} any more: its caller timed out or
     * went away (the proxy sent a cancel), or it was answered already. A long handler can check now
     * and then and give up; a reply to such a request is dropped. Never waits; any thread.
     */
    public boolean isCancelled(long id) {
        Pointer s = guard.enter();
        try {
            return Native.check(Native.meshshm_server_is_cancelled(s, id)) == 1;
        } finally {
            guard.exit();
        }
    }

    /** {@link #isCancelled(long)} of {@code req}. */
    public boolean isCancelled(Request req) {
        return isCancelled(req.id());
    }

    /** Answer {@code req} with {@code reply}. */
    public void reply(Request req, Reply reply) {
        reply(req.id(), reply.status(), reply.body(), reply.message());
    }

    /**
     * Answer requests with {@code handler} until {@link #stop()} or {@link #close()}. A handler
     * that throws answers status 13 (internal) with the exception's text.
     */
    public void serve(Function<Request, Reply> handler) {
        while (!stopped) {
            Request req = next(null);
            if (req == null) {
                continue;
            }
            Reply r;
            try {
                r = handler.apply(req);
            } catch (RuntimeException e) {
                r = Reply.error(Status.INTERNAL, e.toString());
            }
            reply(req, r);
        }
    }

    /** Run {@link #serve} on a daemon thread. */
    public Thread serveInBackground(Function<Request, Reply> handler) {
        Thread t = new Thread(() -> serve(handler), "meshshm-server-" + service);
        t.setDaemon(true);
        t.start();
        return t;
    }

    /** Make {@link #serve} and waiting {@link #next} calls return (within 0.2 s). */
    public void stop() {
        stopped = true;
    }

    /** Stop serving and unregister. */
    @Override
    public void close() {
        stopped = true;
        guard.close();
    }
}
