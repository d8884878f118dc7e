// GoogleTest tests of meshshm.hpp against the real proxy ($MESHSHM_PROXY),
// started on a socket in a fresh temporary directory by a test environment.
#include <meshshm.hpp>

#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

extern char **environ;

using namespace std::chrono_literals;

namespace {

std::string g_dir, g_sock;
pid_t g_proxy = 0;

int free_port() {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    bind(fd, reinterpret_cast<sockaddr *>(&a), sizeof a);
    getsockname(fd, reinterpret_cast<sockaddr *>(&a), &len);
    close(fd);
    return ntohs(a.sin_port);
}

class ProxyEnv : public ::testing::Environment {
public:
    void SetUp() override {
        const char *bin = std::getenv("MESHSHM_PROXY");
        ASSERT_TRUE(bin && *bin) << "set MESHSHM_PROXY to the meshshm-proxy binary";
        const char *tmp = std::getenv("TMPDIR");
        std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/meshshm-cpp-XXXXXX";
        ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
        g_dir = tmpl;
        g_sock = g_dir + "/proxy.sock";
        std::string tcp = "127.0.0.1:" + std::to_string(free_port());
        std::string log = g_dir + "/proxy.log";
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
        posix_spawn_file_actions_adddup2(&fa, 1, 2);
        std::vector<char *> argv{const_cast<char *>(bin), const_cast<char *>("--socket"), g_sock.data(),
                                 const_cast<char *>("--tcp"), tcp.data(), nullptr};
        ASSERT_EQ(posix_spawn(&g_proxy, bin, &fa, nullptr, argv.data(), environ), 0);
        posix_spawn_file_actions_destroy(&fa);
        for (int i = 0; i < 300; i++) {
            try {
                meshshm::client::connect(g_sock);
                return;
            } catch (const meshshm::connect_error &) {
                std::this_thread::sleep_for(50ms);
            }
        }
        FAIL() << "the proxy did not come up";
    }

    void TearDown() override {
        if (g_proxy > 0) {
            kill(g_proxy, SIGTERM);
            int st;
            for (int i = 0; i < 100 && waitpid(g_proxy, &st, WNOHANG) == 0; i++) std::this_thread::sleep_for(50ms);
            if (kill(g_proxy, 0) == 0) {
                kill(g_proxy, SIGKILL);
                waitpid(g_proxy, &st, 0);
            }
        }
        unlink((g_dir + "/proxy.log").c_str());
        unlink(g_sock.c_str());
        rmdir(g_dir.c_str());
    }
};

const auto *const env = ::testing::AddGlobalTestEnvironment(new ProxyEnv);

}  // namespace

class EchoSizes : public ::testing::TestWithParam<std::size_t> {};

TEST_P(EchoSizes, RoundTrip) {
    auto c = meshshm::client::connect(g_sock);
    std::vector<std::uint8_t> body(GetParam());
    std::mt19937 rng(static_cast<unsigned>(GetParam()));
    for (auto &b : body) b = static_cast<std::uint8_t>(rng());
    meshshm::buffer r = c.call("echo", "Echo", body, 10s);
    ASSERT_EQ(r.size(), body.size());
    EXPECT_TRUE(std::equal(body.begin(), body.end(), r.data()));
}

INSTANTIATE_TEST_SUITE_P(Sizes, EchoSizes, ::testing::Values(0, 1, 1024, 65536, 1 << 20, 5 << 20));

TEST(Client, StringViewBodies) {
    auto c = meshshm::client::connect(g_sock);
    EXPECT_EQ(c.call("echo", "Echo", "literal").view(), "literal");
    std::string s = "a std::string";
    EXPECT_EQ(c.call("echo", "Echo", s).str(), s);
    EXPECT_TRUE(c.call("echo", "Echo").empty());
}

TEST(Client, UnknownServiceThrowsStatusError) {
    auto c = meshshm::client::connect(g_sock);
    try {
        c.call("no-such-service", "Get", "x");
        FAIL() << "no exception";
    } catch (const meshshm::status_error &e) {
        EXPECT_EQ(e.status(), meshshm::status::not_found);
        EXPECT_EQ(e.status_name(), "not found");
        EXPECT_EQ(e.code(), MESHSHM_ERR_STATUS);
    }
}

TEST(Client, TimeoutAgainstSilentServer) {
    auto silent = meshshm::server::bind("cpp-silent", g_sock);
    auto c = meshshm::client::connect(g_sock);
    EXPECT_THROW(c.call("cpp-silent", "Wait", "x", 200ms), meshshm::timeout_error);
}

TEST(Client, ProxyNotRunning) {
    std::string path = g_dir + "/nobody.sock";
    EXPECT_THROW(meshshm::client::connect(path), meshshm::connect_error);
    EXPECT_THROW(meshshm::server::bind("svc", path), meshshm::connect_error);
    try {
        meshshm::client::connect(path);
    } catch (const meshshm::error &e) {
        EXPECT_NE(std::string(e.what()).find("nobody.sock"), std::string::npos);
    }
}

TEST(Client, ConcurrentThreads) {
    auto c = meshshm::client::connect(g_sock);
    std::atomic<int> failures{0};
    std::vector<std::thread> ts;
    for (int t = 0; t < 8; t++) {
        ts.emplace_back([&, t] {
            for (int i = 0; i < 200; i++) {
                std::string body = "thread " + std::to_string(t) + " call " + std::to_string(i);
                try {
                    if (c.call("echo", "Echo", body).view() != body) failures++;
                } catch (...) {
                    failures++;
                }
            }
        });
    }
    for (auto &t : ts) t.join();
    EXPECT_EQ(failures.load(), 0);
}

TEST(Client, AsyncWithFd) {
    auto c = meshshm::client::connect(g_sock);
    int fd = c.fd();
    ASSERT_GE(fd, 0);
    for (std::uint64_t i = 0; i < 32; i++) c.send("echo", "Echo", "async " + std::to_string(i), i);
    int got = 0;
    while (got < 32) {
        pollfd p{fd, POLLIN, 0};
        ASSERT_EQ(::poll(&p, 1, 10000), 1);
        for (auto &done : c.poll()) {
            ASSERT_TRUE(done.ok()) << done.error;
            EXPECT_EQ(done.take().view(), "async " + std::to_string(done.user_data));
            got++;
        }
    }
    c.send("nowhere", "X", {}, 99);
    auto done = c.poll(1, 10s);
    ASSERT_EQ(done.size(), 1u);
    EXPECT_THROW(done[0].take(), meshshm::status_error);
}

TEST(Server, CppServerCppClient) {
    auto srv = meshshm::server::bind("cpp-upper", g_sock);
    std::thread t([&] {
        for (int n = 0; n < 2; n++) {
            auto req = srv.next(5s);
            if (!req) return;
            if (req->method() == "fail") {
                srv.reply(*req, {}, meshshm::status::permission_denied, "not you");
                continue;
            }
            std::string up(req->body());
            for (auto &ch : up) ch = static_cast<char>(toupper(ch));
            srv.reply(*req, "cpp:" + up);
        }
    });
    auto c = meshshm::client::connect(g_sock);
    EXPECT_EQ(c.call("cpp-upper", "Up", "hello").view(), "cpp:HELLO");
    try {
        c.call("cpp-upper", "fail");
        ADD_FAILURE() << "no exception";
    } catch (const meshshm::status_error &e) {
        EXPECT_EQ(e.status(), meshshm::status::permission_denied);
        EXPECT_NE(std::string(e.what()).find("not you"), std::string::npos);
    }
    t.join();
    EXPECT_FALSE(srv.next(10ms).has_value());
}

TEST(Server, HeadersAndPriorityReachTheServer) {
    auto srv = meshshm::server::bind("cpp-describe", g_sock);
    // Answers "<priority>|name=value|..." with what reached the server.
    std::thread t([&] {
        for (int n = 0; n < 3; n++) {
            auto req = srv.next(5s);
            if (!req) return;
            std::string out = std::to_string(req->priority());
            for (auto [k, v] : req->headers()) out += "|" + std::string(k) + "=" + std::string(v);
            if (auto tr = req->header("x-trace")) out += "|first x-trace=" + std::string(*tr);
            srv.reply(*req, out);
        }
    });
    auto c = meshshm::client::connect(g_sock);
    using namespace std::string_literals;
    auto opts = meshshm::call_options()
                    .with_timeout(5s)
                    .with_priority(meshshm::priority::high)
                    .header("x-trace", "abc")
                    .header("x-bin", "a\0b"s);
    EXPECT_EQ(c.call("cpp-describe", "M", "x", opts).view(), "2|x-trace=abc|x-bin=a\0b|first x-trace=abc"s);
    EXPECT_EQ(c.call("cpp-describe", "M", "x").view(), "1");  // the plain call: normal priority
    c.send("cpp-describe", "M", {}, 5, meshshm::call_options().with_priority(meshshm::priority::low).header("k", "v"));
    auto done = c.poll(1, 10s);
    ASSERT_EQ(done.size(), 1u);
    EXPECT_EQ(done[0].user_data, 5u);
    EXPECT_EQ(done[0].take().view(), "0|k=v");
    t.join();
    EXPECT_THROW(c.call("cpp-describe", "M", {}, meshshm::call_options().header("", "v")),
                 meshshm::invalid_argument_error);
    EXPECT_THROW(c.call("cpp-describe", "M", {}, meshshm::call_options().header("a\0b"s, "v")),
                 meshshm::invalid_argument_error);
}

TEST(Server, IsCancelledAfterTheCallerTimesOut) {
    auto srv = meshshm::server::bind("cpp-hold", g_sock);
    EXPECT_TRUE(srv.is_cancelled(987654321));  // never handed out
    auto c = meshshm::client::connect(g_sock);
    c.send("cpp-hold", "Slow", {}, 1, meshshm::call_options().with_timeout(1s));
    auto req = srv.next(5s);
    ASSERT_TRUE(req.has_value());
    EXPECT_FALSE(srv.is_cancelled(*req));  // the caller still waits
    auto until = std::chrono::steady_clock::now() + 10s;
    bool cancelled = false;
    while (!(cancelled = srv.is_cancelled(*req)) && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(20ms);
    EXPECT_TRUE(cancelled);
    auto done = c.poll(1, 10s);
    ASSERT_EQ(done.size(), 1u);
    EXPECT_EQ(done[0].result, MESHSHM_ERR_TIMEOUT);
    srv.reply(*req, "late");  // dropped, not an error

    c.send("cpp-hold", "Fast", {}, 2);
    auto r2 = srv.next(5s);
    ASSERT_TRUE(r2.has_value());
    EXPECT_FALSE(srv.is_cancelled(*r2));
    srv.reply(*r2, "ok");
    EXPECT_TRUE(srv.is_cancelled(*r2));  // answered
    auto d2 = c.poll(1, 10s);
    ASSERT_EQ(d2.size(), 1u);
    EXPECT_EQ(d2[0].take().view(), "ok");
}

TEST(Library, Version) { EXPECT_EQ(meshshm::version(), "0.1.0"); }
