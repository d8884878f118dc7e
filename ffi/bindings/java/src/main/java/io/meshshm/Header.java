package io.meshshm;

import java.nio.charset.StandardCharsets;

/**
 * A request header: a name (non-empty, without NUL) and a value of bytes.
 *
 * @param name the name (case-sensitive)
 * @param value the value's bytes
 */
public record Header(String name, byte[] value) {
    /** A header with a UTF-8 text value. */
    public Header(String name, String value) {
        this(name, value.getBytes(StandardCharsets.UTF_8));
    }

    /** The value as UTF-8 text. */
    public String text() {
        return new String(value, StandardCharsets.UTF_8);
    }
}
