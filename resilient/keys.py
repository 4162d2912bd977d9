"""The etcd key layout of a job, in one place (prefix ``/resilient/<job>/``).

| key                         | value (JSON)                                          | bound to   |
|-----------------------------|-------------------------------------------------------|------------|
| nodes/<node>                | agent address, slots, host, joined_at                 | node lease |
| waiting/<node>              | a node that wants into the next generation            | node lease |
| rdzv                        | round state: generation, status, participants, deadline | -        |
| gen/<g>                     | frozen assignment of generation g                     | -          |
| fault/<g>/<node>            | what failed, when                                     | -          |
| ckpt/<g>/<step>/<rank>      | shard manifest: bytes, checksum, holders              | -          |
| committed                   | last committed step (+ generation, world size)        | -          |
| persisted/latest            | manifest location of newest durable checkpoint        | -          |
| restarts                    | job-wide restart budget state                         | -          |
| progress/<node>             | last step seen on that node (for `resilient status`)  | node lease |
| closed                      | the job finished or failed (no new generation)        | -          |
| closer                      | the node that closes rendezvous rounds                | its lease  |
"""

from __future__ import annotations

ROOT = "/resilient"


class JobKeys:
    """Builds every key of one job; nothing else in the code base formats etcd keys."""

    def __init__(self, job: str) -> None:
        if not job or "/" in job:
            raise ValueError(f"job id {job!r} must be non-empty and contain no '/'")
        self.job = job
        self.prefix = f"{ROOT}/{job}/"

    def node(self, node: str) -> str:
        return f"{self.prefix}nodes/{node}"

    @property
    def nodes_prefix(self) -> str:
        return f"{self.prefix}nodes/"

    def waiting(self, node: str) -> str:
        return f"{self.prefix}waiting/{node}"

    @property
    def waiting_prefix(self) -> str:
        return f"{self.prefix}waiting/"

    @property
    def rdzv(self) -> str:
        return f"{self.prefix}rdzv"

    def gen(self, generation: int) -> str:
        return f"{self.prefix}gen/{generation:012d}"

    @property
    def gen_prefix(self) -> str:
        return f"{self.prefix}gen/"

    def fault(self, generation: int, node: str) -> str:
        return f"{self.prefix}fault/{generation:012d}/{node}"

    @property
    def fault_prefix(self) -> str:
        return f"{self.prefix}fault/"

    def ckpt(self, generation: int, step: int, rank: int) -> str:
        return f"{self.prefix}ckpt/{generation:012d}/{step:012d}/{rank:06d}"

    def ckpt_step_prefix(self, generation: int, step: int) -> str:
        return f"{self.prefix}ckpt/{generation:012d}/{step:012d}/"

    @property
    def ckpt_prefix(self) -> str:
        return f"{self.prefix}ckpt/"

    @property
    def committed(self) -> str:
        return f"{self.prefix}committed"

    @property
    def persisted_latest(self) -> str:
        return f"{self.prefix}persisted/latest"

    @property
    def restarts(self) -> str:
        return f"{self.prefix}restarts"

    def progress(self, node: str) -> str:
        return f"{self.prefix}progress/{node}"

    @property
    def progress_prefix(self) -> str:
        return f"{self.prefix}progress/"

    @property
    def closed(self) -> str:
        return f"{self.prefix}closed"

    @property
    def closer(self) -> str:
        return f"{self.prefix}closer"

    # --- per-shard durable persistence (several agents write one checkpoint; one commits its manifest) ---
    @property
    def persist_request(self) -> str:
        """``persisted/request``: the step the manifest committer asks every writer to persist."""
        return f"{self.prefix}persisted/request"

    def persist_shard(self, step: int, rank: int) -> str:
        """``persisted/shards/<step>/<rank>``: one writer's result for one shard (entry, or the error)."""
        return f"{self.prefix}persisted/shards/{step:012d}/{rank:06d}"

    def persist_step_prefix(self, step: int) -> str:
        return f"{self.prefix}persisted/shards/{step:012d}/"

    @property
    def persist_shards_prefix(self) -> str:
        return f"{self.prefix}persisted/shards/"
