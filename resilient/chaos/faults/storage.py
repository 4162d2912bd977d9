"""Storage faults: flip bytes of a replica held for another host, and fill the persist disk."""

from __future__ import annotations

import os
import struct
import time
from typing import Any

import psutil

from resilient.chaos.faults.base import Driver, Injection, need_host, param_number
from resilient.chaos.scenario import Fault, ScenarioError, Topology
from resilient.errors import ChaosError


class CorruptReplica(Driver):
    """Flip params.nbytes (default 64) bytes at the start of the data area of both slots of a segment that
    the target host's agent maps but none of its workers does (a copy held for another host, not a local
    snapshot), so the committed step's copy is corrupted whichever slot holds it."""

    name = "corrupt_replica"
    reactions = ("ckpt.verify_failed",)
    accepts_params = ("nbytes",)

    @classmethod
    def validate(cls, target, params, topology: Topology, where: str) -> None:
        need_host(target, topology, where)
        param_number(params, "nbytes", 64, where)
        if len(topology.hosts) < 2:
            raise ScenarioError(f"{where}: a replica on another host needs at least two hosts.")

    def inject(self, fault: Fault, cluster: Any) -> Injection:
        # The runtime drops and re-creates replica segments as commits move on: a file listed a moment ago
        # may be gone when opened. Try again for a short while before giving up.
        deadline = time.monotonic() + 1.0
        while True:
            try:
                return self._inject_once(fault, cluster)
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _inject_once(self, fault: Fault, cluster: Any) -> Injection:
        name = fault.target["host"]
        host = cluster.hosts[name]
        if not host.running():
            raise ChaosError(f"Fault {fault.id}: host {name} is not running.")
        agent = [psutil.Process(host.pid)]
        worker_procs = [p for p in host.processes() if p.pid != host.pid]
        agent_segs = cluster.segments_of(name, agent)
        local = cluster.segments_of(name, worker_procs) if worker_procs else set()
        # A copy held for a peer: mapped by the agent and by none of its workers, and present in the host's
        # shm directory now (a mapping may outlive its unlinked file when a segment is re-created). The
        # runtime also names them ``...rep.r<rank>`` (``resilient.replication.local``): prefer those.
        present = cluster.segments_of(name)
        candidates = sorted((agent_segs - local) & present, key=lambda p: (".rep." not in os.path.basename(p), p))
        if not candidates:
            raise ChaosError(f"Fault {fault.id}: host {name}'s agent holds no replica segment for another host "
                             f"(it maps {sorted(agent_segs)}; the directory holds {sorted(present)}).")
        seg = candidates[0]
        size = os.stat(seg).st_size
        nbytes = int(fault.params.get("nbytes", 64))
        offsets = _data_offsets(seg, size, nbytes)
        flipped = 0
        with open(seg, "r+b") as fh:
            for start in offsets:
                fh.seek(start)
                data = bytearray(fh.read(nbytes))
                for i in range(len(data)):
                    data[i] ^= 0xFF
                fh.seek(start)
                fh.write(bytes(data))
                flipped += len(data)
        return Injection(fields={"host": name, "segment": seg, "offsets": offsets, "nbytes": flipped, "size": size})


def _data_offsets(path: str, size: int, nbytes: int) -> list[int]:
    """Where to flip bytes so that whichever slot holds the committed step is hit: the start of the data
    area of both slots (``resilient.store.layout``); the middle of the file when it is not a segment."""
    from resilient.store import layout

    try:
        with open(path, "rb") as fh:
            raw = fh.read(layout.HEADER.size)
        fields = layout.HEADER.unpack(raw)
    except (OSError, ValueError, struct.error):
        fields = None
    if fields is None or fields[0] != layout.MAGIC:
        return [max(0, size // 2 - nbytes // 2)]
    data_offset, stride = int(fields[10]), int(fields[11])
    return [data_offset + s * stride for s in (0, 1) if data_offset + s * stride + nbytes <= size]


class DiskFull(Driver):
    """Fill the persist tmpfs (runtime.persist_tmpfs_kb) so only params.leave_kb remain; heal frees it."""

    name = "disk_full"
    requires = ("root", "tmpfs")
    reactions = ("persist.failed",)
    accepts_params = ("leave_kb",)
    accepts_target = ()

    @classmethod
    def validate(cls, target, params, topology: Topology, where: str) -> None:
        param_number(params, "leave_kb", 0, where)

    def inject(self, fault: Fault, cluster: Any) -> Injection:
        d = cluster.persist_dir
        if d is None or not cluster.persist_mounted:
            raise ChaosError(f"Fault {fault.id}: disk_full needs runtime.persist_every and persist_tmpfs_kb.")
        filler = d / ".chaos-filler"
        leave = int(float(fault.params.get("leave_kb", 0)) * 1024)
        st = os.statvfs(d)
        free = st.f_bavail * st.f_frsize
        want = max(0, free - leave)
        written = 0
        with open(filler, "wb") as fh:
            chunk = b"\0" * 65536
            try:
                while written < want:
                    n = fh.write(chunk[: min(len(chunk), want - written)])
                    written += n
                fh.flush()
                os.fsync(fh.fileno())
            except OSError:
                pass  # the disk is full: exactly the state wanted
        st = os.statvfs(d)
        return Injection(fields={"dir": str(d), "filled_bytes": written, "free_bytes": st.f_bavail * st.f_frsize},
                         state=filler)

    def heal(self, fault: Fault, cluster: Any, injection: Injection) -> dict[str, Any] | None:
        try:
            os.unlink(injection.state)
        except FileNotFoundError:
            pass
        st = os.statvfs(cluster.persist_dir)
        return {"free_bytes": st.f_bavail * st.f_frsize}
