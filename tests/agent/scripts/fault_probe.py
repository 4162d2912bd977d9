"""Run as a worker by zygote_driver.py: count the page faults of allocating and filling ``--mb`` MB of
tensors, and report who and where it is and the anonymous memory it held when it started. Writes ``$PROBE_OUT/probe.json``; exits 7."""

import argparse
import json
import os
import resource

import torch

from resilient.agent.zygote import anon_bytes_of

anon_at_start = anon_bytes_of(os.getpid())
p = argparse.ArgumentParser()
p.add_argument("--mb", type=int, required=True)
args = p.parse_args()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
tensors = [torch.empty(16 << 20, dtype=torch.uint8).fill_(1) for _ in range(args.mb // 16)]
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
pages = args.mb * (1 << 20) // os.sysconf("SC_PAGE_SIZE")
with open(os.path.join(os.environ["PROBE_OUT"], "probe.json"), "w") as fh:
    json.dump({"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "tag": os.environ.get("PROBE_TAG"),
               "faults": faults, "pages": pages, "anon_at_start": anon_at_start}, fh)
print("probe ran")
raise SystemExit(7)
