/* meshshm-server: serve a service through the meshshm sidecar.
 *
 *   meshshm-server [-s SOCKET] [-n COUNT] SERVICE
 *
 * Methods: "reverse" answers the body reversed, "upper" upper-cased (ASCII),
 * "fail" answers status 3 (invalid argument) with a message; any other
 * method answers the body unchanged. Prints "ready" on standard output once
 * registered; stops after COUNT requests (if given), on SIGINT/SIGTERM, or
 * when the proxy goes away.
 *
 * Build: cc -o meshshm-server server.c $(pkg-config --cflags --libs meshshm)
 */
#include <meshshm.h>
#include <ctype.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_signal(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv) {
    const char *socket_path = NULL;
    long count = -1;
    int opt;
    while ((opt = getopt(argc, argv, "s:n:")) != -1) {
        switch (opt) {
        case 's': socket_path = optarg; break;
        case 'n': count = strtol(optarg, NULL, 10); break;
        default: goto usage;
        }
    }
    if (argc - optind != 1) goto usage;
    const char *service = argv[optind];

    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    meshshm_server *server = NULL;
    int rc = meshshm_server_bind(socket_path, service, &server);
    if (rc != MESHSHM_OK) {
        fprintf(stderr, "meshshm-server: bind: %s: %s\n", meshshm_strerror(rc), meshshm_last_error());
        return 1;
    }
    printf("ready\n");
    fflush(stdout);

    int exit_code = 0;
    for (long served = 0; !stop && (count < 0 || served < count);) {
        meshshm_request req;
        rc = meshshm_server_next(server, &req, 100); /* wake up now and then to see `stop` */
        if (rc == MESHSHM_ERR_TIMEOUT) continue;
        if (rc != MESHSHM_OK) {
            fprintf(stderr, "meshshm-server: next: %s: %s\n", meshshm_strerror(rc), meshshm_last_error());
            exit_code = rc == MESHSHM_ERR_PROXY_GONE ? 0 : 1;
            break;
        }
        uint8_t *b = req.body.data;
        size_t n = req.body.len;
        if (strcmp(req.method, "fail") == 0) {
            rc = meshshm_server_reply_message(server, req.id, 3, "asked to fail", NULL, 0);
        } else {
            if (strcmp(req.method, "reverse") == 0) {
                for (size_t i = 0; i < n / 2; i++) {
                    uint8_t t = b[i];
                    b[i] = b[n - 1 - i];
                    b[n - 1 - i] = t;
                }
            } else if (strcmp(req.method, "upper") == 0) {
                for (size_t i = 0; i < n; i++) b[i] = (uint8_t)toupper(b[i]);
            }
            rc = meshshm_server_reply(server, req.id, 0, b, n);
        }
        meshshm_request_free(&req);
        if (rc != MESHSHM_OK) {
            fprintf(stderr, "meshshm-server: reply: %s: %s\n", meshshm_strerror(rc), meshshm_last_error());
        }
        served++;
    }
    meshshm_server_close(server);
    return exit_code;

usage:
    fprintf(stderr, "usage: %s [-s SOCKET] [-n COUNT] SERVICE\n", argv[0]);
    return 64;
}
