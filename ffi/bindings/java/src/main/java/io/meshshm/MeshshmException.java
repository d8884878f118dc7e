package io.meshshm;

/**
 * A libmeshshm call failed. {@link #code()} is the C error code ({@code MESHSHM_ERR_*}); each code
 * has its own subclass, so callers catch what they handle:
 *
 * <pre>{@code
 * try {
 *     client.call("inventory", "Get", body);
 * } catch (MeshshmException.Status e) {          // the service answered an error status
 *     if (e.status() == Status.NOT_FOUND) ...
 * } catch (MeshshmException.Timeout e) {         // no answer in time
 * }
 * }</pre>
 */
public class MeshshmException extends RuntimeException {
    private static final long serialVersionUID = 1L;

    static final int ERR_INVALID_ARGUMENT = -1;
    static final int ERR_CONNECT = -2;
    static final int ERR_REJECTED = -3;
    static final int ERR_PROXY_GONE = -4;
    static final int ERR_TIMEOUT = -5;
    static final int ERR_STATUS = -6;
    static final int ERR_PROTOCOL = -7;
    static final int ERR_CLOSED = -8;
    static final int ERR_INTERNAL = -9;
    static final int ERR_CANCELLED = -10;
    static final int ERR_NOT_FOUND = -11;

    private final int code;

    MeshshmException(int code, String message) {
        super(message);
        this.code = code;
    }

    /** The C error code (negative). */
    public int code() {
        return code;
    }

    static MeshshmException of(int code, String message, int status) {
        switch (code) {
            case ERR_INVALID_ARGUMENT: return new InvalidArgument(message);
            case ERR_CONNECT: return new ConnectFailed(message);
            case ERR_REJECTED: return new Rejected(message);
            case ERR_PROXY_GONE: return new ProxyGone(message);
            case ERR_TIMEOUT: return new Timeout(message);
            case ERR_STATUS: return new Status(message, status);
            case ERR_PROTOCOL: return new Protocol(message);
            case ERR_CLOSED: return new Closed(message);
            case ERR_CANCELLED: return new Cancelled(message);
            default: return new MeshshmException(code, message);
        }
    }

    /** An argument was refused (e.g. a body above the maximum message size). */
    public static final class InvalidArgument extends MeshshmException {
        private static final long serialVersionUID = 1L;
        InvalidArgument(String m) { super(ERR_INVALID_ARGUMENT, m); }
    }

    /** The proxy is not running or cannot be reached. */
    public static final class ConnectFailed extends MeshshmException {
        private static final long serialVersionUID = 1L;
        ConnectFailed(String m) { super(ERR_CONNECT, m); }
    }

    /** The proxy refused the handshake. */
    public static final class Rejected extends MeshshmException {
        private static final long serialVersionUID = 1L;
        Rejected(String m) { super(ERR_REJECTED, m); }
    }

    /** The proxy went away during the call; a later call reconnects. */
    public static final class ProxyGone extends MeshshmException {
        private static final long serialVersionUID = 1L;
        ProxyGone(String m) { super(ERR_PROXY_GONE, m); }
    }

    /** No answer in time; the call was cancelled. */
    public static final class Timeout extends MeshshmException {
        private static final long serialVersionUID = 1L;
        Timeout(String m) { super(ERR_TIMEOUT, m); }
    }

    /** The service answered with a non-OK status ({@link #status()}; see {@link io.meshshm.Status}). */
    public static final class Status extends MeshshmException {
        private static final long serialVersionUID = 1L;
        private final int status;

        Status(String m, int status) {
            super(ERR_STATUS, m);
            this.status = status;
        }

        /** The status code, e.g. {@link io.meshshm.Status#NOT_FOUND}. */
        public int status() {
            return status;
        }
    }

    /** The proxy broke the protocol; the connection was closed. */
    public static final class Protocol extends MeshshmException {
        private static final long serialVersionUID = 1L;
        Protocol(String m) { super(ERR_PROTOCOL, m); }
    }

    /** The client or server is closed. */
    public static final class Closed extends MeshshmException {
        private static final long serialVersionUID = 1L;
        Closed(String m) { super(ERR_CLOSED, m); }
    }

    /** The asynchronous call was cancelled. */
    public static final class Cancelled extends MeshshmException {
        private static final long serialVersionUID = 1L;
        Cancelled(String m) { super(ERR_CANCELLED, m); }
    }
}
