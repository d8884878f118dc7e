package io.meshshm;

import java.io.File;
import java.io.IOException;
import java.net.ServerSocket;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Comparator;
import java.util.concurrent.TimeUnit;

/** The real meshshm-proxy on a socket in a fresh temporary directory ($MESHSHM_PROXY). */
final class TestProxy implements AutoCloseable {
    final Path dir;
    final String socket;
    private final Process process;

    TestProxy() throws Exception {
        String bin = System.getenv("MESHSHM_PROXY");
        if (bin == null || bin.isEmpty()) {
            bin = repoRoot().resolve("target/debug/meshshm-proxy").toString();
        }
        if (!new File(bin).canExecute()) {
            throw new IllegalStateException("no proxy binary at " + bin + ": set MESHSHM_PROXY");
        }
        dir = Files.createTempDirectory("meshshm-java-");
        socket = dir.resolve("proxy.sock").toString();
        int port;
        try (ServerSocket s = new ServerSocket(0)) {
            port = s.getLocalPort();
        }
        process = new ProcessBuilder(bin, "--socket", socket, "--tcp", "127.0.0.1:" + port)
                .redirectErrorStream(true)
                .redirectOutput(dir.resolve("proxy.log").toFile())
                .start();
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(15);
        while (true) {
            try (Client c = Client.connect(socket)) {
                return;
            } catch (MeshshmException.ConnectFailed e) {
                if (!process.isAlive() || System.nanoTime() > deadline) {
                    String log = Files.readString(dir.resolve("proxy.log"));
                    close();
                    throw new IllegalStateException("the proxy did not come up: " + log, e);
                }
                Thread.sleep(50);
            }
        }
    }

    static Path repoRoot() {
        // ffi/bindings/java is the working directory of Maven's tests.
        return Path.of("").toAbsolutePath().getParent().getParent().getParent();
    }

    @Override
    public void close() throws IOException, InterruptedException {
        if (process.isAlive()) {
            process.destroy(); // SIGTERM: the proxy drains and exits
            if (!process.waitFor(5, TimeUnit.SECONDS)) {
                process.destroyForcibly().waitFor();
            }
        }
        try (var files = Files.walk(dir)) {
            files.sorted(Comparator.reverseOrder()).map(Path::toFile).forEach(File::delete);
        }
    }
}
