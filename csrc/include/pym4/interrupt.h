// Ctrl-C in the core's long loops. The core stays Python-free: the binding installs a poll
// function on the calling thread for the duration of a call (interrupt::Scope), and the long
// loops call interrupt::check() once per serial outer iteration (a Sinkhorn iteration, an
// M4 mini-batch, an exact-solver pass). check() reads the clock and calls the poll only when
// kPeriod has passed since the last one, so an iteration pays a clock read (~20 ns) and a
// short call never polls at all. When the poll reports an interrupt, check() throws
// pym4::Interrupted, which unwinds the solve (its scratch memory freed, nothing returned) to
// the binding, and the binding raises the Python exception the poll left pending
// (KeyboardInterrupt for SIGINT). Buffers the caller passed in (out=, q) then hold
// unspecified values.
//
// Rule: check() may throw, so it is called only outside OpenMP parallel regions (no
// exception may cross one; it returns without polling when called inside one). A loop that
// runs inside a parallel region asks interrupt::pending() instead, which never throws (it
// polls only on the thread that installed the poll), leaves the region, then calls check().
// Plain C++17; no Python or pybind11 here.
#pragma once

#include <algorithm>
#include <chrono>
#include <exception>

#include "pym4/common.h"

namespace pym4 {

// The caller asked the solve to stop (Ctrl-C). Thrown only by interrupt::check().
struct Interrupted : std::exception {
  const char* what() const noexcept override { return "pym4: interrupted"; }
};

namespace interrupt {

// Returns true when the solve should stop. Called on the thread that installed it, from
// serial code, with no lock held by the core.
using Poll = bool (*)();

// The least time between two polls. A poll may wait for the GIL while another Python thread
// holds it (up to its 5 ms switch interval), so the next poll also comes at least 20 times
// that wait later: polling never costs more than ~5% of the work.
constexpr std::chrono::milliseconds kPeriod{10};

namespace detail {
struct State {
  Poll poll = nullptr;
  bool stopped = false;  // a poll said stop: every later check on this thread throws
  std::chrono::steady_clock::time_point next{};
};
inline State& state() {
  static thread_local State s;
  return s;
}
}  // namespace detail

// Installs `poll` (null: never poll, as on a thread that receives no signals) on this thread
// for the lifetime of the scope; the first poll comes kPeriod after it starts.
class Scope {
 public:
  explicit Scope(Poll poll) : saved_(detail::state()) {
    detail::State& s = detail::state();
    s.poll = poll;
    s.stopped = false;
    s.next = std::chrono::steady_clock::now() + kPeriod;
  }
  ~Scope() { detail::state() = saved_; }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  detail::State saved_;
};

// True once the poll has asked to stop; polls when kPeriod has passed. Never throws; safe
// on any thread and inside parallel regions (a thread without a poll always gets false).
inline bool pending() {
  detail::State& s = detail::state();
  if (s.stopped) return true;
  if (!s.poll) return false;
  const auto now = std::chrono::steady_clock::now();
  if (now < s.next) return false;
  s.stopped = s.poll();
  const auto after = std::chrono::steady_clock::now();
  s.next = after + std::max<std::chrono::steady_clock::duration>(kPeriod, 20 * (after - now));
  return s.stopped;
}

// Throws Interrupted when pending(); a no-op inside a parallel region (of any size: an
// exception leaving even a one-thread region terminates the process).
inline void check() {
#if defined(PYM4_WITH_OPENMP)
  if (omp_get_level() > 0) return;
#endif
  if (pending()) throw Interrupted();
}

}  // namespace interrupt
}  // namespace pym4
