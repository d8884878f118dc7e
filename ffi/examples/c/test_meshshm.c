/* Tests of libmeshshm through its C API, against the real proxy.
 *
 * Starts $MESHSHM_PROXY (the meshshm-proxy binary) on a socket in a fresh
 * temporary directory, runs each test, stops the proxy, and prints
 * "N passed, M failed". Exit status 0 only if every test passed.
 */
#define _GNU_SOURCE
#include <meshshm.h>
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static char sock[512];
static char dir[256];
static char logfile[600];
static pid_t proxy_pid;

static void show_log(void);

#define CHECK(cond)                                                                            \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "  %s:%d: check failed: %s (last error: %s)\n", __FILE__, __LINE__, \
                    #cond, meshshm_last_error());                                              \
            return 1;                                                                          \
        }                                                                                      \
    } while (0)

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    bind(fd, (struct sockaddr *)&a, sizeof a);
    getsockname(fd, (struct sockaddr *)&a, &len);
    close(fd);
    return ntohs(a.sin_port);
}

static int start_proxy(void) {
    const char *bin = getenv("MESHSHM_PROXY");
    if (!bin || !*bin) {
        fprintf(stderr, "set MESHSHM_PROXY to the meshshm-proxy binary\n");
        return 1;
    }
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/meshshm-c-test-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(dir)) { perror("mkdtemp"); return 1; }
    snprintf(sock, sizeof sock, "%s/proxy.sock", dir);
    char tcp[64];
    snprintf(tcp, sizeof tcp, "127.0.0.1:%d", free_port());
    char *argv[] = {(char *)bin, "--socket", sock, "--tcp", tcp, NULL};
    /* The proxy's log goes to a file, shown only when something fails. */
    snprintf(logfile, sizeof logfile, "%s/proxy.log", dir);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, logfile, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    int spawned = posix_spawn(&proxy_pid, bin, &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (spawned != 0) {
        perror("spawn the proxy");
        return 1;
    }
    for (int i = 0; i < 200; i++) { /* up to 10 s */
        meshshm_client *c;
        if (meshshm_client_connect(sock, &c) == MESHSHM_OK) {
            meshshm_client_close(c);
            return 0;
        }
        int st;
        if (waitpid(proxy_pid, &st, WNOHANG) == proxy_pid) {
            fprintf(stderr, "the proxy exited early (status %d)\n", st);
            show_log();
            proxy_pid = 0;
            return 1;
        }
        sleep_ms(50);
    }
    fprintf(stderr, "the proxy did not come up: %s\n", meshshm_last_error());
    show_log();
    return 1;
}

static void show_log(void) {
    FILE *f = fopen(logfile, "r");
    if (!f) return;
    char line[1024];
    fprintf(stderr, "--- proxy log ---\n");
    while (fgets(line, sizeof line, f)) fputs(line, stderr);
    fclose(f);
}

static void stop_proxy(void) {
    if (proxy_pid > 0) {
        kill(proxy_pid, SIGTERM);
        int st;
        for (int i = 0; i < 100 && waitpid(proxy_pid, &st, WNOHANG) == 0; i++) sleep_ms(50);
        if (kill(proxy_pid, 0) == 0) {
            kill(proxy_pid, SIGKILL);
            waitpid(proxy_pid, &st, 0);
        }
        proxy_pid = 0;
    }
    unlink(logfile);
    unlink(sock);
    rmdir(dir);
}

/* ---- tests ---- */

static int test_bad_arguments(void) {
    meshshm_client *c = (meshshm_client *)0x1;
    CHECK(meshshm_client_connect(NULL, NULL) == MESHSHM_ERR_INVALID_ARGUMENT);
    meshshm_buffer b = {0};
    CHECK(meshshm_client_call(NULL, "echo", "m", NULL, 0, 0, &b) == MESHSHM_ERR_INVALID_ARGUMENT);
    CHECK(strstr(meshshm_last_error(), "NULL") != NULL);
    CHECK(meshshm_client_connect(sock, &c) == MESHSHM_OK);
    CHECK(meshshm_client_call(c, NULL, "m", NULL, 0, 0, &b) == MESHSHM_ERR_INVALID_ARGUMENT);
    CHECK(meshshm_client_call(c, "echo", "m", NULL, 5, 0, &b) == MESHSHM_ERR_INVALID_ARGUMENT);
    CHECK(meshshm_client_call(c, "echo", "m", NULL, 0, 0, NULL) == MESHSHM_ERR_INVALID_ARGUMENT);
    CHECK(meshshm_client_call(c, "\xff\xfe", "m", NULL, 0, 0, &b) == MESHSHM_ERR_INVALID_ARGUMENT);
    CHECK(meshshm_client_poll(c, NULL, 1, 0) == MESHSHM_ERR_INVALID_ARGUMENT);
    meshshm_client_close(c);
    meshshm_buffer_free(NULL);
    meshshm_buffer_free(&b);
    meshshm_request_free(NULL);
    meshshm_completion_free(NULL);
    meshshm_client_close(NULL);
    meshshm_server_close(NULL);
    CHECK(meshshm_server_bind(sock, NULL, NULL) == MESHSHM_ERR_INVALID_ARGUMENT);
    CHECK(meshshm_server_next(NULL, NULL, 0) == MESHSHM_ERR_INVALID_ARGUMENT);
    CHECK(meshshm_server_reply(NULL, 1, 0, NULL, 0) == MESHSHM_ERR_INVALID_ARGUMENT);
    CHECK(strcmp(meshshm_strerror(MESHSHM_ERR_TIMEOUT), "timed out") == 0);
    CHECK(strcmp(meshshm_strerror(-999), "unknown error code") == 0);
    CHECK(strcmp(meshshm_status_name(5), "not found") == 0);
    CHECK(strlen(meshshm_version()) > 0);
    return 0;
}

static int test_echo_sizes(void) {
    meshshm_client *c;
    CHECK(meshshm_client_connect(sock, &c) == MESHSHM_OK);
    size_t sizes[] = {0, 1, 1024, 65536, 1 << 20, 5 << 20};
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        size_t n = sizes[k];
        uint8_t *body = malloc(n + 1);
        for (size_t i = 0; i < n; i++) body[i] = (uint8_t)(i * 31 + k);
        meshshm_buffer r;
        int rc = meshshm_client_call(c, "echo", "Echo", n ? body : NULL, n, 10000, &r);
        CHECK(rc == MESHSHM_OK);
        CHECK(r.len == n);
        CHECK(n == 0 ? r.data == NULL : memcmp(r.data, body, n) == 0);
        meshshm_buffer_free(&r);
        CHECK(r.data == NULL && r.len == 0);
        meshshm_buffer_free(&r); /* twice is harmless */
        free(body);
    }
    meshshm_client_close(c);
    return 0;
}

/* meshshm_client_connect_opts: doorbells only (spin 0), then fixed polling,
 * each echoing 1 KiB and 1 MiB (sync and async); bad options refused. */
static int test_client_options(void) {
    size_t sizes[] = {1024, 1 << 20};
    uint32_t spins[] = {0, 5000};
    for (int s = 0; s < 2; s++) {
        meshshm_client_options o = MESHSHM_CLIENT_OPTIONS_INIT;
        CHECK(o.spin == MESHSHM_SPIN_DEFAULT && o.spin_adaptive == 1);
        o.socket_path = sock;
        o.service = "c-test";
        o.spin = spins[s];
        o.spin_adaptive = (uint8_t)(s == 0);
        o.connect_timeout_ms = 3000;
        meshshm_client *c;
        CHECK(meshshm_client_connect_opts(&o, &c) == MESHSHM_OK);
        for (size_t k = 0; k < 2; k++) {
            size_t n = sizes[k];
            uint8_t *body = malloc(n);
            for (size_t i = 0; i < n; i++) body[i] = (uint8_t)(i * 7 + s);
            meshshm_buffer r;
            CHECK(meshshm_client_call(c, "echo", "Echo", body, n, 10000, &r) == MESHSHM_OK);
            CHECK(r.len == n && memcmp(r.data, body, n) == 0);
            meshshm_buffer_free(&r);
            /* The async side connects with the same options. */
            uint64_t id;
            CHECK(meshshm_client_send(c, "echo", "Echo", body, n, 10000, 7, &id) == MESHSHM_OK);
            meshshm_completion done;
            int got = 0;
            for (int tries = 0; tries < 1000 && got == 0; tries++) got = meshshm_client_poll(c, &done, 1, 10);
            CHECK(got == 1 && done.call_id == id && done.user_data == 7 && done.result == MESHSHM_OK);
            CHECK(done.body.len == n && memcmp(done.body.data, body, n) == 0);
            meshshm_completion_free(&done);
            free(body);
        }
        meshshm_client_close(c);
    }
    meshshm_client_options bad = MESHSHM_CLIENT_OPTIONS_INIT;
    meshshm_client *c = NULL;
    bad.socket_path = sock;
    bad.spin_adaptive = 2;
    CHECK(meshshm_client_connect_opts(&bad, &c) == MESHSHM_ERR_INVALID_ARGUMENT && c == NULL);
    CHECK(strstr(meshshm_last_error(), "spin_adaptive") != NULL);
    bad.spin_adaptive = 1;
    bad.struct_size = 8;
    CHECK(meshshm_client_connect_opts(&bad, &c) == MESHSHM_ERR_INVALID_ARGUMENT);
    CHECK(strstr(meshshm_last_error(), "struct_size") != NULL);
    CHECK(meshshm_client_connect_opts(&bad, NULL) == MESHSHM_ERR_INVALID_ARGUMENT);
    return 0;
}

static int test_unknown_service(void) {
    meshshm_client *c;
    CHECK(meshshm_client_connect(sock, &c) == MESHSHM_OK);
    meshshm_buffer r = {(uint8_t *)0x1, 7};
    CHECK(meshshm_client_call(c, "no-such-service", "Get", "x", 1, 2000, &r) == MESHSHM_ERR_STATUS);
    CHECK(meshshm_last_status() == 5);
    CHECK(r.data == NULL && r.len == 0);
    meshshm_client_close(c);
    return 0;
}

static int test_proxy_not_running(void) {
    char path[600];
    snprintf(path, sizeof path, "%s/nobody-listens.sock", dir);
    meshshm_client *c = (meshshm_client *)0x1;
    CHECK(meshshm_client_connect(path, &c) == MESHSHM_ERR_CONNECT);
    CHECK(c == NULL);
    CHECK(strstr(meshshm_last_error(), "nobody-listens.sock") != NULL);
    meshshm_server *s;
    CHECK(meshshm_server_bind(path, "svc", &s) == MESHSHM_ERR_CONNECT);
    return 0;
}

struct serve_args {
    meshshm_server *server;
    int count;
};

static void *serve_upper(void *p) {
    struct serve_args *a = p;
    for (int served = 0; served < a->count;) {
        meshshm_request req;
        int rc = meshshm_server_next(a->server, &req, 5000);
        if (rc != MESHSHM_OK) break;
        for (size_t i = 0; i < req.body.len; i++)
            if (req.body.data[i] >= 'a' && req.body.data[i] <= 'z') req.body.data[i] -= 32;
        if (strcmp(req.method, "fail") == 0)
            meshshm_server_reply_message(a->server, req.id, 7, "go away", NULL, 0);
        else
            meshshm_server_reply(a->server, req.id, 0, req.body.data, req.body.len);
        meshshm_request_free(&req);
        served++;
    }
    return NULL;
}

static int test_c_server(void) {
    meshshm_server *s;
    CHECK(meshshm_server_bind(sock, "c-upper", &s) == MESHSHM_OK);
    struct serve_args a = {s, 2};
    pthread_t t;
    pthread_create(&t, NULL, serve_upper, &a);
    meshshm_client *c;
    CHECK(meshshm_client_connect(sock, &c) == MESHSHM_OK);
    meshshm_buffer r;
    CHECK(meshshm_client_call(c, "c-upper", "Up", "hello", 5, 5000, &r) == MESHSHM_OK);
    CHECK(r.len == 5 && memcmp(r.data, "HELLO", 5) == 0);
    meshshm_buffer_free(&r);
    CHECK(meshshm_client_call(c, "c-upper", "fail", NULL, 0, 5000, &r) == MESHSHM_ERR_STATUS);
    CHECK(meshshm_last_status() == 7);
    CHECK(strstr(meshshm_last_error(), "go away") != NULL);
    pthread_join(t, NULL);
    meshshm_client_close(c);
    meshshm_server_close(s);
    return 0;
}

static int test_timeout(void) {
    meshshm_server *s; /* registered, never answers */
    CHECK(meshshm_server_bind(sock, "c-silent", &s) == MESHSHM_OK);
    meshshm_client *c;
    CHECK(meshshm_client_connect(sock, &c) == MESHSHM_OK);
    meshshm_buffer r;
    CHECK(meshshm_client_call(c, "c-silent", "Wait", "x", 1, 200, &r) == MESHSHM_ERR_TIMEOUT);
    meshshm_request req;
    CHECK(meshshm_server_next(s, &req, 0) == MESHSHM_OK || 1); /* drain what reached the server */
    meshshm_request_free(&req);
    meshshm_request empty;
    CHECK(meshshm_server_next(s, &empty, 50) == MESHSHM_ERR_TIMEOUT);
    meshshm_client_close(c);
    meshshm_server_close(s);
    return 0;
}

struct worker {
    meshshm_client *c;
    int id, failures;
};

static void *hammer(void *p) {
    struct worker *w = p;
    char body[64];
    for (int i = 0; i < 200; i++) {
        int n = snprintf(body, sizeof body, "thread %d call %d", w->id, i);
        meshshm_buffer r;
        int rc = meshshm_client_call(w->c, "echo", "Echo", body, n, 10000, &r);
        if (rc != MESHSHM_OK || r.len != (size_t)n || memcmp(r.data, body, n) != 0) w->failures++;
        meshshm_buffer_free(&r);
    }
    return NULL;
}

static int test_concurrent_threads(void) {
    meshshm_client *c;
    CHECK(meshshm_client_connect(sock, &c) == MESHSHM_OK);
    enum { N = 8 };
    pthread_t t[N];
    struct worker w[N];
    for (int i = 0; i < N; i++) {
        w[i] = (struct worker){c, i, 0};
        pthread_create(&t[i], NULL, hammer, &w[i]);
    }
    int failures = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(t[i], NULL);
        failures += w[i].failures;
    }
    CHECK(failures == 0);
    meshshm_client_close(c);
    return 0;
}

static int test_async(void) {
    meshshm_client *c;
    CHECK(meshshm_client_connect(sock, &c) == MESHSHM_OK);
    int fd = meshshm_client_fd(c);
    CHECK(fd >= 0);
    enum { N = 64 };
    int seen[N] = {0};
    for (uint64_t i = 0; i < N; i++) {
        char body[32];
        int n = snprintf(body, sizeof body, "async %d", (int)i);
        CHECK(meshshm_client_send(c, "echo", "Echo", body, n, 5000, i, NULL) == MESHSHM_OK);
    }
    uint64_t unknown_id;
    CHECK(meshshm_client_send(c, "nowhere", "X", NULL, 0, 5000, 1000, &unknown_id) == MESHSHM_OK);
    int got = 0, got_status = 0;
    while (got < N || !got_status) {
        struct pollfd p = {fd, POLLIN, 0};
        CHECK(poll(&p, 1, 10000) == 1); /* the fd wakes us */
        meshshm_completion done[16];
        int n = meshshm_client_poll(c, done, 16, 0);
        CHECK(n >= 0);
        for (int k = 0; k < n; k++) {
            if (done[k].user_data == 1000) {
                CHECK(done[k].result == MESHSHM_ERR_STATUS && done[k].status == 5);
                CHECK(done[k].error != NULL && done[k].call_id == unknown_id);
                got_status = 1;
            } else {
                CHECK(done[k].result == MESHSHM_OK && done[k].user_data < N);
                char want[32];
                int wn = snprintf(want, sizeof want, "async %d", (int)done[k].user_data);
                CHECK(done[k].body.len == (size_t)wn && memcmp(done[k].body.data, want, wn) == 0);
                seen[done[k].user_data]++;
                got++;
            }
            meshshm_completion_free(&done[k]);
        }
    }
    for (int i = 0; i < N; i++) CHECK(seen[i] == 1);

    /* cancel: a call to a server that never answers */
    meshshm_server *s;
    CHECK(meshshm_server_bind(sock, "c-silent-async", &s) == MESHSHM_OK);
    uint64_t id;
    CHECK(meshshm_client_send(c, "c-silent-async", "Wait", NULL, 0, 0, 7, &id) == MESHSHM_OK);
    CHECK(meshshm_client_cancel(c, id) == MESHSHM_OK);
    CHECK(meshshm_client_cancel(c, id) == MESHSHM_ERR_NOT_FOUND);
    meshshm_completion done;
    CHECK(meshshm_client_poll(c, &done, 1, 5000) == 1);
    CHECK(done.user_data == 7 && done.result == MESHSHM_ERR_CANCELLED);
    meshshm_completion_free(&done);
    /* timeout of an async call */
    CHECK(meshshm_client_send(c, "c-silent-async", "Wait", NULL, 0, 100, 8, NULL) == MESHSHM_OK);
    CHECK(meshshm_client_poll(c, &done, 1, 5000) == 1);
    if (done.result != MESHSHM_ERR_TIMEOUT) fprintf(stderr, "  completion: %d %s\n", done.result, done.error);
    CHECK(done.user_data == 8 && done.result == MESHSHM_ERR_TIMEOUT);
    meshshm_completion_free(&done);
    CHECK(meshshm_client_poll(c, &done, 1, 0) == 0);
    meshshm_client_close(c);
    meshshm_server_close(s);
    return 0;
}

/* A server that answers each request with what reached it:
 * "<priority>|<name>=<value>|<name>=<value>..." (values copied as bytes). */
static void *serve_describe(void *p) {
    struct serve_args *a = p;
    for (int served = 0; served < a->count; served++) {
        meshshm_request req;
        meshshm_headers hs = {(meshshm_header *)0x1, 9};
        int rc = meshshm_server_next_with_headers(a->server, &req, &hs, 5000);
        if (rc != MESHSHM_OK) break;
        char out[1024];
        size_t n = (size_t)snprintf(out, sizeof out, "%u", (unsigned)req.priority);
        for (size_t i = 0; i < hs.len; i++) {
            const meshshm_header *h = &hs.data[i];
            size_t nl = strlen(h->name);
            if (n + nl + h->value_len + 2 > sizeof out) break;
            out[n++] = '|';
            memcpy(out + n, h->name, nl);
            n += nl;
            out[n++] = '=';
            if (h->value_len) memcpy(out + n, h->value, h->value_len);
            n += h->value_len;
        }
        meshshm_server_reply(a->server, req.id, 0, out, n);
        meshshm_headers_free(&hs);
        meshshm_headers_free(&hs); /* twice is harmless */
        meshshm_request_free(&req);
    }
    return NULL;
}

static int test_call_options(void) {
    meshshm_server *s;
    CHECK(meshshm_server_bind(sock, "c-describe", &s) == MESHSHM_OK);
    struct serve_args a = {s, 4};
    pthread_t t;
    pthread_create(&t, NULL, serve_describe, &a);
    meshshm_client *c;
    CHECK(meshshm_client_connect(sock, &c) == MESHSHM_OK);

    /* blocking: two headers (one binary, with a NUL) and high priority */
    meshshm_header hs[] = {{"x-trace", (const uint8_t *)"abc", 3},
                           {"x-bin", (const uint8_t *)"a\0b", 3}};
    meshshm_call_options o = MESHSHM_CALL_OPTIONS_INIT;
    CHECK(o.struct_size == sizeof o && o.priority == 1 && o.timeout_ms == 0);
    o.timeout_ms = 5000;
    o.priority = 2;
    o.headers = hs;
    o.headers_len = 2;
    meshshm_buffer r;
    CHECK(meshshm_client_call_opts(c, "c-describe", "M", "x", 1, &o, &r) == MESHSHM_OK);
    const char want[] = "2|x-trace=abc|x-bin=a\0b";
    CHECK(r.len == sizeof want - 1 && memcmp(r.data, want, r.len) == 0);
    meshshm_buffer_free(&r);

    /* NULL options: normal priority, no headers */
    CHECK(meshshm_client_call_opts(c, "c-describe", "M", NULL, 0, NULL, &r) == MESHSHM_OK);
    CHECK(r.len == 1 && memcmp(r.data, "1", 1) == 0);
    meshshm_buffer_free(&r);

    /* the plain call: normal priority */
    CHECK(meshshm_client_call(c, "c-describe", "M", NULL, 0, 5000, &r) == MESHSHM_OK);
    CHECK(r.len == 1 && memcmp(r.data, "1", 1) == 0);
    meshshm_buffer_free(&r);

    /* asynchronous: low priority, one header */
    meshshm_call_options lo = MESHSHM_CALL_OPTIONS_INIT;
    lo.priority = 0;
    lo.timeout_ms = 5000;
    lo.headers = hs;
    lo.headers_len = 1;
    CHECK(meshshm_client_send_opts(c, "c-describe", "M", NULL, 0, &lo, 42, NULL) == MESHSHM_OK);
    meshshm_completion done;
    CHECK(meshshm_client_poll(c, &done, 1, 5000) == 1);
    CHECK(done.user_data == 42 && done.result == MESHSHM_OK);
    CHECK(done.body.len == 13 && memcmp(done.body.data, "0|x-trace=abc", 13) == 0);
    meshshm_completion_free(&done);

    /* bad options are refused before anything is sent */
    meshshm_call_options bad = MESHSHM_CALL_OPTIONS_INIT;
    bad.struct_size = 4;
    CHECK(meshshm_client_call_opts(c, "c-describe", "M", NULL, 0, &bad, &r) == MESHSHM_ERR_INVALID_ARGUMENT);
    CHECK(strstr(meshshm_last_error(), "struct_size") != NULL);
    meshshm_header null_name[] = {{NULL, NULL, 0}};
    bad = (meshshm_call_options)MESHSHM_CALL_OPTIONS_INIT;
    bad.headers = null_name;
    bad.headers_len = 1;
    CHECK(meshshm_client_send_opts(c, "c-describe", "M", NULL, 0, &bad, 0, NULL) == MESHSHM_ERR_INVALID_ARGUMENT);
    CHECK(strstr(meshshm_last_error(), "headers[0].name is NULL") != NULL);
    bad.headers = NULL;
    CHECK(meshshm_client_call_opts(c, "c-describe", "M", NULL, 0, &bad, &r) == MESHSHM_ERR_INVALID_ARGUMENT);

    pthread_join(t, NULL);
    meshshm_client_close(c);
    meshshm_server_close(s);
    return 0;
}

static int test_is_cancelled(void) {
    meshshm_server *s;
    CHECK(meshshm_server_bind(sock, "c-hold", &s) == MESHSHM_OK);
    CHECK(meshshm_server_is_cancelled(NULL, 1) == MESHSHM_ERR_INVALID_ARGUMENT);
    CHECK(meshshm_server_is_cancelled(s, 123456789) == 1); /* never handed out */
    meshshm_client *c;
    CHECK(meshshm_client_connect(sock, &c) == MESHSHM_OK);

    /* the caller gives up after 1 s; the server holds the request */
    meshshm_call_options o = MESHSHM_CALL_OPTIONS_INIT;
    o.timeout_ms = 1000;
    CHECK(meshshm_client_send_opts(c, "c-hold", "Slow", NULL, 0, &o, 1, NULL) == MESHSHM_OK);
    meshshm_request req;
    CHECK(meshshm_server_next(s, &req, 5000) == MESHSHM_OK);
    CHECK(meshshm_server_is_cancelled(s, req.id) == 0); /* the caller still waits */
    int cancelled = 0;
    for (int i = 0; i < 500 && !cancelled; i++) { /* up to 10 s */
        int rc = meshshm_server_is_cancelled(s, req.id);
        CHECK(rc == 0 || rc == 1);
        cancelled = rc;
        if (!cancelled) sleep_ms(20);
    }
    CHECK(cancelled == 1);
    meshshm_completion done;
    CHECK(meshshm_client_poll(c, &done, 1, 5000) == 1);
    CHECK(done.user_data == 1 && done.result == MESHSHM_ERR_TIMEOUT);
    meshshm_completion_free(&done);
    /* a reply to it is dropped, not an error */
    CHECK(meshshm_server_reply(s, req.id, 0, "late", 4) == MESHSHM_OK);
    meshshm_request_free(&req);

    /* an answered request counts as cancelled too */
    CHECK(meshshm_client_send(c, "c-hold", "Fast", NULL, 0, 5000, 2, NULL) == MESHSHM_OK);
    CHECK(meshshm_server_next(s, &req, 5000) == MESHSHM_OK);
    CHECK(meshshm_server_is_cancelled(s, req.id) == 0);
    CHECK(meshshm_server_reply(s, req.id, 0, "ok", 2) == MESHSHM_OK);
    CHECK(meshshm_server_is_cancelled(s, req.id) == 1);
    CHECK(meshshm_client_poll(c, &done, 1, 5000) == 1);
    CHECK(done.user_data == 2 && done.result == MESHSHM_OK);
    CHECK(done.body.len == 2 && memcmp(done.body.data, "ok", 2) == 0);
    meshshm_completion_free(&done);
    meshshm_request_free(&req);
    meshshm_client_close(c);
    meshshm_server_close(s);
    return 0;
}

/* A watchdog: a hung test must not hang the suite. */
static void *watchdog(void *p) {
    (void)p;
    sleep(300);
    fprintf(stderr, "watchdog: the C tests hung for 300 s\n");
    stop_proxy();
    _exit(3);
}

int main(void) {
    pthread_t wd;
    pthread_create(&wd, NULL, watchdog, NULL);
    pthread_detach(wd);
    if (start_proxy() != 0) {
        stop_proxy();
        printf("0 passed, 1 failed\n");
        return 1;
    }
    struct {
        const char *name;
        int (*fn)(void);
    } tests[] = {
        {"bad_arguments", test_bad_arguments},
        {"echo_sizes", test_echo_sizes},
        {"client_options", test_client_options},
        {"unknown_service", test_unknown_service},
        {"proxy_not_running", test_proxy_not_running},
        {"c_server", test_c_server},
        {"timeout", test_timeout},
        {"concurrent_threads", test_concurrent_threads},
        {"async", test_async},
        {"call_options", test_call_options},
        {"is_cancelled", test_is_cancelled},
    };
    int passed = 0, failed = 0;
    for (size_t i = 0; i < sizeof tests / sizeof *tests; i++) {
        int rc = tests[i].fn();
        printf("%s - %s\n", rc == 0 ? "ok" : "FAILED", tests[i].name);
        fflush(stdout);
        if (rc == 0) passed++; else failed++;
    }
    if (failed) show_log();
    stop_proxy();
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
