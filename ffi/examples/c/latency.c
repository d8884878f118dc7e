/* meshshm-latency: median round trip of an echo call through the proxy.
 *
 *   meshshm-latency [-s SOCKET] [-n CALLS] [-b BYTES]    (defaults: 2000 calls of 1024 bytes)
 */
#include <meshshm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

int main(int argc, char **argv) {
    const char *socket_path = NULL;
    long calls = 2000, bytes = 1024;
    int opt;
    while ((opt = getopt(argc, argv, "s:n:b:")) != -1) {
        switch (opt) {
        case 's': socket_path = optarg; break;
        case 'n': calls = strtol(optarg, NULL, 10); break;
        case 'b': bytes = strtol(optarg, NULL, 10); break;
        default:
            fprintf(stderr, "usage: %s [-s SOCKET] [-n CALLS] [-b BYTES]\n", argv[0]);
            return 64;
        }
    }
    meshshm_client *c;
    int rc = meshshm_client_connect(socket_path, &c);
    if (rc) { fprintf(stderr, "connect: %s\n", meshshm_last_error()); return 1; }
    char *body = malloc(bytes);
    memset(body, 'x', bytes);
    double *t = malloc(sizeof(double) * calls);
    for (long i = -calls / 10; i < calls; i++) { /* the first tenth warms up */
        meshshm_buffer r;
        double t0 = now_us();
        rc = meshshm_client_call(c, "echo", "Echo", body, bytes, 5000, &r);
        double dt = now_us() - t0;
        if (rc || r.len != (size_t)bytes) { fprintf(stderr, "call: %s\n", meshshm_last_error()); return 1; }
        meshshm_buffer_free(&r);
        if (i >= 0) t[i] = dt;
    }
    qsort(t, calls, sizeof(double), cmp);
    printf("c: %ld calls of %ld B: median %.1f us, p99 %.1f us\n", calls, bytes, t[calls / 2],
           t[calls * 99 / 100]);
    meshshm_client_close(c);
    free(t);
    free(body);
    return 0;
}
