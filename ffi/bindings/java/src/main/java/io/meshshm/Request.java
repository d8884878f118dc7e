package io.meshshm;

import java.time.Duration;

/**
 * A request delivered to a {@link Server}.
 *
 * @param id answer with this id
 * @param service the service called
 * @param method the method called
 * @param body the body
 * @param timeout time left for the answer at delivery ({@code null}: the caller set no deadline)
 * @param priority 0 = low, 1 = normal, 2+ = high
 */
public record Request(long id, String service, String method, byte[] body, Duration timeout, int priority) {}
