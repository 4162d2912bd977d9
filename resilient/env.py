"""Every environment variable resilient reads or sets, as a named constant.

Precedence everywhere: explicit argument > environment > default.
"""

from __future__ import annotations

import os

# torch.distributed's contract (set by resilient-run for each worker, as torchrun does)
RANK = "RANK"
LOCAL_RANK = "LOCAL_RANK"
WORLD_SIZE = "WORLD_SIZE"
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
GROUP_RANK = "GROUP_RANK"
GROUP_WORLD_SIZE = "GROUP_WORLD_SIZE"
ROLE_RANK = "ROLE_RANK"
ROLE_WORLD_SIZE = "ROLE_WORLD_SIZE"
ROLE_NAME = "ROLE_NAME"
MASTER_ADDR = "MASTER_ADDR"
MASTER_PORT = "MASTER_PORT"
RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"
MAX_RESTARTS = "TORCHELASTIC_MAX_RESTARTS"
RUN_ID = "TORCHELASTIC_RUN_ID"
ERROR_FILE = "TORCHELASTIC_ERROR_FILE"

# resilient's own contract between the agent and its workers
JOB_ID = "RESILIENT_JOB_ID"
NODE_ID = "RESILIENT_NODE_ID"
GENERATION = "RESILIENT_GENERATION"
AGENT_SOCKET = "RESILIENT_AGENT_SOCKET"
CONTROL_FILE = "RESILIENT_CONTROL_FILE"
EVENT_LOG = "RESILIENT_EVENT_LOG"
SNAPSHOT_EVERY = "RESILIENT_SNAPSHOT_EVERY"
BACKEND = "RESILIENT_BACKEND"
LOG_LEVEL = "RESILIENT_LOG_LEVEL"
FAILPOINTS = "RESILIENT_FAILPOINTS"
ETCD_ENDPOINTS = "RESILIENT_ETCD_ENDPOINTS"
ETCD_BINARY = "RESILIENT_ETCD_BINARY"
NO_NATIVE = "RESILIENT_NO_NATIVE"
SHM_DIR = "RESILIENT_SHM_DIR"
DEVICE = "RESILIENT_DEVICE"  # a torch device ("cpu", "cuda", "cuda:1"): the decorator's device= when not given
REPLICAS = "RESILIENT_REPLICAS"
REPLICATION_RATE = "RESILIENT_REPLICATION_RATE"

# set by resilient-run for each worker: CLOCK_MONOTONIC seconds when the agent asked for the process
SPAWN_MONO = "RESILIENT_SPAWN_MONO"
# per-job secret that peer agents authenticate with (else derived from the job id)
JOB_TOKEN = "RESILIENT_JOB_TOKEN"
# password of --etcd-user (kept out of the command line, where other users could read it)
ETCD_PASSWORD = "RESILIENT_ETCD_PASSWORD"
# "0": a worker's allocator returns freed memory to the kernel as glibc does by default; else (default)
# it keeps it for reuse, so the model and optimizer rebuilt after a recovery pay no page faults
RETAIN_HEAP = "RESILIENT_RETAIN_HEAP"
# "1": @resilient.elastic snapshots only each rank's 1/N slice of model and optimizer state (dedup=None)
DEDUP = "RESILIENT_DEDUP"
# a directory shared by the processes of a host: N* failpoint terms (Python and native) claim their
# firings there, so N counts for all of them (a respawned worker does not fire again)
FAILPOINTS_STATE = "RESILIENT_FAILPOINTS_STATE"
# optional mutual TLS of the agent <-> agent gRPC channel: PEM file paths (all three or none), and the name
# the agents' certificates carry in their subjectAltName (default "resilient-peer")
PEER_TLS_CERT = "RESILIENT_PEER_TLS_CERT"
PEER_TLS_KEY = "RESILIENT_PEER_TLS_KEY"
PEER_TLS_CA = "RESILIENT_PEER_TLS_CA"
PEER_TLS_NAME = "RESILIENT_PEER_TLS_NAME"
# threads of the native store's copy engine (read by native/src/pool.cpp at its first use in a process;
# default min(cores, 8), at most 64)
COPY_THREADS = "RESILIENT_COPY_THREADS"
# set by resilient-chaos for the processes of a host: its control directory, and the in-worker faults
# armed there (resilient/chaos/inworker.py)
CHAOS_DIR = "RESILIENT_CHAOS_DIR"
CHAOS_INWORKER = "RESILIENT_CHAOS_INWORKER"


def get(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def get_int(name: str, default: int | None = None) -> int | None:
    value = get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as exc:
        from resilient.errors import ConfigError

        raise ConfigError(f"Environment variable {name}={value!r} must be an integer.") from exc


def get_bool(name: str, default: bool = False) -> bool:
    value = get(name)
    if value is None:
        return default
    return value.lower() in ("1", "true", "yes", "on")
