package io.meshshm;

import com.sun.jna.Memory;
import com.sun.jna.Pointer;
import com.sun.jna.ptr.LongByReference;
import com.sun.jna.ptr.PointerByReference;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Map;
import java.util.concurrent.CancellationException;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicLong;

/**
 * A connection to the meshshm sidecar proxy for outbound calls.
 *
 * <p>Thread-safe: one client is meant to be shared by every thread of the app; their calls are in
 * flight together on one shared-memory connection.
 *
 * <pre>{@code
 * try (Client client = Client.connect()) {
 *     byte[] reply = client.call("echo", "Echo", "hi".getBytes(), Duration.ofSeconds(1));
 * }
 * }</pre>
 */
public final class Client implements AutoCloseable {
    /** The timeout of calls that give none. */
    public static final Duration DEFAULT_TIMEOUT = Duration.ofSeconds(30);

    private static final int BATCH = 64;

    private static final ThreadLocal<Memory> RESPONSE = ThreadLocal.withInitial(() -> new Memory(16));

    private final Guard guard;
    private final Map<Long, CompletableFuture<byte[]>> pending = new ConcurrentHashMap<>();
    private final AtomicLong ids = new AtomicLong();
    private volatile Thread poller;

    private Client(Pointer ptr) {
        this.guard = new Guard(ptr, Native::meshshm_client_close, "client");
    }

    /**
     * Connect to the proxy's default socket ({@code $MESHSHM_SOCKET}, {@code
     * $XDG_RUNTIME_DIR/meshshm/proxy.sock} or {@code /tmp/meshshm-<uid>/proxy.sock}).
     *
     * @throws MeshshmException.ConnectFailed the proxy is not running
     */
    public static Client connect() {
        return connect((String) null);
    }

    /** Connect to the proxy at {@code socketPath}. */
    public static Client connect(Path socketPath) {
        return connect(socketPath.toString());
    }

    /** Connect to the proxy at {@code socketPath} ({@code null}: the default). */
    public static Client connect(String socketPath) {
        PointerByReference out = new PointerByReference();
        Native.check(Native.meshshm_client_connect(Native.cstr(socketPath), out));
        return new Client(out.getValue());
    }

    /** {@link #call(String, String, byte[], Duration)} with {@link #DEFAULT_TIMEOUT}. */
    public byte[] call(String service, String method, byte[] body) {
        return call(service, method, body, DEFAULT_TIMEOUT);
    }

    /**
     * Call {@code service}/{@code method} with {@code body} and wait for the response body.
     *
     * @param timeout how long to wait ({@code null}: no limit)
     * @throws MeshshmException.Status the service answered with an error status
     * @throws MeshshmException.Timeout no answer in time (the call is cancelled)
     * @throws MeshshmException.ProxyGone the proxy went away
     */
    public byte[] call(String service, String method, byte[] body, Duration timeout) {
        byte[] svc = Native.cstr(service);
        byte[] m = Native.cstr(method);
        byte[] b = body == null ? new byte[0] : body;
        // A meshshm_buffer { uint8_t *data; size_t len; } per thread, read by hand:
        // cheaper than a JNA Structure (no reflection on the hot path).
        Memory resp = RESPONSE.get();
        Pointer c = guard.enter();
        try {
            Native.check(Native.meshshm_client_call(c, svc, m, b, b.length, millis(timeout), resp));
        } finally {
            guard.exit();
        }
        try {
            long len = resp.getLong(8);
            return len == 0 ? new byte[0] : resp.getPointer(0).getByteArray(0, Math.toIntExact(len));
        } finally {
            Native.meshshm_buffer_free(resp);
        }
    }

    /**
     * Call {@code service}/{@code method} with {@code body}, the headers, priority and timeout of
     * {@code options} ({@code null}: the defaults), and wait for the response body. Throws as
     * {@link #call(String, String, byte[], Duration)}. (Not an overload of {@code call}, so that
     * {@code call(s, m, b, null)} keeps meaning "no timeout".)
     */
    public byte[] callWith(String service, String method, byte[] body, CallOptions options) {
        byte[] svc = Native.cstr(service);
        byte[] m = Native.cstr(method);
        byte[] b = body == null ? new byte[0] : body;
        Memory opts = (options == null ? new CallOptions() : options).toNative();
        Memory resp = RESPONSE.get();
        Pointer c = guard.enter();
        try {
            Native.check(Native.meshshm_client_call_opts(c, svc, m, b, b.length, opts, resp));
        } finally {
            guard.exit();
            java.lang.ref.Reference.reachabilityFence(opts);
        }
        try {
            long len = resp.getLong(8);
            return len == 0 ? new byte[0] : resp.getPointer(0).getByteArray(0, Math.toIntExact(len));
        } finally {
            Native.meshshm_buffer_free(resp);
        }
    }

    /**
     * Start a call without waiting; the future completes with the response body or a {@link
     * MeshshmException}. Cancelling the future cancels the call.
     */
    public CompletableFuture<byte[]> callAsync(String service, String method, byte[] body, Duration timeout) {
        return start(service, method, body, null, timeout);
    }

    /**
     * {@link #callAsync(String, String, byte[], Duration)} with the headers, priority and timeout
     * of {@code options} ({@code null}: the defaults).
     */
    public CompletableFuture<byte[]> callAsyncWith(String service, String method, byte[] body, CallOptions options) {
        return start(service, method, body, options == null ? new CallOptions() : options, null);
    }

    private CompletableFuture<byte[]> start(
            String service, String method, byte[] body, CallOptions options, Duration timeout) {
        byte[] svc = Native.cstr(service);
        byte[] m = Native.cstr(method);
        byte[] b = body == null ? new byte[0] : body;
        startPoller();
        long uid = ids.incrementAndGet();
        CompletableFuture<byte[]> fut = new CompletableFuture<>();
        pending.put(uid, fut);
        LongByReference callId = new LongByReference();
        Memory opts = options == null ? null : options.toNative();
        int ms = options == null ? millis(timeout) : 0;
        Pointer c = guard.enter();
        try {
            Native.check(opts == null
                    ? Native.meshshm_client_send(c, svc, m, b, b.length, ms, uid, callId)
                    : Native.meshshm_client_send_opts(c, svc, m, b, b.length, opts, uid, callId));
        } catch (RuntimeException e) {
            pending.remove(uid);
            throw e;
        } finally {
            guard.exit();
            java.lang.ref.Reference.reachabilityFence(opts);
        }
        long id = callId.getValue();
        fut.whenComplete((r, e) -> {
            if (e instanceof CancellationException && pending.remove(uid) != null) {
                try {
                    Pointer p = guard.enter();
                    try {
                        Native.meshshm_client_cancel(p, id);
                    } finally {
                        guard.exit();
                    }
                } catch (MeshshmException.Closed ignored) {
                    // closing cancels everything anyway
                }
            }
        });
        return fut;
    }

    private void startPoller() {
        if (poller != null) {
            return;
        }
        synchronized (this) {
            if (poller != null) {
                return;
            }
            Pointer c = guard.enter();
            try {
                Native.check(Native.meshshm_client_fd(c)); // sets up the async side; may fail to connect
            } finally {
                guard.exit();
            }
            Thread t = new Thread(this::pollLoop, "meshshm-completions");
            t.setDaemon(true);
            t.start();
            poller = t;
        }
    }

    private void pollLoop() {
        Native.Completion[] done = (Native.Completion[]) new Native.Completion().toArray(BATCH);
        while (!guard.isClosed()) {
            int n;
            Pointer c;
            try {
                c = guard.enter();
            } catch (MeshshmException.Closed e) {
                break;
            }
            try {
                n = Native.meshshm_client_poll(c, done[0].getPointer(), BATCH, 200);
            } finally {
                guard.exit();
            }
            for (int i = 0; i < n; i++) {
                Native.Completion d = done[i];
                d.read();
                try {
                    CompletableFuture<byte[]> fut = pending.remove(d.user_data);
                    if (fut == null) {
                        continue;
                    }
                    if (d.result == 0) {
                        fut.complete(d.body.bytes());
                    } else {
                        fut.completeExceptionally(MeshshmException.of(d.result, Native.str(d.error), d.status));
                    }
                } finally {
                    Native.meshshm_completion_free(d.getPointer());
                }
            }
        }
        for (CompletableFuture<byte[]> f : pending.values()) {
            f.completeExceptionally(new MeshshmException.Closed("the client is closed"));
        }
        pending.clear();
    }

    static int millis(Duration timeout) {
        if (timeout == null) {
            return 0;
        }
        if (timeout.isNegative() || timeout.isZero()) {
            throw new MeshshmException.InvalidArgument("timeout must be positive (or null for none)");
        }
        long ms = Math.max(1, timeout.toMillis());
        return (int) Math.min(ms, Integer.MAX_VALUE);
    }

    /** Whether {@link #close()} was called. */
    public boolean isClosed() {
        return guard.isClosed();
    }

    /** Close the client (waits for calls in progress on other threads to return). */
    @Override
    public void close() {
        guard.close();
        Thread t = poller;
        if (t != null) {
            try {
                t.join(2000);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }
    }

    /** The version of the loaded libmeshshm. */
    public static String libraryVersion() {
        return Native.meshshm_version().getString(0, "UTF-8");
    }
}
