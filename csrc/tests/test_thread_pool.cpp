#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "ckptio/errors.hpp"
#include "ckptio/thread_pool.hpp"
#include "harness.hpp"

using ckptio::ThreadPool;

namespace {

bool runs_every_index_once(ThreadPool& pool, std::size_t n) {
  std::vector<std::atomic<int>> hits(n);
  pool.parallel_for(n, [&](std::size_t i) { hits[i].fetch_add(1); });
  for (auto& h : hits) {
    if (h.load() != 1) return false;
  }
  return true;
}

}  // namespace

TEST(pool_runs_every_index_once) {
  for (std::size_t threads : {1, 2, 4, 7}) {
    ThreadPool pool(threads);
    CHECK_EQ(pool.size(), threads);
    for (std::size_t n : {1, 2, 3, 10, 1000, 10007}) CHECK(runs_every_index_once(pool, n));
  }
}

TEST(pool_zero_items_calls_nothing) {
  ThreadPool pool(4);
  bool called = false;
  pool.parallel_for(0, [&](std::size_t) { called = true; });
  CHECK(!called);
}

TEST(pool_zero_threads_is_invalid) {
  CHECK_THROWS(ThreadPool(0), ckptio::InvalidArgument);
}

TEST(pool_single_thread_runs_on_caller) {
  ThreadPool pool(1);
  const auto me = std::this_thread::get_id();
  bool all_mine = true;
  std::size_t count = 0;
  pool.parallel_for(500, [&](std::size_t) {
    all_mine = all_mine && std::this_thread::get_id() == me;
    ++count;
  });
  CHECK(all_mine);
  CHECK_EQ(count, 500u);
}

TEST(pool_uses_workers) {
  ThreadPool pool(4);
  std::atomic<int> inside{0};
  std::atomic<int> peak{0};
  pool.parallel_for(64, [&](std::size_t) {
    const int now = inside.fetch_add(1) + 1;
    int p = peak.load();
    while (now > p && !peak.compare_exchange_weak(p, now)) {
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    inside.fetch_sub(1);
  });
  CHECK(peak.load() > 1);
}

TEST(pool_exception_propagates_and_stops_new_work) {
  ThreadPool pool(4);
  std::atomic<std::size_t> started{0};
  try {
    pool.parallel_for(100000, [&](std::size_t i) {
      started.fetch_add(1);
      if (i == 10) throw std::runtime_error("boom at 10");
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    });
    CHECK(false);
  } catch (const std::runtime_error& e) {
    CHECK_EQ(std::string(e.what()), "boom at 10");
  }
  CHECK(started.load() < 100000u);
  // The pool is still usable afterwards.
  CHECK(runs_every_index_once(pool, 1000));
}

TEST(pool_first_of_many_exceptions_is_rethrown) {
  for (std::size_t threads : {1, 3}) {
    ThreadPool pool(threads);
    CHECK_THROWS(pool.parallel_for(1000, [](std::size_t i) { throw std::logic_error(std::to_string(i)); }),
                 std::logic_error);
  }
}

TEST(pool_concurrent_callers_share_one_pool) {
  ThreadPool pool(3);
  std::atomic<bool> ok{true};
  auto caller = [&](std::uint64_t salt) {
    for (int round = 0; round < 200; ++round) {
      const std::size_t n = 100 + static_cast<std::size_t>(round);
      std::vector<std::uint64_t> out(n, 0);
      pool.parallel_for(n, [&](std::size_t i) { out[i] = i * salt; });
      for (std::size_t i = 0; i < n; ++i) {
        if (out[i] != i * salt) ok = false;
      }
    }
  };
  std::thread a(caller, 3);
  std::thread b(caller, 5);
  caller(7);
  a.join();
  b.join();
  CHECK(ok.load());
}

TEST(pool_nested_parallel_for_does_not_deadlock) {
  ThreadPool pool(2);
  std::atomic<int> total{0};
  pool.parallel_for(8, [&](std::size_t) {
    pool.parallel_for(8, [&](std::size_t) { total.fetch_add(1); });
  });
  CHECK_EQ(total.load(), 64);
}

TEST(shared_pool_is_reused_and_recreated_on_count_change) {
  auto a = ckptio::shared_pool(3);
  auto b = ckptio::shared_pool(3);
  CHECK(a.get() == b.get());
  CHECK_EQ(a->size(), 3u);
  auto c = ckptio::shared_pool(2);
  CHECK(c.get() != a.get());
  CHECK_EQ(c->size(), 2u);
  CHECK(runs_every_index_once(*a, 100));  // the old one stays alive for its holders
  CHECK(runs_every_index_once(*c, 100));
  CHECK_THROWS(ckptio::shared_pool(0), ckptio::InvalidArgument);
}

TEST(shared_pool_works_in_forked_child) {
  auto parent_pool = ckptio::shared_pool(3);
  CHECK(runs_every_index_once(*parent_pool, 1000));

  // Keep the parent's pool busy while forking, so its mutex is likely held at fork time.
  std::atomic<bool> stop{false};
  std::thread busy([&] {
    while (!stop.load()) {
      ckptio::shared_pool(3)->parallel_for(64, [](std::size_t) {});
    }
  });

  for (int round = 0; round < 5; ++round) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::alarm(20);  // a deadlock fails the test instead of hanging it
      int code = 0;
      auto child_pool = ckptio::shared_pool(3);
      if (child_pool.get() == parent_pool.get()) code = 1;
      if (!runs_every_index_once(*child_pool, 5000)) code = 2;
      // The inherited pool has no workers here; its loops run on the caller.
      if (!runs_every_index_once(*parent_pool, 100)) code = 3;
      auto smaller = ckptio::shared_pool(2);
      if (!runs_every_index_once(*smaller, 100)) code = 4;
      parent_pool.reset();  // must not join threads that do not exist
      child_pool.reset();
      ::_exit(code);
    }
    CHECK(pid > 0);
    int status = 0;
    CHECK_EQ(::waitpid(pid, &status, 0), pid);
    CHECK(WIFEXITED(status));
    if (WIFEXITED(status)) CHECK_EQ(WEXITSTATUS(status), 0);
  }
  stop = true;
  busy.join();
  CHECK(runs_every_index_once(*parent_pool, 1000));
}

TEST(run_on_own_threads_runs_every_index_and_rethrows_the_lowest_failure) {
  std::vector<std::atomic<int>> seen(40);
  std::atomic<int> distinct_threads{0};
  ckptio::run_on_own_threads(seen.size(), [&](std::size_t i) {
    seen[i]++;
    thread_local bool counted = false;
    if (!counted) {
      counted = true;
      distinct_threads++;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // all in flight at once
  });
  for (const auto& s : seen) CHECK_EQ(s.load(), 1);
  CHECK(distinct_threads.load() > 1);
  std::string message;
  try {
    ckptio::run_on_own_threads(8, [](std::size_t i) {
      if (i == 6 || i == 3) throw std::runtime_error("task " + std::to_string(i));
    });
  } catch (const std::runtime_error& e) {
    message = e.what();
  }
  CHECK_EQ(message, std::string("task 3"));
  ckptio::run_on_own_threads(0, [](std::size_t) { throw std::runtime_error("never"); });
}
