// Named failpoints inside the native module: code points where the chaos harness or a test injects a
// fault, armed by the same environment variable and syntax as the Python registry
// (resilient/failpoints.py), read once on first use:
//
//   RESILIENT_FAILPOINTS="native.send.mid_stream=1*panic,native.recv.before_ack=sleep(500)"
//
// Terms are separated by ',' or ';'; each is name=[K>][N*]action (K>: the first K hits of each process
// pass; N*: at most N firings). Actions: panic (_exit(137), no clean-up),
// sleep(ms), raise (FailpointFired, which Python sees as resilient.errors.FailpointError), enospc
// (FailpointFired with ENOSPC, seen as OSError(ENOSPC)), off. Names this module does not mark are ignored
// here (they belong to the Python side). N* limits the firings to N per process, or per directory when
// $RESILIENT_FAILPOINTS_STATE names one: each firing then claims a file <dir>/<name>.<k> (k < N), so a
// worker respawned from the same environment does not fire again.
//
// Every firing is reported before its action (so even panic leaves a trace) through the reporter the
// Python module installs (events.emit("failpoint.fired", ...)); without one, a JSON line goes to
// $RESILIENT_EVENT_LOG. Unarmed, hit() costs one relaxed atomic load.
//
// The points (see docs/chaos.md): native.copy.after_data, native.seal.before_flip,
// native.seal.after_flip, native.send.after_header, native.send.mid_stream, native.recv.mid_stream,
// native.recv.before_ack.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

namespace resilient {
namespace fp {

// Thrown by the raise and enospc actions (err = 0 for raise, ENOSPC for enospc).
struct FailpointFired : std::runtime_error {
  int err;
  FailpointFired(int e, const std::string& what) : std::runtime_error(what), err(e) {}
};

// Called with the point's name and the action's spec text before the action runs; may be called
// from any thread (the Python reporter takes the GIL).
using Reporter = void (*)(const char* name, const char* action);

void set_reporter(Reporter reporter);
// The reporter used when none is set: one JSON line appended to $RESILIENT_EVENT_LOG (if set).
void write_event_line(const char* name, const char* action);
// True when at least one term is armed (reads the environment on first use).
bool any_armed();
// True when `name` is armed (and has firings left in this process).
bool armed(const char* name);
// The names of the points this module marks.
const std::vector<std::string>& names();
// Marks the point `name`: runs its action when armed.
void hit(const char* name);
// The armed terms as "name=action" text, joined by ','.
std::string armed_spec();
// Replaces the armed terms (tests); an unparsable term throws std::invalid_argument.
void configure(const std::string& spec);

}  // namespace fp
}  // namespace resilient
