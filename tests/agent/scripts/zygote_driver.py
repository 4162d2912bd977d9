"""Drive a real zygote the way the agent does, in a process of its own (it becomes a child subreaper).

    python zygote_driver.py OUT_DIR MODE      MODE: standby | fork | close | interrupt

``standby``: fork a standby, warm it to 600 MB of anonymous memory, wait until it holds that much, activate
it as ``fault_probe.py``; ``fork``: the same probe forked the plain way; ``close``: fork a standby and
close it unused; ``interrupt``: tell a standby to warm to 6 GB (less where the host's memory caps it) and
activate it as soon as its warm-up is under way. Writes ``OUT_DIR/driver.json`` with the pids, the exit code reaped with waitpid and, for
``close``, whether the standby is gone; for ``interrupt``, how much the warm-up would have faulted in.
"""

import json
import os
import sys

from resilient.agent.zygote import ZygoteClient, _meminfo, anon_bytes_of, launch_request, warm_budget
from resilient.testing.etcd import wait_until

WARM = 600 << 20
out, mode = sys.argv[1], sys.argv[2]
probe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_probe.py")
zyg = ZygoteClient(dict(os.environ))
assert zyg.wait_ready(60), zyg.why
result: dict = {"mode": mode, "driver_pid": os.getpid()}
env = dict(os.environ, PROBE_OUT=out, PROBE_TAG="from-env")
request = launch_request(target=probe, args=["--mb", "256"], module=False, env=env, cwd=out,
                         stdout=os.path.join(out, "probe.out"), stderr=os.path.join(out, "probe.err"))
if mode == "fork":
    pid = zyg.fork(**request)
else:
    sb = zyg.standby()
    result["standby_pid"] = sb.pid
    if mode == "close":
        sb.close()
        result["gone"] = not os.path.exists(f"/proc/{sb.pid}")
        zyg.close()
        json.dump(result, open(os.path.join(out, "driver.json"), "w"))
        sys.exit(0)
    if mode == "interrupt":
        big, have, mem = 6 << 30, anon_bytes_of(sb.pid), _meminfo()
        result["warm_target"] = have + warm_budget(big, have, mem.get("MemAvailable"), mem.get("MemTotal"))
        sb.warm(big)
        result["warm_anon"] = wait_until(lambda: (held := anon_bytes_of(sb.pid)) >= have + (256 << 20) and held,
                                         60, "the standby's warm-up to get under way")
    else:
        sb.warm(WARM)
        result["warm_anon"] = wait_until(lambda: (held := anon_bytes_of(sb.pid)) >= WARM and held, 60,
                                         "the standby's heap to reach 600 MB")
    pid = sb.activate(request)
result["pid"] = pid
_, status = os.waitpid(pid, 0)  # a child of this process (re-parented), like the agent's workers
result["exitcode"] = os.waitstatus_to_exitcode(status)
zyg.close()
json.dump(result, open(os.path.join(out, "driver.json"), "w"))
