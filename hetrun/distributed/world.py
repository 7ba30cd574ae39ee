"""This process's place in a torch.distributed world: its process groups, heartbeats, and failures that name the rank.

Every collective hetrun issues goes through `World.run`, on process groups whose timeout is the profile's
`distributed.timeout_s`. When one fails (a peer died: gloo sees the connection drop at once; a peer hung: the
timeout fires), the rank reads the heartbeats every rank keeps in the rendezvous store and raises a one-line
RankFailure that names the rank to blame, instead of hanging or printing a transport error.

Ranks exchange objects as JSON bytes in uint8 tensors (`World.gather_json`, `World.all_gather_json`), never as
pickles: torchrun's rendezvous store and the process groups are unauthenticated, and an unpickled message from a
forged peer would run its code. JSON from a forged peer is still wrong data, not code; keep the rendezvous endpoint
on a private network (README, "Trust").
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from hetrun.distributed.collectives import buffer_device, choose_collective
from hetrun.distributed.ranks import RankLayout, wanted_collective
from hetrun.errors import HetrunError, ProfileError
from hetrun.profile import Profile

log = logging.getLogger("hetrun")

MAX_EXCHANGE_BYTES = 1 << 30  # one rank's JSON in one exchange (statistics, traces, startup info)


class RankFailure(HetrunError):
    """Another rank died, hung or failed, so this one stopped; the message names the rank."""


@dataclass
class _Beat:
    beat: int
    step: int
    phase: str
    changed: float  # monotonic time this rank last saw the beat advance


class Heartbeat(threading.Thread):
    """Writes this rank's beat (counter, collective step, phase) to the store and watches every other rank's."""

    def __init__(self, world: "World"):
        super().__init__(name=f"hetrun-heartbeat-{world.rank}", daemon=True)
        self.world = world
        self.beat = 0
        self.seen: dict[int, _Beat] = {}
        self.store_error: str | None = None
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def write(self) -> None:
        w = self.world
        self.beat += 1
        w.store.set(f"hb/{w.rank}", f"{self.beat} {w.step} {w.phase}")

    def read(self) -> None:
        w = self.world
        now = time.monotonic()
        keys = [f"hb/{r}" for r in range(w.size)]
        if w.store.check(keys):  # usually: two round trips whatever the world size
            values = dict(zip(range(w.size), w.store.multi_get(keys)))
        else:
            values = {r: w.store.get(k) for r, k in enumerate(keys) if w.store.check([k])}
        for r, value in values.items():
            beat, step, phase = (bytes(value).decode().split(" ", 2) + ["", ""])[:3]
            with self._lock:
                old = self.seen.get(r)
                if old is None or old.beat != int(beat):
                    self.seen[r] = _Beat(int(beat), int(step), phase, now)

    def run(self) -> None:
        failures = 0
        while not self._halt.wait(self.world.layout.heartbeat_s):
            try:
                self.write()
                self.read()
                failures = 0
            except Exception as e:  # noqa: BLE001 -- a lost store must not kill the rank; diagnosis reports it
                failures += 1
                self.store_error = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
                if failures >= 3:
                    return

    def snapshot(self) -> dict[int, _Beat]:
        with self._lock:
            return dict(self.seen)

    def stop(self) -> None:
        self._halt.set()


class World:
    """The ranks of one hetrun deployment: process groups with the profile's timeout, the store, heartbeats."""

    def __init__(self, layout: RankLayout, collective: str, rank: int, size: int, local_rank: int, store):
        self.layout, self.collective = layout, collective
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.store = store  # a PrefixStore over the rendezvous store, or None when torch hides it
        self.step = 0  # collectives entered; every rank enters the same sequence, so it doubles as a position
        self.phase = "starting"
        self.broken: RankFailure | None = None
        self._failure_posted = False
        self.active = None  # the DistributedRuntime whose collectives are in flight
        self.runtimes = 0
        self.host = socket.gethostname()
        timeout = timedelta(seconds=layout.timeout_s)
        # Our own groups: every collective of a step times out after timeout_s whatever the default group says.
        self.data_group = dist.new_group(backend=collective, timeout=timeout)
        self.control_group = self.data_group if collective == "gloo" else \
            dist.new_group(backend="gloo", timeout=timeout)  # counts, barriers and objects stay on the host
        self.device = buffer_device(collective, local_rank)
        self.heartbeat: Heartbeat | None = None
        self.beats = 0
        if store is not None:
            store.set(f"info/{rank}", json.dumps({"host": self.host, "pid": os.getpid(),
                                                  "devices": list(layout.ranks[rank])}))

    def start_heartbeat(self) -> None:
        """Beat while a deployment may run collectives (a stopped rank's beat stops advancing)."""
        if self.store is None or self.heartbeat is not None:
            return
        self.heartbeat = Heartbeat(self)
        self.heartbeat.beat = self.beats
        self.heartbeat.write()
        self.heartbeat.start()

    def stop_heartbeat(self) -> None:
        """Stop beating and wait for the thread, so no store call is left in flight when a rank exits."""
        hb, self.heartbeat = self.heartbeat, None
        if hb is not None:
            hb.stop()
            hb.join(timeout=5 * self.layout.heartbeat_s + 1)
            self.beats = hb.beat

    # ---- collectives -----------------------------------------------------------------------------
    def run(self, what: str, fn, *args, **kwargs):
        """Run one collective; if it fails, raise a RankFailure naming the rank to blame (and remember it)."""
        if self.broken is not None:
            raise self.broken
        self.step += 1
        self.phase = what
        try:
            out = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- transport errors come as RuntimeError, DistBackendError, ...
            self._post("abort", f"rank {self.rank} stopped in {what}")
            self.broken = RankFailure(self._diagnose(what, e))
            raise self.broken from None
        self.phase = f"after {what}"
        return out

    def post_failure(self, message: str) -> None:
        """Tell the other ranks that this rank failed on its own, and why (they will name it); the first cause wins."""
        if not self._failure_posted:
            self._failure_posted = True
            self._post("fail", message)

    def _post(self, kind: str, message: str) -> None:
        if self.store is None:
            return
        try:
            self.store.set(f"{kind}/{self.rank}", " ".join(message.split())[:300])
        except Exception:  # noqa: BLE001 -- the store may be what died
            pass

    def all_gather_json(self, what: str, obj) -> list:
        """`obj` (plain JSON data) of every rank, on every rank, in rank order."""
        return self._exchange_json(what, obj, None)

    def gather_json(self, what: str, obj, dst: int = 0) -> list | None:
        """`obj` (plain JSON data) of every rank, in rank order, on rank `dst`; None on the other ranks."""
        return self._exchange_json(what, obj, dst)

    def _exchange_json(self, what: str, obj, dst: int | None) -> list | None:
        data = json.dumps(obj, default=_plain).encode()
        if len(data) > MAX_EXCHANGE_BYTES:
            raise HetrunError(f"rank {self.rank}: {what}: {len(data)} bytes of JSON, more than the "
                              f"{MAX_EXCHANGE_BYTES} one exchange carries")
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        self.run(what, dist.all_gather, sizes, torch.tensor([len(data)], dtype=torch.int64),
                 group=self.control_group)
        lengths = [int(t.item()) for t in sizes]
        if not all(0 <= n <= MAX_EXCHANGE_BYTES for n in lengths):
            raise RankFailure(f"{what}: a rank announced {max(lengths)} bytes, outside 0..{MAX_EXCHANGE_BYTES}")
        buf = torch.zeros(max(lengths), dtype=torch.uint8)  # [n] this rank's JSON, zero-padded
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if dst is None:
            parts = [torch.empty_like(buf) for _ in range(self.size)]
            self.run(what, dist.all_gather, parts, buf, group=self.control_group)
        else:
            parts = [torch.empty_like(buf) for _ in range(self.size)] if self.rank == dst else None
            self.run(what, dist.gather, buf, parts, dst=dst, group=self.control_group)
            if parts is None:
                return None
        out = []
        for r, (part, n) in enumerate(zip(parts, lengths)):
            try:
                out.append(json.loads(part[:n].numpy().tobytes().decode()))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise RankFailure(f"{what}: {self.peer(r)} sent data that is not JSON ({type(e).__name__})") from None
        return out

    # ---- diagnosis -------------------------------------------------------------------------------
    def peer(self, rank: int) -> str:
        """`rank 1 (ov:0; pid 42 on host h)`."""
        info = {}
        if self.store is not None:
            try:
                if self.store.check([f"info/{rank}"]):
                    info = json.loads(self.store.get(f"info/{rank}"))
            except Exception:  # noqa: BLE001
                info = {}
        devs = ", ".join(info.get("devices") or self.layout.ranks[rank])
        where = f"; pid {info['pid']} on host {info['host']}" if info else ""
        return f"rank {rank} ({devs}{where})"

    def _posted(self, kind: str) -> dict[int, str]:
        out = {}
        for r in range(self.size):
            if r != self.rank and self.store.check([f"{kind}/{r}"]):
                out[r] = self.store.get(f"{kind}/{r}").decode()
        return out

    def _diagnose(self, what: str, err: Exception) -> str:
        short = _transport_error(err)
        here = (f"rank {self.rank} stopped waiting in {what} (collective #{self.step}; "
                f"distributed.timeout_s={self.layout.timeout_s:g}) after: {short}")
        if self.store is None:
            return f"a peer of rank {self.rank} failed; {here}; no rendezvous store to tell which rank"
        if self.heartbeat is None:  # failed outside a deployment's collectives: watch the beats from here
            self.start_heartbeat()
        hb = self.layout.heartbeat_s
        window = min(self.layout.timeout_s, max(2.0, 8 * hb))  # a beat this old means the rank is gone
        deadline = time.monotonic() + window
        try:
            while True:
                failed = self._posted("fail")
                if failed:
                    r, msg = sorted(failed.items())[0]
                    return f"{self.peer(r)} failed: {msg}; {here}"
                self.heartbeat.read()
                now = time.monotonic()
                seen = self.heartbeat.snapshot()
                victims = set(self._posted("abort"))
                stale = [r for r in range(self.size) if r != self.rank and r not in victims
                         and (r not in seen or now - seen[r].changed >= window)]
                if stale or now >= deadline:
                    break
                time.sleep(hb / 2)
        except Exception as e:  # noqa: BLE001 -- the store is gone as well
            addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            host = "the torchrun agent that hosts it" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" \
                else "rank 0, which hosts it,"
            return (f"lost the rendezvous store at {addr} as well ({type(e).__name__}), so {host} is down: "
                    f"{self.peer(0)}; {here}")
        if stale:
            parts = []
            for r in stale:
                b = seen.get(r)
                last = (f"no heartbeat for {now - b.changed:.1f} s, last seen at collective #{b.step} ({b.phase})"
                        if b else "no heartbeat ever")
                parts.append(f"{self.peer(r)} stopped responding: {last}")
            return f"{'; '.join(parts)}; {here}"
        behind = sorted((b.step, r) for r, b in seen.items() if r != self.rank and b.step < self.step)
        if behind:
            step, r = behind[0]
            return (f"{self.peer(r)} is alive but has not reached collective #{self.step} (it is at #{step}, "
                    f"{seen[r].phase}): stuck, or slower than distributed.timeout_s; {here}")
        victims = self._posted("abort")
        if victims:
            return f"{'; '.join(f'{self.peer(r)} aborted: {m}' for r, m in sorted(victims.items()))}; {here}"
        return f"every rank still beats; {here}"

    # ---- start and end ---------------------------------------------------------------------------
    def handshake(self, info: dict) -> list[dict]:
        """Wait (up to startup_timeout_s) until every rank is ready, then exchange `info`; names missing ranks."""
        if self.broken is not None:
            raise self.broken
        self.phase = "startup barrier"
        try:
            dist.monitored_barrier(group=self.control_group, timeout=timedelta(seconds=self.layout.startup_timeout_s),
                                   wait_all_ranks=True)
        except Exception as e:  # noqa: BLE001
            self.step += 1
            self._post("abort", f"rank {self.rank} stopped at the startup barrier")
            self.broken = RankFailure(self._diagnose("the startup barrier", e))
            raise self.broken from None
        self.step += 1
        return self.all_gather_json("the startup handshake", info)

    def close(self, barrier: bool = True) -> None:
        """Stop the heartbeat, wait for every rank (unless `barrier` is False) and leave the world.

        After a failure it only stops the heartbeat: a broken process group cannot be torn down cleanly.
        """
        global _WORLD
        self.stop_heartbeat()
        if self.broken is None and barrier:
            try:
                self.run("the closing barrier", dist.barrier, group=self.control_group)
            except RankFailure:
                pass
        if self.broken is None and dist.is_initialized() and _OWNS_DEFAULT_GROUP:
            dist.destroy_process_group()
        _WORLD = None


def _plain(obj):
    """JSON for numpy scalars and arrays; anything else that is not plain data is a bug here, not user input."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not plain JSON data")


def _transport_error(err: Exception) -> str:
    """gloo's message without its source location and boilerplate: `Connection closed by peer [127.0.0.1]:42382`."""
    text = " ".join(str(err).split())
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\] ", "", text)
    text = text.split(" This is typically caused")[0]
    return text[:200] + ("..." if len(text) > 200 else "")


_WORLD: World | None = None
_OWNS_DEFAULT_GROUP = False


def current_world() -> World | None:
    """The world this process joined, if any."""
    return _WORLD


def in_distributed_launch() -> bool:
    """Whether this process is a rank: torch.distributed is initialized, or torchrun's RANK/WORLD_SIZE are set."""
    if not dist.is_available():
        return False
    return dist.is_initialized() or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def join_world(profile: Profile, layout: RankLayout) -> World | None:
    """This process's World for the profile's layout; None outside a distributed launch (one process runs all)."""
    global _WORLD, _OWNS_DEFAULT_GROUP
    if not in_distributed_launch():
        return None
    size = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
    if size != layout.world_size:
        raise ProfileError(f"profile '{layout.profile_name}' lays out {layout.world_size} ranks but {size} processes "
                           f"were started; start {layout.world_size} (torchrun --nnodes N --nproc-per-node M with "
                           f"N*M = {layout.world_size}) or change distributed.ranks")
    if _WORLD is not None:
        if _WORLD.layout.ranks != layout.ranks:
            raise ProfileError(f"this process already runs the rank layout of profile '{_WORLD.layout.profile_name}'; "
                               f"profile '{layout.profile_name}' lays out different ranks; use one layout per launch")
        return _WORLD
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        collective = dist.get_backend()
        collective = "gloo" if "gloo" in collective and "nccl" not in collective else collective.split(":")[-1]
        rank = dist.get_rank()
    else:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise HetrunError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not; launch with torchrun, "
                              "or set all four")
        collective = choose_collective(wanted_collective(profile, layout), explicit=layout.collective != "auto")
        if collective == "nccl":
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        rank = int(os.environ["RANK"])
        # The default group only rendezvouses (ranks may take long to start); steps use groups with timeout_s.
        dist.init_process_group(collective, init_method="env://",
                                timeout=timedelta(seconds=layout.startup_timeout_s))
        _OWNS_DEFAULT_GROUP = True
    store = None
    try:
        from torch.distributed import PrefixStore  # inside the try: a private API that may move
        from torch.distributed.distributed_c10d import _get_default_store  # private API, inside the try

        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = PrefixStore(f"hetrun/{attempt}/", _get_default_store())
    except Exception as e:  # noqa: BLE001 -- private API: without it, failures cannot name the rank
        log.warning("cannot reach torch.distributed's store (%s); a failed rank will not be named", e)
    _WORLD = World(layout, collective, rank, size, local_rank, store)
    atexit.register(_close_at_exit)
    return _WORLD


def _close_at_exit() -> None:
    # Registered before any deployment's own exit hook, so it runs after them (atexit runs last-in first-out).
    if _WORLD is not None:
        _WORLD.close(barrier=False)
