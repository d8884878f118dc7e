package io.meshshm;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.BufferedReader;
import java.io.File;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;

@Timeout(value = 120, unit = TimeUnit.SECONDS)
class ServerTest {
    static TestProxy proxy;

    @BeforeAll
    static void start() throws Exception {
        proxy = new TestProxy();
    }

    @AfterAll
    static void stop() throws Exception {
        if (proxy != null) {
            proxy.close();
        }
    }

    static byte[] utf8(String s) {
        return s.getBytes(StandardCharsets.UTF_8);
    }

    @Test
    void javaServerJavaClient() throws Exception {
        try (Server server = Server.bind(proxy.socket, "java-upper");
                Client client = Client.connect(proxy.socket)) {
            Thread t = server.serveInBackground(req -> switch (req.method()) {
                case "fail" -> Reply.error(Status.PERMISSION_DENIED, "not you");
                case "boom" -> throw new IllegalStateException("handler exploded");
                default -> Reply.ok(utf8("java:" + new String(req.body(), StandardCharsets.UTF_8).toUpperCase()));
            });
            assertArrayEquals(utf8("java:HELLO"), client.call("java-upper", "Up", utf8("hello")));
            MeshshmException.Status e =
                    assertThrows(MeshshmException.Status.class, () -> client.call("java-upper", "fail", null));
            assertEquals(Status.PERMISSION_DENIED, e.status());
            assertTrue(e.getMessage().contains("not you"), e.getMessage());
            e = assertThrows(MeshshmException.Status.class, () -> client.call("java-upper", "boom", null));
            assertEquals(Status.INTERNAL, e.status());
            assertTrue(e.getMessage().contains("handler exploded"), e.getMessage());
            server.stop();
            t.join(5000);
        }
    }

    @Test
    void nextTimesOutAndCarriesTheRequest() throws Exception {
        try (Server server = Server.bind(proxy.socket, "java-manual");
                Client client = Client.connect(proxy.socket)) {
            assertNull(server.next(Duration.ofMillis(50)));
            CompletableFuture<byte[]> answer =
                    CompletableFuture.supplyAsync(() -> client.call("java-manual", "M", utf8("q"), Duration.ofSeconds(5)));
            Request req = server.next(Duration.ofSeconds(5));
            assertNotNull(req);
            assertEquals("java-manual", req.service());
            assertEquals("M", req.method());
            assertArrayEquals(utf8("q"), req.body());
            assertNotNull(req.timeout());
            server.reply(req, Reply.ok(utf8("answer")));
            assertArrayEquals(utf8("answer"), answer.get(10, TimeUnit.SECONDS));
        }
    }

    /** What reached the server: "priority|name=value|..." (values as UTF-8). */
    static Reply describe(Request req) {
        StringBuilder sb = new StringBuilder().append(req.priority());
        for (Header h : req.headers()) {
            sb.append('|').append(h.name()).append('=').append(h.text());
        }
        return Reply.ok(utf8(sb.toString()));
    }

    @Test
    void headersAndPriorityReachTheServer() throws Exception {
        try (Server server = Server.bind(proxy.socket, "java-describe");
                Client client = Client.connect(proxy.socket)) {
            Thread t = server.serveInBackground(ServerTest::describe);
            CallOptions opts = new CallOptions()
                    .timeout(Duration.ofSeconds(5))
                    .priority(CallOptions.PRIORITY_HIGH)
                    .header("x-trace", "abc")
                    .header("x-bin", new byte[] {'a', 0, 'b'});
            assertArrayEquals(utf8("2|x-trace=abc|x-bin=a\0b"), client.callWith("java-describe", "M", utf8("x"), opts));
            assertArrayEquals(utf8("1"), client.call("java-describe", "M", null)); // plain call: normal
            assertArrayEquals(utf8("1"), client.callWith("java-describe", "M", null, null)); // defaults
            byte[] low = client.callAsyncWith("java-describe", "M", null,
                            new CallOptions().priority(CallOptions.PRIORITY_LOW).header("k", ""))
                    .get(10, TimeUnit.SECONDS);
            assertArrayEquals(utf8("0|k="), low);
            assertThrows(MeshshmException.InvalidArgument.class,
                    () -> client.callWith("java-describe", "M", null, new CallOptions().header("", "v")));
            assertThrows(MeshshmException.InvalidArgument.class, () -> new CallOptions().priority(256));
            server.stop();
            t.join(5000);
        }
    }

    @Test
    void requestHeaderAccessor() throws Exception {
        try (Server server = Server.bind(proxy.socket, "java-hdr");
                Client client = Client.connect(proxy.socket)) {
            CompletableFuture<byte[]> answer = client.callAsyncWith("java-hdr", "M", null,
                    new CallOptions().header("a", "1").header("a", "2"));
            Request req = server.next(Duration.ofSeconds(5));
            assertNotNull(req);
            assertEquals(2, req.headers().size());
            assertArrayEquals(utf8("1"), req.header("a"));
            assertNull(req.header("b"));
            assertEquals(CallOptions.PRIORITY_NORMAL, req.priority());
            server.reply(req, Reply.ok(utf8("ok")));
            assertArrayEquals(utf8("ok"), answer.get(10, TimeUnit.SECONDS));
        }
    }

    @Test
    void isCancelledAfterTheCallerTimesOut() throws Exception {
        try (Server server = Server.bind(proxy.socket, "java-hold");
                Client client = Client.connect(proxy.socket)) {
            assertTrue(server.isCancelled(987654321L)); // never handed out
            CompletableFuture<byte[]> slow = client.callAsync("java-hold", "Slow", null, Duration.ofSeconds(1));
            Request req = server.next(Duration.ofSeconds(5));
            assertNotNull(req);
            assertFalse(server.isCancelled(req)); // the caller still waits
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
            while (!server.isCancelled(req) && System.nanoTime() < deadline) {
                Thread.sleep(20);
            }
            assertTrue(server.isCancelled(req.id()));
            ExecutionException e = assertThrows(ExecutionException.class, () -> slow.get(10, TimeUnit.SECONDS));
            assertInstanceOf(MeshshmException.Timeout.class, e.getCause());
            server.reply(req, Reply.ok(utf8("late"))); // dropped, not an error

            CompletableFuture<byte[]> fast = client.callAsync("java-hold", "Fast", null, Duration.ofSeconds(5));
            Request r2 = server.next(Duration.ofSeconds(5));
            assertNotNull(r2);
            assertFalse(server.isCancelled(r2));
            server.reply(r2, Reply.ok(utf8("ok")));
            assertTrue(server.isCancelled(r2)); // answered
            assertArrayEquals(utf8("ok"), fast.get(10, TimeUnit.SECONDS));
        }
    }

    /** Cross-language: a Java client calls the C example server (ffi/examples/c/server.c). */
    @Test
    void javaClientCServer() throws Exception {
        String bin = cServer();
        Process p = new ProcessBuilder(bin, "-s", proxy.socket, "c-reverse")
                .redirectError(ProcessBuilder.Redirect.INHERIT)
                .start();
        try (BufferedReader out = new BufferedReader(new InputStreamReader(p.getInputStream(), StandardCharsets.UTF_8))) {
            assertEquals("ready", out.readLine());
            try (Client client = Client.connect(proxy.socket)) {
                assertArrayEquals(utf8("avaj morf"), client.call("c-reverse", "reverse", utf8("from java")));
                assertArrayEquals(utf8("SHOUT"), client.call("c-reverse", "upper", utf8("shout")));
                byte[] big = new byte[2 << 20];
                for (int i = 0; i < big.length; i++) {
                    big[i] = (byte) i;
                }
                assertArrayEquals(big, client.call("c-reverse", "echo", big, Duration.ofSeconds(20)));
                MeshshmException.Status e =
                        assertThrows(MeshshmException.Status.class, () -> client.call("c-reverse", "fail", null));
                assertEquals(Status.INVALID_ARGUMENT, e.status());
                assertTrue(e.getMessage().contains("asked to fail"), e.getMessage());
            }
        } finally {
            p.destroy();
            if (!p.waitFor(5, TimeUnit.SECONDS)) {
                p.destroyForcibly().waitFor();
            }
        }
    }

    /** The C example server: $MESHSHM_C_SERVER, or built here with cc. */
    static String cServer() throws Exception {
        String env = System.getenv("MESHSHM_C_SERVER");
        if (env != null && !env.isEmpty()) {
            return env;
        }
        Path ffi = TestProxy.repoRoot().resolve("ffi");
        String lib = System.getenv("MESHSHM_LIB");
        String libdir = lib == null ? TestProxy.repoRoot().resolve("target/debug").toString()
                : new File(lib).isDirectory() ? lib : new File(lib).getParent();
        Path dir = Files.createTempDirectory("meshshm-java-c");
        Path out = dir.resolve("meshshm-server");
        dir.toFile().deleteOnExit(); // runs after the file's (reverse order)
        out.toFile().deleteOnExit();
        Process cc = new ProcessBuilder("cc", "-o", out.toString(), ffi.resolve("examples/c/server.c").toString(),
                        "-I" + ffi.resolve("include"), "-L" + libdir, "-lmeshshm", "-Wl,-rpath," + libdir)
                .inheritIO()
                .start();
        assertEquals(0, cc.waitFor(), "building the C example server");
        return out.toString();
    }
}
