#include "failpoint.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <regex>
#include <vector>

namespace resilient {
namespace fp {
namespace {

constexpr int kPanicExitCode = 137;
constexpr const char* kPrefix = "native.";

struct Term {
  std::string kind;  // panic | sleep | raise | enospc
  double arg = 0;    // sleep: milliseconds
  long count = -1;   // firings left in this process; -1 = unlimited
  long limit = -1;   // the N of N*, for claims in the state directory
  long skip = 0;     // hits still to let pass (K>)
  std::string spec;
};

std::mutex g_mu;
std::map<std::string, Term> g_terms;
std::atomic<bool> g_armed{false};
std::atomic<Reporter> g_reporter{nullptr};
std::once_flag g_once;
std::string g_state_dir;

std::vector<std::string> split_terms(const std::string& spec) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : spec) {
    if (c == ',' || c == ';') {
      out.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  out.push_back(cur);
  return out;
}

std::string trim(const std::string& s) {
  size_t a = s.find_first_not_of(" \t\n"), b = s.find_last_not_of(" \t\n");
  return a == std::string::npos ? std::string() : s.substr(a, b - a + 1);
}

// Parses spec into terms; throws std::invalid_argument naming the bad term.
std::map<std::string, Term> parse(const std::string& spec) {
  static const std::regex action_re(R"(^(?:(\d+)>)?(?:(\d+)\*)?([a-z_]+)(?:\(([^()]*)\))?$)");
  std::map<std::string, Term> terms;
  for (const std::string& raw : split_terms(spec)) {
    std::string term = trim(raw);
    if (term.empty()) continue;
    size_t eq = term.find('=');
    if (eq == std::string::npos || eq == 0)
      throw std::invalid_argument("failpoint term '" + term + "' is not of the form name=action");
    std::string name = trim(term.substr(0, eq)), action = trim(term.substr(eq + 1));
    std::smatch m;
    if (!std::regex_match(action, m, action_re))
      throw std::invalid_argument("failpoint " + name + " has action '" + action +
                                  "', which is not of the form [K>][N*]action[(arg)]");
    Term t;
    t.kind = m[3].str();
    if (t.kind == "off") {
      terms.erase(name);
      continue;
    }
    if (t.kind != "panic" && t.kind != "sleep" && t.kind != "raise" && t.kind != "enospc")
      throw std::invalid_argument("failpoint " + name + " has unknown action '" + t.kind +
                                  "'; use panic, sleep(ms), raise, enospc or off");
    if (t.kind == "sleep") {
      if (!m[4].matched) throw std::invalid_argument("failpoint " + name + ": sleep needs milliseconds, e.g. sleep(100)");
      char* end = nullptr;
      std::string arg = m[4].str();
      t.arg = std::strtod(arg.c_str(), &end);
      if (end == arg.c_str() || *end != '\0' || t.arg < 0)
        throw std::invalid_argument("failpoint " + name + ": sleep takes a non-negative number of ms, got '" + arg + "'");
    } else if (m[4].matched) {
      throw std::invalid_argument("failpoint " + name + ": action " + t.kind + " takes no argument");
    }
    if (m[1].matched) t.skip = std::strtol(m[1].str().c_str(), nullptr, 10);
    if (m[2].matched) t.count = t.limit = std::strtol(m[2].str().c_str(), nullptr, 10);
    t.spec = action;
    if (name.compare(0, std::char_traits<char>::length(kPrefix), kPrefix) == 0) terms[name] = t;
  }
  return terms;
}

void install(std::map<std::string, Term> terms) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_terms = std::move(terms);
  g_armed.store(!g_terms.empty(), std::memory_order_release);
}

void load_env() {
  std::call_once(g_once, [] {
    const char* state = std::getenv("RESILIENT_FAILPOINTS_STATE");
    g_state_dir = state ? state : "";
    const char* spec = std::getenv("RESILIENT_FAILPOINTS");
    if (!spec || !*spec) return;
    try {
      install(parse(spec));
    } catch (const std::invalid_argument& e) {
      std::fprintf(stderr, "resilient._native: ignoring $RESILIENT_FAILPOINTS: %s\n", e.what());
    }
  });
}

// True when this firing may go ahead: a claim file in the state directory (N* terms), or no directory.
bool claim(const std::string& name, long limit) {
  if (g_state_dir.empty() || limit < 0) return true;
  for (size_t i = 1; i <= g_state_dir.size(); ++i)  // mkdir -p
    if (i == g_state_dir.size() || g_state_dir[i] == '/') ::mkdir(g_state_dir.substr(0, i).c_str(), 0755);
  for (long k = 0; k < limit; ++k) {
    std::string path = g_state_dir + "/" + name + "." + std::to_string(k);
    int fd = ::open(path.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644);
    if (fd >= 0) {
      ::close(fd);
      return true;
    }
    if (errno != EEXIST) return true;  // no usable directory: per-process counting only
  }
  return false;
}

}  // namespace

void write_event_line(const char* name, const char* action) {
  const char* path = std::getenv("RESILIENT_EVENT_LOG");
  if (!path || !*path) return;
  int fd = ::open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return;
  timespec wall{}, mono{};
  clock_gettime(CLOCK_REALTIME, &wall);
  clock_gettime(CLOCK_MONOTONIC, &mono);
  char line[1024];
  int n = std::snprintf(line, sizeof line,
                        "{\"ts\":%.6f,\"mono\":%.6f,\"kind\":\"failpoint.fired\",\"pid\":%d,\"name\":\"%s\","
                        "\"action\":\"%s\",\"native\":true}\n",
                        wall.tv_sec + wall.tv_nsec / 1e9, mono.tv_sec + mono.tv_nsec / 1e9,
                        static_cast<int>(::getpid()), name, action);
  if (n > 0) {
    ssize_t w = ::write(fd, line, static_cast<size_t>(std::min<int>(n, sizeof line - 1)));
    (void)w;
  }
  ::close(fd);
}

namespace {

void sleep_ms(double ms) {
  long long ns = static_cast<long long>(ms * 1e6);
  timespec ts{static_cast<time_t>(ns / 1000000000LL), static_cast<long>(ns % 1000000000LL)};
  while (::nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

}  // namespace

const std::vector<std::string>& names() {
  static const std::vector<std::string> kNames = {
      "native.copy.after_data",   "native.seal.before_flip", "native.seal.after_flip",
      "native.send.after_header", "native.send.mid_stream",  "native.recv.mid_stream",
      "native.recv.before_ack"};
  return kNames;
}

void set_reporter(Reporter reporter) { g_reporter.store(reporter); }

bool any_armed() {
  load_env();
  return g_armed.load(std::memory_order_acquire);
}

bool armed(const char* name) {
  if (!any_armed()) return false;
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_terms.find(name);
  return it != g_terms.end() && it->second.count != 0;
}

void hit(const char* name) {
  if (!any_armed()) return;
  Term t;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_terms.find(name);
    if (it == g_terms.end() || it->second.count == 0) return;
    if (it->second.skip > 0) {
      --it->second.skip;
      return;
    }
    if (!claim(name, it->second.limit)) {
      it->second.count = 0;
      return;
    }
    if (it->second.count > 0) --it->second.count;
    t = it->second;
  }
  Reporter reporter = g_reporter.load();
  if (reporter != nullptr)
    reporter(name, t.spec.c_str());
  else
    write_event_line(name, t.spec.c_str());
  if (t.kind == "panic") {
    std::fflush(nullptr);
    ::_exit(kPanicExitCode);
  }
  if (t.kind == "sleep") sleep_ms(t.arg);
  if (t.kind == "raise")
    throw FailpointFired(0, std::string("Failpoint '") + name +
                                "' fired (action raise); this failure was injected on purpose.");
  if (t.kind == "enospc")
    throw FailpointFired(ENOSPC, std::string("No space left on device (injected by failpoint '") + name + "')");
}

std::string armed_spec() {
  load_env();
  std::lock_guard<std::mutex> lock(g_mu);
  std::string out;
  for (const auto& kv : g_terms) {
    if (!out.empty()) out += ",";
    out += kv.first + "=" + kv.second.spec;
  }
  return out;
}

void configure(const std::string& spec) {
  load_env();
  install(parse(spec));
}

}  // namespace fp
}  // namespace resilient
