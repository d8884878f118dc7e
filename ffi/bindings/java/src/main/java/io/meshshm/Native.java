package io.meshshm;

import com.sun.jna.NativeLibrary;
import com.sun.jna.Pointer;
import com.sun.jna.Structure;
import com.sun.jna.ptr.LongByReference;
import com.sun.jna.ptr.PointerByReference;
import java.io.File;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;

/**
 * The C functions of libmeshshm (JNA direct mapping) and the structs they use.
 *
 * <p>Where the library is looked for: {@code $MESHSHM_LIB} (the path of libmeshshm.so, or a
 * directory holding it), else the {@code jna.library.path} / {@code java.library.path} system
 * properties, else the system's library path ({@code LD_LIBRARY_PATH}, ld.so.cache).
 */
final class Native {
    private Native() {}

    static final NativeLibrary LIB = load();

    static {
        com.sun.jna.Native.register(Native.class, LIB);
    }

    private static NativeLibrary load() {
        String env = System.getenv("MESHSHM_LIB");
        List<String> tried = new ArrayList<>();
        if (env != null && !env.isEmpty()) {
            File f = new File(env);
            List<File> candidates = new ArrayList<>();
            if (f.isDirectory()) {
                candidates.add(new File(f, "libmeshshm.so.0"));
                candidates.add(new File(f, "libmeshshm.so"));
            } else {
                candidates.add(f);
            }
            for (File c : candidates) {
                if (c.exists()) {
                    return NativeLibrary.getInstance(c.getAbsolutePath());
                }
                tried.add(c.getPath());
            }
            throw new UnsatisfiedLinkError("MESHSHM_LIB=" + env + ": no libmeshshm at " + tried);
        }
        return NativeLibrary.getInstance("meshshm");
    }

    /** {@code meshshm_buffer}: {@code { uint8_t *data; size_t len; }} (64-bit size_t). */
    @Structure.FieldOrder({"data", "len"})
    public static class Buffer extends Structure {
        public Pointer data;
        public long len;

        public Buffer() {}

        Buffer(Pointer p) {
            super(p);
        }

        byte[] bytes() {
            return len == 0 ? new byte[0] : data.getByteArray(0, (int) len);
        }
    }

    /** {@code meshshm_request}. */
    @Structure.FieldOrder({"id", "service", "method", "body", "timeout_ms", "priority"})
    public static class Request extends Structure {
        public long id;
        public Pointer service;
        public Pointer method;
        public Buffer body;
        public int timeout_ms;
        public byte priority;
    }

    /** {@code meshshm_headers}: {@code { meshshm_header *data; size_t len; }}, owned by the library. */
    @Structure.FieldOrder({"data", "len"})
    public static class Headers extends Structure {
        public Pointer data;
        public long len;

        /** A copy of the headers ({@code meshshm_header}: name, value, value_len; 24 bytes each). */
        java.util.List<io.meshshm.Header> toList() {
            java.util.List<io.meshshm.Header> out = new ArrayList<>((int) len);
            for (long i = 0; i < len; i++) {
                long at = i * CallOptions.HEADER_SIZE;
                Pointer name = data.getPointer(at);
                Pointer value = data.getPointer(at + 8);
                long n = data.getLong(at + 16);
                out.add(new io.meshshm.Header(str(name), n == 0 ? new byte[0] : value.getByteArray(0, Math.toIntExact(n))));
            }
            return java.util.List.copyOf(out);
        }
    }

    /** {@code meshshm_completion}. */
    @Structure.FieldOrder({"user_data", "call_id", "result", "status", "body", "error"})
    public static class Completion extends Structure {
        public long user_data;
        public long call_id;
        public int result;
        public int status;
        public Buffer body;
        public Pointer error;
    }

    /** A NUL-terminated UTF-8 copy of {@code s}. */
    static byte[] cstr(String s) {
        if (s == null) {
            return null;
        }
        if (s.indexOf('\0') >= 0) {
            throw new MeshshmException.InvalidArgument("string contains a NUL character");
        }
        byte[] b = s.getBytes(StandardCharsets.UTF_8);
        byte[] out = new byte[b.length + 1];
        System.arraycopy(b, 0, out, 0, b.length);
        return out;
    }

    static String str(Pointer p) {
        return p == null ? "" : p.getString(0, "UTF-8");
    }

    static native Pointer meshshm_last_error();

    static native int meshshm_last_status();

    static native Pointer meshshm_strerror(int code);

    static native Pointer meshshm_status_name(int status);

    static native Pointer meshshm_version();

    static native void meshshm_buffer_free(Pointer b);

    static native int meshshm_client_connect(byte[] socketPath, PointerByReference out);

    static native int meshshm_client_call(
            Pointer c, byte[] service, byte[] method, byte[] body, long bodyLen, int timeoutMs, Pointer response);

    static native int meshshm_client_call_opts(
            Pointer c, byte[] service, byte[] method, byte[] body, long bodyLen, Pointer options, Pointer response);

    static native void meshshm_client_close(Pointer c);

    static native int meshshm_client_send(
            Pointer c,
            byte[] service,
            byte[] method,
            byte[] body,
            long bodyLen,
            int timeoutMs,
            long userData,
            LongByReference callId);

    static native int meshshm_client_send_opts(
            Pointer c,
            byte[] service,
            byte[] method,
            byte[] body,
            long bodyLen,
            Pointer options,
            long userData,
            LongByReference callId);

    static native int meshshm_client_cancel(Pointer c, long callId);

    static native int meshshm_client_fd(Pointer c);

    static native int meshshm_client_poll(Pointer c, Pointer out, long max, int timeoutMs);

    static native void meshshm_completion_free(Pointer c);

    static native int meshshm_server_bind(byte[] socketPath, byte[] service, PointerByReference out);

    static native int meshshm_server_next(Pointer s, Request req, int timeoutMs);

    static native int meshshm_server_next_with_headers(Pointer s, Request req, Headers headers, int timeoutMs);

    static native void meshshm_headers_free(Headers h);

    static native int meshshm_server_is_cancelled(Pointer s, long requestId);

    static native int meshshm_server_reply_message(
            Pointer s, long requestId, int status, byte[] message, byte[] body, long len);

    static native void meshshm_request_free(Request r);

    static native void meshshm_server_close(Pointer s);

    /** Throw the exception for a negative code (reading this thread's last error). */
    static int check(int rc) {
        if (rc < 0) {
            String msg = meshshm_last_error().getString(0, "UTF-8");
            int status = rc == MeshshmException.ERR_STATUS || rc == MeshshmException.ERR_TIMEOUT
                    ? meshshm_last_status() : 0;
            throw MeshshmException.of(rc, msg, status);
        }
        return rc;
    }
}
