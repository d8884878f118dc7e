// Median round trip of a 1 KiB echo call from C++: meshshm_cpp_latency SOCKET [CALLS]
#include <meshshm.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s SOCKET [CALLS]\n", argv[0]);
        return 64;
    }
    int calls = argc > 2 ? std::atoi(argv[2]) : 2000;
    auto client = meshshm::client::connect(argv[1]);
    std::string body(1024, 'x');
    std::vector<double> t;
    t.reserve(calls);
    for (int i = -calls / 10; i < calls; i++) {
        auto t0 = std::chrono::steady_clock::now();
        auto r = client.call("echo", "Echo", body);
        auto dt = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
        if (r.size() != body.size()) return 1;
        if (i >= 0) t.push_back(dt);
    }
    std::sort(t.begin(), t.end());
    std::printf("c++: %d calls of 1024 B: median %.1f us, p99 %.1f us\n", calls, t[calls / 2], t[calls * 99 / 100]);
}
