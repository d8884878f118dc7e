// meshshm.hpp: a header-only C++17 wrapper of libmeshshm (RAII handles,
// string_view arguments, exceptions). Link libmeshshm as for C:
//     c++ -std=c++17 app.cpp $(pkg-config --cflags --libs meshshm)
//
//     auto client = meshshm::client::connect();            // default socket
//     meshshm::buffer reply = client.call("echo", "Echo", "hi", std::chrono::seconds(1));
//     std::string_view text = reply.view();                // no copy
//
// Headers and priority: client.call(service, method, body, meshshm::call_options()
//     .with_timeout(1s).with_priority(meshshm::priority::high).header("x-trace", "abc"));
// a server reads req->headers(), req->header(name), req->priority(), and asks
// srv.is_cancelled(*req) whether the caller still waits.
//
// Errors are exceptions derived from meshshm::error (code() is the C code):
// connect_error, timeout_error, status_error (status()), proxy_gone_error, ...
//
// Thread-safety is the C API's: one client may be used by many threads at
// once; server::next from one thread at a time, server::reply from any.
// Destroying a handle must not race with its use.
#ifndef MESHSHM_HPP
#define MESHSHM_HPP

#include <meshshm.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>
#if __cplusplus >= 202002L && __has_include(<span>)
#include <span>
#endif

namespace meshshm {

/// A libmeshshm failure. code() is the C error code (MESHSHM_ERR_*).
class error : public std::runtime_error {
public:
    error(int code, const std::string &what) : std::runtime_error(what), code_(code) {}
    int code() const noexcept { return code_; }

private:
    int code_;
};

/// An argument was refused (NULL, not UTF-8, too large, ...).
struct invalid_argument_error : error { using error::error; };
/// The proxy is not running or cannot be reached.
struct connect_error : error { using error::error; };
/// The proxy refused the handshake.
struct rejected_error : error { using error::error; };
/// The proxy went away during the call (a later call reconnects).
struct proxy_gone_error : error { using error::error; };
/// No answer in time; the call was cancelled.
struct timeout_error : error { using error::error; };
/// The handle is closed.
struct closed_error : error { using error::error; };
/// The asynchronous call was cancelled.
struct cancelled_error : error { using error::error; };

/// The service answered with a non-OK status (status(): 5 not found, ...).
class status_error : public error {
public:
    status_error(const std::string &what, std::uint32_t status) : error(MESHSHM_ERR_STATUS, what), status_(status) {}
    std::uint32_t status() const noexcept { return status_; }
    std::string_view status_name() const noexcept { return meshshm_status_name(status_); }

private:
    std::uint32_t status_;
};

/// Status codes a service answers with.
namespace status {
constexpr std::uint32_t ok = 0, cancelled = 1, unknown = 2, invalid_argument = 3, deadline_exceeded = 4,
                        not_found = 5, permission_denied = 7, resource_exhausted = 8, internal = 13,
                        unavailable = 14;
}  // namespace status

namespace detail {
[[noreturn]] inline void throw_error(int code, const std::string &msg, std::uint32_t st) {
    switch (code) {
    case MESHSHM_ERR_INVALID_ARGUMENT: throw invalid_argument_error(code, msg);
    case MESHSHM_ERR_CONNECT: throw connect_error(code, msg);
    case MESHSHM_ERR_REJECTED: throw rejected_error(code, msg);
    case MESHSHM_ERR_PROXY_GONE: throw proxy_gone_error(code, msg);
    case MESHSHM_ERR_TIMEOUT: throw timeout_error(code, msg);
    case MESHSHM_ERR_STATUS: throw status_error(msg, st);
    case MESHSHM_ERR_CLOSED: throw closed_error(code, msg);
    case MESHSHM_ERR_CANCELLED: throw cancelled_error(code, msg);
    default: throw error(code, msg);
    }
}

/// Throw for a negative code, reading this thread's last error.
inline int check(int rc) {
    if (rc < 0) throw_error(rc, meshshm_last_error(), meshshm_last_status());
    return rc;
}

inline std::uint32_t to_ms(std::chrono::milliseconds t) {
    if (t.count() <= 0) return 0;
    return t.count() > 0xFFFFFFFFLL ? 0xFFFFFFFFu : static_cast<std::uint32_t>(t.count());
}
}  // namespace detail

/// A read-only byte range: built from std::string_view, std::string,
/// std::vector<uint8_t/char>, std::span (C++20), or a pointer and a size.
class bytes_view {
public:
    constexpr bytes_view() noexcept = default;
    constexpr bytes_view(const void *data, std::size_t size) noexcept : data_(data), size_(size) {}
    constexpr bytes_view(std::string_view s) noexcept : data_(s.data()), size_(s.size()) {}
    bytes_view(const std::string &s) noexcept : data_(s.data()), size_(s.size()) {}
    bytes_view(const char *s) noexcept : bytes_view(std::string_view(s)) {}
    template <class T, class A>
    bytes_view(const std::vector<T, A> &v) noexcept : data_(v.data()), size_(v.size() * sizeof(T)) {
        static_assert(sizeof(T) == 1, "a byte vector");
    }
#if __cplusplus >= 202002L && __has_include(<span>)
    template <class T, std::size_t N>
    bytes_view(std::span<T, N> s) noexcept : data_(s.data()), size_(s.size_bytes()) {}
#endif
    const void *data() const noexcept { return data_; }
    std::size_t size() const noexcept { return size_; }

private:
    const void *data_ = nullptr;
    std::size_t size_ = 0;
};

/// Call priorities (call_options::priority): low is shed first under overload.
namespace priority {
constexpr std::uint8_t low = 0, normal = 1, high = 2;
}  // namespace priority

/// How a call is made besides service, method and body: timeout, priority
/// and request headers (a value is bytes, held in a std::string).
///
///     client.call("svc", "M", body, meshshm::call_options()
///                                       .with_timeout(std::chrono::seconds(1))
///                                       .with_priority(meshshm::priority::high)
///                                       .header("x-trace", "abc"));
struct call_options {
    /// Give up (and cancel) after this long; zero or negative: no timeout.
    std::chrono::milliseconds timeout = std::chrono::seconds(30);
    /// priority::low (0), normal (1), high (2 and up).
    std::uint8_t priority = priority::normal;
    /// Request headers, in order (a name may repeat).
    std::vector<std::pair<std::string, std::string>> headers;

    call_options &with_timeout(std::chrono::milliseconds t) { timeout = t; return *this; }
    call_options &with_priority(std::uint8_t p) { priority = p; return *this; }
    call_options &header(std::string name, bytes_view value) {
        headers.emplace_back(std::move(name), std::string(static_cast<const char *>(value.data()), value.size()));
        return *this;
    }
};

namespace detail {
/// The C view of call_options; points into opts (and hs), valid while they live.
inline meshshm_call_options c_options(const call_options &opts, std::vector<meshshm_header> &hs) {
    hs.clear();
    hs.reserve(opts.headers.size());
    for (const auto &h : opts.headers) {
        if (h.first.find('\0') != std::string::npos)
            throw invalid_argument_error(MESHSHM_ERR_INVALID_ARGUMENT, "header name contains a NUL character");
        hs.push_back(meshshm_header{h.first.c_str(), reinterpret_cast<const std::uint8_t *>(h.second.data()), h.second.size()});
    }
    meshshm_call_options o = MESHSHM_CALL_OPTIONS_INIT;
    o.timeout_ms = to_ms(opts.timeout);
    o.priority = opts.priority;
    o.headers = hs.empty() ? nullptr : hs.data();
    o.headers_len = hs.size();
    return o;
}
}  // namespace detail

/// Bytes owned by libmeshshm (a response body), freed on destruction. Move-only.
class buffer {
public:
    buffer() noexcept = default;
    explicit buffer(meshshm_buffer b) noexcept : b_(b) {}
    buffer(buffer &&o) noexcept : b_(std::exchange(o.b_, meshshm_buffer{nullptr, 0})) {}
    buffer &operator=(buffer &&o) noexcept {
        if (this != &o) {
            meshshm_buffer_free(&b_);
            b_ = std::exchange(o.b_, meshshm_buffer{nullptr, 0});
        }
        return *this;
    }
    buffer(const buffer &) = delete;
    buffer &operator=(const buffer &) = delete;
    ~buffer() { meshshm_buffer_free(&b_); }

    const std::uint8_t *data() const noexcept { return b_.data; }
    std::size_t size() const noexcept { return b_.len; }
    bool empty() const noexcept { return b_.len == 0; }
    /// The bytes as a string_view (valid while the buffer lives).
    std::string_view view() const noexcept {
        return b_.len ? std::string_view(reinterpret_cast<const char *>(b_.data), b_.len) : std::string_view();
    }
    /// A copy as a std::string.
    std::string str() const { return std::string(view()); }

private:
    meshshm_buffer b_{nullptr, 0};
};

/// One finished asynchronous call (client::poll).
struct completion {
    std::uint64_t user_data = 0;
    std::uint64_t call_id = 0;
    int result = 0;            ///< MESHSHM_OK or a MESHSHM_ERR_* code
    std::uint32_t status = 0;  ///< the service's status
    buffer body;
    std::string error;  ///< "" on success
    bool ok() const noexcept { return result == MESHSHM_OK; }
    /// The body, or the exception of the failure.
    buffer take() {
        if (!ok()) detail::throw_error(result, error, status);
        return std::move(body);
    }
};

/// A connection to the sidecar proxy for outbound calls. Move-only.
class client {
public:
    /// Connect; an empty socket path means the default.
    /// Throws connect_error when the proxy is not running.
    static client connect(std::string_view socket_path = {}) {
        std::string path(socket_path);
        meshshm_client *c = nullptr;
        detail::check(meshshm_client_connect(path.empty() ? nullptr : path.c_str(), &c));
        return client(c);
    }

    client(client &&o) noexcept : c_(std::exchange(o.c_, nullptr)) {}
    client &operator=(client &&o) noexcept {
        if (this != &o) {
            meshshm_client_close(c_);
            c_ = std::exchange(o.c_, nullptr);
        }
        return *this;
    }
    client(const client &) = delete;
    client &operator=(const client &) = delete;
    ~client() { meshshm_client_close(c_); }

    /// Call service/method with body; the response body. A zero timeout waits without limit.
    /// Throws status_error, timeout_error, proxy_gone_error, ...
    buffer call(std::string_view service, std::string_view method, bytes_view body = {},
                std::chrono::milliseconds timeout = std::chrono::seconds(30)) const {
        std::string s(service), m(method);
        meshshm_buffer out{nullptr, 0};
        detail::check(meshshm_client_call(c_, s.c_str(), m.c_str(), body.data(), body.size(), detail::to_ms(timeout), &out));
        return buffer(out);
    }

    /// As call(), with headers, a priority and the timeout in opts.
    buffer call(std::string_view service, std::string_view method, bytes_view body, const call_options &opts) const {
        std::string s(service), m(method);
        std::vector<meshshm_header> hs;
        meshshm_call_options o = detail::c_options(opts, hs);
        meshshm_buffer out{nullptr, 0};
        detail::check(meshshm_client_call_opts(c_, s.c_str(), m.c_str(), body.data(), body.size(), &o, &out));
        return buffer(out);
    }

    /// As send(), with headers, a priority and the timeout in opts.
    std::uint64_t send(std::string_view service, std::string_view method, bytes_view body, std::uint64_t user_data,
                       const call_options &opts) const {
        std::string s(service), m(method);
        std::vector<meshshm_header> hs;
        meshshm_call_options o = detail::c_options(opts, hs);
        std::uint64_t id = 0;
        detail::check(meshshm_client_send_opts(c_, s.c_str(), m.c_str(), body.data(), body.size(), &o, user_data, &id));
        return id;
    }

    /// Start a call without waiting; returns its call id. Its completion
    /// (carrying user_data) comes from poll().
    std::uint64_t send(std::string_view service, std::string_view method, bytes_view body, std::uint64_t user_data,
                       std::chrono::milliseconds timeout = std::chrono::seconds(30)) const {
        std::string s(service), m(method);
        std::uint64_t id = 0;
        detail::check(meshshm_client_send(c_, s.c_str(), m.c_str(), body.data(), body.size(), detail::to_ms(timeout),
                                          user_data, &id));
        return id;
    }

    /// Up to max completions, waiting up to timeout for the first (negative: forever).
    std::vector<completion> poll(std::size_t max = 64, std::chrono::milliseconds timeout = std::chrono::milliseconds(0)) const {
        std::vector<meshshm_completion> raw(max);
        auto ms = timeout.count() < 0 ? -1 : static_cast<std::int32_t>(std::min<long long>(timeout.count(), INT32_MAX));
        int n = detail::check(meshshm_client_poll(c_, raw.data(), raw.size(), ms));
        std::vector<completion> out;
        out.reserve(static_cast<std::size_t>(n));
        for (int i = 0; i < n; i++) {
            meshshm_completion &r = raw[static_cast<std::size_t>(i)];
            completion c;
            c.user_data = r.user_data;
            c.call_id = r.call_id;
            c.result = r.result;
            c.status = r.status;
            c.body = buffer(std::exchange(r.body, meshshm_buffer{nullptr, 0}));
            if (r.error) c.error = r.error;
            meshshm_completion_free(&r);
            out.push_back(std::move(c));
        }
        return out;
    }

    /// Cancel an asynchronous call; false if it already completed.
    bool cancel(std::uint64_t call_id) const {
        int rc = meshshm_client_cancel(c_, call_id);
        if (rc == MESHSHM_ERR_NOT_FOUND) return false;
        detail::check(rc);
        return true;
    }

    /// The completion fd (readable when poll() may have something): for epoll, asio, libuv.
    int fd() const { return detail::check(meshshm_client_fd(c_)); }

    /// The C handle, for functions this wrapper lacks.
    meshshm_client *native_handle() const noexcept { return c_; }

private:
    explicit client(meshshm_client *c) noexcept : c_(c) {}
    meshshm_client *c_;
};

/// A request delivered to a server; owns its strings, body and headers. Move-only.
class request {
public:
    request() noexcept : r_{}, h_{nullptr, 0} {}
    request(request &&o) noexcept
        : r_(std::exchange(o.r_, meshshm_request{})), h_(std::exchange(o.h_, meshshm_headers{nullptr, 0})) {}
    request &operator=(request &&o) noexcept {
        if (this != &o) {
            meshshm_request_free(&r_);
            meshshm_headers_free(&h_);
            r_ = std::exchange(o.r_, meshshm_request{});
            h_ = std::exchange(o.h_, meshshm_headers{nullptr, 0});
        }
        return *this;
    }
    request(const request &) = delete;
    request &operator=(const request &) = delete;
    ~request() {
        meshshm_request_free(&r_);
        meshshm_headers_free(&h_);
    }

    std::uint64_t id() const noexcept { return r_.id; }
    std::string_view service() const noexcept { return r_.service ? r_.service : ""; }
    std::string_view method() const noexcept { return r_.method ? r_.method : ""; }
    std::string_view body() const noexcept {
        return r_.body.len ? std::string_view(reinterpret_cast<const char *>(r_.body.data), r_.body.len) : std::string_view();
    }
    /// Time left to answer at delivery (0: the caller set no deadline).
    std::chrono::milliseconds timeout() const noexcept { return std::chrono::milliseconds(r_.timeout_ms); }
    /// priority::low (0), normal (1), high (2 and up), as the caller set it.
    std::uint8_t priority() const noexcept { return r_.priority; }
    /// The request headers in order, as (name, value) views valid while the request lives.
    std::vector<std::pair<std::string_view, std::string_view>> headers() const {
        std::vector<std::pair<std::string_view, std::string_view>> out;
        out.reserve(h_.len);
        for (std::size_t i = 0; i < h_.len; i++) out.emplace_back(h_.data[i].name, value_of(h_.data[i]));
        return out;
    }
    /// The value of the first header named name (case-sensitive), if any.
    std::optional<std::string_view> header(std::string_view name) const noexcept {
        for (std::size_t i = 0; i < h_.len; i++)
            if (name == h_.data[i].name) return value_of(h_.data[i]);
        return std::nullopt;
    }

    meshshm_request *native() noexcept { return &r_; }
    meshshm_headers *native_headers() noexcept { return &h_; }

private:
    static std::string_view value_of(const meshshm_header &h) noexcept {
        return h.value_len ? std::string_view(reinterpret_cast<const char *>(h.value), h.value_len) : std::string_view();
    }
    meshshm_request r_;
    meshshm_headers h_;
};

/// Registered with the proxy as the handler of one service. Move-only.
class server {
public:
    /// Register as service (an empty socket path means the default).
    static server bind(std::string_view service, std::string_view socket_path = {}) {
        std::string path(socket_path), s(service);
        meshshm_server *p = nullptr;
        detail::check(meshshm_server_bind(path.empty() ? nullptr : path.c_str(), s.c_str(), &p));
        return server(p);
    }

    server(server &&o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
    server &operator=(server &&o) noexcept {
        if (this != &o) {
            meshshm_server_close(s_);
            s_ = std::exchange(o.s_, nullptr);
        }
        return *this;
    }
    server(const server &) = delete;
    server &operator=(const server &) = delete;
    ~server() { meshshm_server_close(s_); }

    /// The next request, or nullopt when timeout passes first (negative: wait forever).
    std::optional<request> next(std::chrono::milliseconds timeout = std::chrono::milliseconds(-1)) const {
        request r;
        auto ms = timeout.count() < 0 ? -1 : static_cast<std::int32_t>(std::min<long long>(timeout.count(), INT32_MAX));
        int rc = meshshm_server_next_with_headers(s_, r.native(), r.native_headers(), ms);
        if (rc == MESHSHM_ERR_TIMEOUT) return std::nullopt;
        detail::check(rc);
        return r;
    }

    /// Answer request id with status (0 = OK), body, and an optional message.
    void reply(std::uint64_t id, bytes_view body, std::uint32_t st = status::ok, std::string_view message = {}) const {
        std::string msg(message);
        detail::check(meshshm_server_reply_message(s_, id, static_cast<std::int32_t>(st), msg.empty() ? nullptr : msg.c_str(),
                                                   body.data(), body.size()));
    }
    void reply(const request &r, bytes_view body, std::uint32_t st = status::ok, std::string_view message = {}) const {
        reply(r.id(), body, st, message);
    }

    /// Whether no one waits for the answer to request id any more (its caller
    /// timed out or went away, or it was answered): a long handler can check
    /// now and then and give up; a reply to such a request is dropped. Never waits.
    bool is_cancelled(std::uint64_t id) const { return detail::check(meshshm_server_is_cancelled(s_, id)) == 1; }
    bool is_cancelled(const request &r) const { return is_cancelled(r.id()); }

    meshshm_server *native_handle() const noexcept { return s_; }

private:
    explicit server(meshshm_server *s) noexcept : s_(s) {}
    meshshm_server *s_;
};

/// The version of the linked libmeshshm.
inline std::string_view version() noexcept { return meshshm_version(); }

}  // namespace meshshm

#endif  // MESHSHM_HPP
