package io.meshshm;

import com.sun.jna.Memory;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;

/**
 * How a call is made besides service, method and body: its timeout, priority and request headers.
 * For {@link Client#callWith(String, String, byte[], CallOptions)} and {@link
 * Client#callAsyncWith(String, String, byte[], CallOptions)}.
 *
 * <pre>{@code
 * byte[] reply = client.callWith("svc", "Get", body, new CallOptions()
 *         .timeout(Duration.ofSeconds(1))
 *         .priority(CallOptions.PRIORITY_HIGH)
 *         .header("x-trace", "abc"));
 * }</pre>
 *
 * <p>Not thread-safe while being changed; a finished instance may be shared by any number of calls.
 */
public final class CallOptions {
    /** Shed first under overload. */
    public static final int PRIORITY_LOW = 0;
    /** The default. */
    public static final int PRIORITY_NORMAL = 1;
    /** Shed last (2 and up are all high). */
    public static final int PRIORITY_HIGH = 2;

    // sizeof/offsets of meshshm_call_options and meshshm_header on 64-bit Linux.
    static final int OPTIONS_SIZE = 32;
    static final int HEADER_SIZE = 24;

    private Duration timeout = Client.DEFAULT_TIMEOUT;
    private int priority = PRIORITY_NORMAL;
    private final List<Header> headers = new ArrayList<>();

    /** Give up (and cancel the call) after {@code timeout}; {@code null}: no limit. Default 30 s. */
    public CallOptions timeout(Duration timeout) {
        Client.millis(timeout); // refuse a non-positive timeout now
        this.timeout = timeout;
        return this;
    }

    /** {@link #PRIORITY_LOW}, {@link #PRIORITY_NORMAL} (the default) or {@link #PRIORITY_HIGH} (0..255). */
    public CallOptions priority(int priority) {
        if (priority < 0 || priority > 255) {
            throw new MeshshmException.InvalidArgument("priority must be 0..255, not " + priority);
        }
        this.priority = priority;
        return this;
    }

    /** Add a header (names may repeat; order is kept). */
    public CallOptions header(String name, byte[] value) {
        if (name == null || value == null) {
            throw new MeshshmException.InvalidArgument("a header name and value must not be null");
        }
        headers.add(new Header(name, value));
        return this;
    }

    /** Add a header with a UTF-8 text value. */
    public CallOptions header(String name, String value) {
        return header(name, value == null ? null : value.getBytes(StandardCharsets.UTF_8));
    }

    public Duration timeout() {
        return timeout;
    }

    public int priority() {
        return priority;
    }

    public List<Header> headers() {
        return Collections.unmodifiableList(headers);
    }

    /**
     * The C {@code meshshm_call_options}, its header array and strings in one block of native
     * memory (keep it reachable until the C call returns).
     */
    Memory toNative() {
        int n = headers.size();
        List<byte[]> names = new ArrayList<>(n);
        long size = OPTIONS_SIZE + (long) HEADER_SIZE * n;
        for (Header h : headers) {
            byte[] name = Native.cstr(h.name());
            names.add(name);
            size += name.length + h.value().length;
        }
        Memory m = new Memory(size);
        m.clear();
        m.setLong(0, OPTIONS_SIZE); // struct_size
        m.setInt(8, Client.millis(timeout)); // timeout_ms
        m.setByte(12, (byte) priority); // priority
        m.setPointer(16, n == 0 ? null : m.share(OPTIONS_SIZE)); // headers
        m.setLong(24, n); // headers_len
        long data = OPTIONS_SIZE + (long) HEADER_SIZE * n;
        for (int i = 0; i < n; i++) {
            long at = OPTIONS_SIZE + (long) HEADER_SIZE * i;
            byte[] name = names.get(i);
            byte[] value = headers.get(i).value();
            m.write(data, name, 0, name.length);
            m.setPointer(at, m.share(data));
            data += name.length;
            if (value.length > 0) {
                m.write(data, value, 0, value.length);
                m.setPointer(at + 8, m.share(data));
                data += value.length;
            }
            m.setLong(at + 16, value.length);
        }
        return m;
    }
}
