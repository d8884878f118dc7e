package io.meshshm;

import java.time.Duration;
import java.util.Arrays;

/** Median round trip of a 1 KiB echo call from Java: {@code java -cp ... io.meshshm.Latency SOCKET [CALLS]}. */
public final class Latency {
    public static void main(String[] args) {
        int calls = args.length > 1 ? Integer.parseInt(args[1]) : 2000;
        byte[] body = new byte[1024];
        Arrays.fill(body, (byte) 'x');
        try (Client c = Client.connect(args[0])) {
            for (int i = 0; i < Math.max(calls, 2000); i++) { // warm-up (and JIT)
                c.call("echo", "Echo", body, Duration.ofSeconds(5));
            }
            double[] t = new double[calls];
            for (int i = 0; i < calls; i++) {
                long t0 = System.nanoTime();
                c.call("echo", "Echo", body, Duration.ofSeconds(5));
                t[i] = (System.nanoTime() - t0) / 1000.0;
            }
            Arrays.sort(t);
            System.out.printf("java: %d calls of 1024 B: median %.1f us, p99 %.1f us%n",
                    calls, t[calls / 2], t[calls * 99 / 100]);
        }
    }
}
