package io.meshshm;

import java.time.Duration;
import java.util.List;

/**
 * A request delivered to a {@link Server}.
 *
 * @param id answer with this id
 * @param service the service called
 * @param method the method called
 * @param body the body
 * @param timeout time left for the answer at delivery ({@code null}: the caller set no deadline)
 * @param priority 0 = low, 1 = normal, 2+ = high ({@link CallOptions#PRIORITY_LOW}, ...)
 * @param headers the request headers, in order
 */
public record Request(
        long id, String service, String method, byte[] body, Duration timeout, int priority, List<Header> headers) {
    /** A request without headers. */
    public Request(long id, String service, String method, byte[] body, Duration timeout, int priority) {
        this(id, service, method, body, timeout, priority, List.of());
    }

    /** The value of the first header called {@code name} (case-sensitive), or {@code null}. */
    public byte[] header(String name) {
        for (Header h : headers) {
            if (h.name().equals(name)) {
                return h.value();
            }
        }
        return null;
    }
}
