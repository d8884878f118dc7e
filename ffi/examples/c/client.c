/* meshshm-client: call a service through the meshshm sidecar and print the answer.
 *
 *   meshshm-client [-s SOCKET] [-t TIMEOUT_MS] SERVICE METHOD [BODY]
 *
 * BODY defaults to the empty body; "-" reads it from standard input.
 * Exit status: 0 ok, 2 the service answered with an error status, 1 other errors.
 *
 * Build: cc -o meshshm-client client.c $(pkg-config --cflags --libs meshshm)
 */
#include <meshshm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char *read_all(FILE *f, size_t *len) {
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            char *bigger = realloc(buf, cap *= 2);
            if (!bigger) { free(buf); return NULL; }
            buf = bigger;
        }
    }
    *len = n;
    return buf;
}

int main(int argc, char **argv) {
    const char *socket_path = NULL; /* NULL: the default socket */
    unsigned long timeout_ms = 5000;
    int opt;
    while ((opt = getopt(argc, argv, "s:t:")) != -1) {
        switch (opt) {
        case 's': socket_path = optarg; break;
        case 't': timeout_ms = strtoul(optarg, NULL, 10); break;
        default: goto usage;
        }
    }
    if (argc - optind < 2 || argc - optind > 3) goto usage;
    const char *service = argv[optind], *method = argv[optind + 1];
    const char *body = "";
    size_t body_len = 0;
    char *owned = NULL;
    if (argc - optind == 3) {
        if (strcmp(argv[optind + 2], "-") == 0) {
            owned = read_all(stdin, &body_len);
            if (!owned) { perror("read stdin"); return 1; }
            body = owned;
        } else {
            body = argv[optind + 2];
            body_len = strlen(body);
        }
    }

    meshshm_client *client = NULL;
    int rc = meshshm_client_connect(socket_path, &client);
    if (rc != MESHSHM_OK) {
        fprintf(stderr, "meshshm-client: connect: %s: %s\n", meshshm_strerror(rc), meshshm_last_error());
        free(owned);
        return 1;
    }
    meshshm_buffer resp = {0};
    rc = meshshm_client_call(client, service, method, body, body_len, (uint32_t)timeout_ms, &resp);
    int exit_code = 0;
    if (rc == MESHSHM_OK) {
        fwrite(resp.data, 1, resp.len, stdout);
        fflush(stdout);
        meshshm_buffer_free(&resp);
    } else if (rc == MESHSHM_ERR_STATUS) {
        fprintf(stderr, "meshshm-client: status %u (%s): %s\n", meshshm_last_status(),
                meshshm_status_name(meshshm_last_status()), meshshm_last_error());
        exit_code = 2;
    } else {
        fprintf(stderr, "meshshm-client: %s: %s\n", meshshm_strerror(rc), meshshm_last_error());
        exit_code = 1;
    }
    meshshm_client_close(client);
    free(owned);
    return exit_code;

usage:
    fprintf(stderr, "usage: %s [-s SOCKET] [-t TIMEOUT_MS] SERVICE METHOD [BODY|-]\n", argv[0]);
    return 64;
}
