/* Wrappers that make a libmeshshm call and, on failure, read the thread's
 * last error in the same C call: a goroutine may move to another OS thread
 * between two cgo calls, and meshshm_last_error() is per thread. */
#ifndef MESHSHM_GO_SHIM_H
#define MESHSHM_GO_SHIM_H

#include <meshshm.h>
#include <stdlib.h>
#include <string.h>

static inline int mshm_fail(int rc, char **err, uint32_t *status) {
    if (rc < 0) {
        *err = strdup(meshshm_last_error());
        *status = meshshm_last_status();
    }
    return rc;
}

static inline int mshm_connect(const char *path, meshshm_client **out, char **err, uint32_t *status) {
    return mshm_fail(meshshm_client_connect(path, out), err, status);
}

static inline int mshm_call(meshshm_client *c, const char *svc, const char *method, const void *body,
                            size_t len, uint32_t timeout_ms, meshshm_buffer *resp, char **err,
                            uint32_t *status) {
    return mshm_fail(meshshm_client_call(c, svc, method, body, len, timeout_ms, resp), err, status);
}

static inline int mshm_send(meshshm_client *c, const char *svc, const char *method, const void *body,
                            size_t len, uint32_t timeout_ms, uint64_t user_data, uint64_t *call_id,
                            char **err, uint32_t *status) {
    return mshm_fail(meshshm_client_send(c, svc, method, body, len, timeout_ms, user_data, call_id), err,
                     status);
}

static inline int mshm_call_opts(meshshm_client *c, const char *svc, const char *method, const void *body,
                                 size_t len, const meshshm_call_options *o, meshshm_buffer *resp, char **err,
                                 uint32_t *status) {
    return mshm_fail(meshshm_client_call_opts(c, svc, method, body, len, o, resp), err, status);
}

static inline int mshm_send_opts(meshshm_client *c, const char *svc, const char *method, const void *body,
                                 size_t len, const meshshm_call_options *o, uint64_t user_data,
                                 uint64_t *call_id, char **err, uint32_t *status) {
    return mshm_fail(meshshm_client_send_opts(c, svc, method, body, len, o, user_data, call_id), err, status);
}

/* The default options, with struct_size as this header declares it. */
static inline void mshm_options_init(meshshm_call_options *o) {
    meshshm_call_options d = MESHSHM_CALL_OPTIONS_INIT;
    *o = d;
}

static inline int mshm_fd(meshshm_client *c, char **err, uint32_t *status) {
    return mshm_fail(meshshm_client_fd(c), err, status);
}

static inline int mshm_bind(const char *path, const char *svc, meshshm_server **out, char **err,
                            uint32_t *status) {
    return mshm_fail(meshshm_server_bind(path, svc, out), err, status);
}

static inline int mshm_next(meshshm_server *s, meshshm_request *req, int32_t timeout_ms, char **err,
                            uint32_t *status) {
    return mshm_fail(meshshm_server_next(s, req, timeout_ms), err, status);
}

static inline int mshm_next_headers(meshshm_server *s, meshshm_request *req, meshshm_headers *hs,
                                    int32_t timeout_ms, char **err, uint32_t *status) {
    return mshm_fail(meshshm_server_next_with_headers(s, req, hs, timeout_ms), err, status);
}

static inline int mshm_is_cancelled(meshshm_server *s, uint64_t id, char **err, uint32_t *status) {
    return mshm_fail(meshshm_server_is_cancelled(s, id), err, status);
}

static inline int mshm_reply(meshshm_server *s, uint64_t id, int32_t st, const char *msg, const void *body,
                             size_t len, char **err, uint32_t *status) {
    return mshm_fail(meshshm_server_reply_message(s, id, st, msg, body, len), err, status);
}

#endif
