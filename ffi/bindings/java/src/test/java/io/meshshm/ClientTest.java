package io.meshshm;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Random;
import java.util.concurrent.CancellationException;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;
import org.junit.jupiter.api.io.TempDir;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

@Timeout(value = 120, unit = TimeUnit.SECONDS)
class ClientTest {
    static TestProxy proxy;
    static Client client;

    @BeforeAll
    static void start() throws Exception {
        proxy = new TestProxy();
        client = Client.connect(proxy.socket);
    }

    @AfterAll
    static void stop() throws Exception {
        if (client != null) {
            client.close();
        }
        if (proxy != null) {
            proxy.close();
        }
    }

    static byte[] utf8(String s) {
        return s.getBytes(StandardCharsets.UTF_8);
    }

    @ParameterizedTest
    @ValueSource(ints = {0, 1, 1024, 65536, 1 << 20, 5 << 20})
    void echoRoundTrip(int size) {
        byte[] body = new byte[size];
        new Random(size).nextBytes(body);
        assertArrayEquals(body, client.call("echo", "Echo", body, Duration.ofSeconds(10)));
    }

    @Test
    void unknownServiceIsAStatusError() {
        MeshshmException.Status e = assertThrows(
                MeshshmException.Status.class, () -> client.call("no-such-service", "Get", utf8("x")));
        assertEquals(Status.NOT_FOUND, e.status());
        assertEquals("not found", Status.name(e.status()));
    }

    @Test
    void timeoutAgainstASilentJavaServer() {
        try (Server silent = Server.bind(proxy.socket, "java-silent")) {
            assertThrows(MeshshmException.Timeout.class,
                    () -> client.call("java-silent", "Wait", utf8("x"), Duration.ofMillis(200)));
        }
    }

    @Test
    void proxyNotRunning(@TempDir Path dir) {
        MeshshmException.ConnectFailed e = assertThrows(
                MeshshmException.ConnectFailed.class, () -> Client.connect(dir.resolve("nobody.sock")));
        assertTrue(e.getMessage().contains("nobody.sock"), e.getMessage());
        assertThrows(MeshshmException.ConnectFailed.class, () -> Server.bind(dir.resolve("nobody.sock"), "svc"));
    }

    @Test
    void concurrentCallsFromThreads() throws Exception {
        ExecutorService pool = Executors.newFixedThreadPool(8);
        try {
            List<Future<?>> jobs = new ArrayList<>();
            for (int t = 0; t < 8; t++) {
                int thread = t;
                jobs.add(pool.submit(() -> {
                    for (int i = 0; i < 200; i++) {
                        byte[] body = utf8("thread " + thread + " call " + i);
                        assertArrayEquals(body, client.call("echo", "Echo", body));
                    }
                }));
            }
            for (Future<?> j : jobs) {
                j.get(60, TimeUnit.SECONDS);
            }
        } finally {
            pool.shutdownNow();
        }
    }

    @Test
    void asyncCalls() throws Exception {
        List<CompletableFuture<byte[]>> futs = new ArrayList<>();
        for (int i = 0; i < 100; i++) {
            futs.add(client.callAsync("echo", "Echo", utf8("async " + i), Duration.ofSeconds(10)));
        }
        for (int i = 0; i < 100; i++) {
            assertArrayEquals(utf8("async " + i), futs.get(i).get(30, TimeUnit.SECONDS));
        }
        ExecutionException e = assertThrows(ExecutionException.class,
                () -> client.callAsync("nowhere", "X", null, Duration.ofSeconds(5)).get(30, TimeUnit.SECONDS));
        assertTrue(e.getCause() instanceof MeshshmException.Status);
        try (Server silent = Server.bind(proxy.socket, "java-silent-async")) {
            CompletableFuture<byte[]> f = client.callAsync("java-silent-async", "Wait", null, null);
            Thread.sleep(50);
            assertTrue(f.cancel(true));
            assertThrows(CancellationException.class, f::join);
            ExecutionException t = assertThrows(ExecutionException.class,
                    () -> client.callAsync("java-silent-async", "Wait", null, Duration.ofMillis(100))
                            .get(30, TimeUnit.SECONDS));
            assertTrue(t.getCause() instanceof MeshshmException.Timeout, t.getCause().toString());
        }
    }

    @Test
    void closedClientRefusesCalls() {
        Client c = Client.connect(proxy.socket);
        c.close();
        assertTrue(c.isClosed());
        assertThrows(MeshshmException.Closed.class, () -> c.call("echo", "Echo", null));
        c.close();
    }

    @Test
    void libraryVersion() {
        assertEquals("0.1.0", Client.libraryVersion());
    }
}
