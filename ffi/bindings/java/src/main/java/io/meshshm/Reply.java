package io.meshshm;

/**
 * What a {@link Server} handler answers.
 *
 * @param status 0 for OK, else a {@link Status} code
 * @param body the response body
 * @param message an error message for the caller ({@code null}: none)
 */
public record Reply(int status, byte[] body, String message) {
    /** An OK answer with {@code body}. */
    public static Reply ok(byte[] body) {
        return new Reply(Status.OK, body, null);
    }

    /** An error answer. */
    public static Reply error(int status, String message) {
        return new Reply(status, new byte[0], message);
    }
}
