package io.meshshm;

/** The status codes a service answers with. */
public final class Status {
    private Status() {}

    public static final int OK = 0;
    public static final int CANCELLED = 1;
    public static final int UNKNOWN = 2;
    public static final int INVALID_ARGUMENT = 3;
    public static final int DEADLINE_EXCEEDED = 4;
    public static final int NOT_FOUND = 5;
    public static final int PERMISSION_DENIED = 7;
    public static final int RESOURCE_EXHAUSTED = 8;
    public static final int INTERNAL = 13;
    public static final int UNAVAILABLE = 14;

    /** A name for a status ("not found", ...). */
    public static String name(int status) {
        return Native.meshshm_status_name(status).getString(0, "UTF-8");
    }
}
