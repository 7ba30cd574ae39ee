"""A hot-expert cache on fast devices that cannot hold their share of the experts.

The KTransformers and llama.cpp `--n-cpu-moe` situation: a GPU beside a large-memory CPU. Every expert keeps its home,
the device the plan gives it. Each device of the profile's `cache:` group also holds `slots` cached copies (all layers
together) of experts whose home is elsewhere, compiled at its own precision. A routed call of a cached expert runs
on the cached copy (a hit); any other runs at home in the same step (a miss), and never waits for a load: loads
compile in the background and serve from the first step after they finish. A cached call that fails falls back to
the home device (MoELayer.failover).

Policy (CachePolicy, `policy:`), judged on the tokens each (layer, expert) routes per step:
  decay (default): frequency with exponential decay, score = score x 2^(-1/half_life_steps) + tokens. A hit saves time
          in proportion to the tokens it serves, so counting tokens, not calls, ranks experts by what caching them
          saves; the decay forgets yesterday's hot experts within a few half-lives, which LFU never does.
  lfu:    the same without decay (a static trace's best, a drifting one's worst);
  lru:    the step an expert was last routed to. MoE steps route to most experts of a layer every step, so recency
          barely tells hot from cold (`hetrun bench rebalance` measures all three).
An uncached expert replaces the lowest-scored cached one of its device only when its score beats that one by
ADMIT_MARGIN (no churn on noise); at most `max_loads` loads are in flight; a victim's slot is freed as its
replacement starts loading (the memory it takes is the slot's), and a victim still loading is dropped, so a device
never holds more than its slots. An expert whose load failed is not loaded again and takes no slot.

Cached experts are spread over the group's devices by (layer x experts + expert) mod devices. Under torchrun a rank
caches only the experts whose home devices it runs itself. Statistics: DispatchStats.cache_* (hits and misses in
routed rows, loads, bytes loaded, evictions, modeled seconds the hits saved against home, modeled link seconds of
the loads, over the profile's link between home and cache device: hetrun.roofline.transfer_seconds).

Prefetching the next layer's likely experts is not done: a load (one DeepSeek-R1 expert in FP8 is 44 MB, 0.9 ms over
PCIe 5 x16 at 80%, and a compile on real backends takes milliseconds to seconds) outlasts a layer, so it cannot pay
within the step; the decayed scores already load experts ahead of the steps that need them.
"""

from __future__ import annotations

import logging

import numpy as np

from hetrun.errors import ProfileError
from hetrun.formats import expert_bytes
from hetrun.placement.precisions import resident_expert_bytes
from hetrun.profile import CacheSettings
from hetrun.roofline import expert_seconds, transfer_seconds

log = logging.getLogger("hetrun")

ADMIT_MARGIN = 0.1  # an expert replaces a cached one when its score is this much higher


class CachePolicy:
    """Scores of (layer, expert) pairs and which of them deserve the cache slots.

    `owner` [L, E]: index (among the cache devices) of the device that would hold each expert, -1 where it may not be
    cached; `slots`: cached experts per cache device.
    """

    def __init__(self, kind: str, half_life_steps: float, owner: np.ndarray, slots: int):
        if kind not in ("decay", "lfu", "lru"):
            raise ProfileError(f"unknown cache policy {kind!r}; use decay, lfu or lru")
        self.kind, self.owner, self.slots = kind, np.asarray(owner, dtype=np.int64), int(slots)
        self.decay = 0.5 ** (1.0 / half_life_steps)
        self.score = np.zeros(self.owner.shape)  # [L, E]
        self.step = 0

    def observe(self, tokens: np.ndarray) -> None:
        """Fold one step's routed tokens per (layer, expert) [L, E] into the scores."""
        self.step += 1
        if self.kind == "decay":
            self.score = self.score * self.decay + tokens
        elif self.kind == "lfu":
            self.score = self.score + tokens
        else:
            self.score = np.where(tokens > 0, float(self.step), self.score)

    def choose(self, held: np.ndarray, limit: int,
               blocked: np.ndarray | None = None) -> list[tuple[int, int, tuple[int, int] | None]]:
        """Up to `limit` loads [(layer, expert, victim (layer, expert) or None)], best first, given `held` [L, E]
        (cached or loading: each takes a slot) and `blocked` [L, E] (never to load: their loads failed). Victims are
        held experts of the same device, lowest score first."""
        if limit <= 0:
            return []
        devices = int(self.owner.max()) + 1
        wanted = (self.owner >= 0) & ~held & (self.score > 0)  # [L, E]
        want = np.flatnonzero((wanted if blocked is None else wanted & ~blocked).ravel())
        want = want[np.argsort(-self.score.ravel()[want], kind="stable")]
        free = {d: self.slots - int((held & (self.owner == d)).sum()) for d in range(devices)}
        victims: dict[int, list[int]] = {}
        full: set[int] = set()
        out = []
        E = self.owner.shape[1]
        for flat in want.tolist():
            d = int(self.owner.ravel()[flat])
            if d in full:
                continue
            if free[d] > 0:
                free[d] -= 1
                out.append((flat // E, flat % E, None))
            else:
                if d not in victims:
                    mine = np.flatnonzero((held & (self.owner == d)).ravel())
                    victims[d] = mine[np.argsort(self.score.ravel()[mine], kind="stable")].tolist()
                if not victims[d]:
                    full.add(d)
                    continue
                v = victims[d][0]
                s_new, s_old = self.score.ravel()[flat], self.score.ravel()[v]
                if not s_new > s_old * (1 + (ADMIT_MARGIN if self.kind != "lru" else 0.0)):
                    full.add(d)  # candidates come best first: none after this one beats the victim either
                    continue
                victims[d].pop(0)
                out.append((flat // E, flat % E, (v // E, v % E)))
            if len(out) >= limit:
                break
        return out


class ExpertCache:
    """The cache of one runtime: copies on the cache devices, their loads in the background, and the redirect of
    routed calls to them (see the module docstring). `runtime` is the ExpertRuntime."""

    def __init__(self, runtime, settings: CacheSettings):
        self.runtime, self.settings = runtime, settings
        ids = runtime.plan.device_ids
        group = runtime.profile.group(settings.device)  # a one-line ProfileError for a name the profile lacks
        self.devices = np.array([ids.index(d.id) for d in group if d.id in ids], dtype=np.int64)  # cache devices
        if not len(self.devices):
            raise ProfileError(f"cache.device '{settings.device}' names no device of the plan; use one of "
                               f"{', '.join(ids)}")
        self.sessions: dict[tuple[int, int], object] = {}  # (layer, expert) -> ExpertSession on its cache device
        self.loading: dict[tuple[int, int], tuple] = {}  # (layer, expert) -> (Future of its session, bytes, link s)
        self.failed: set[tuple[int, int]] = set()  # loads that failed: those experts stay at home
        self.errors: set[str] = set()
        spec = runtime.plan.spec
        self.tokens = np.zeros((runtime.plan.num_layers, spec.num_experts))  # [L, E] routed rows this step
        self.policy = CachePolicy(settings.policy, settings.half_life_steps, self._owner(), settings.slots)
        if not (self.policy.owner >= 0).any():
            log.warning("cache on '%s': every expert already has a copy there, its home runs in another process, "
                        "or no copy can be built there (a bundle without its graph at that precision); the cache "
                        "stays empty", settings.device)
        self._check_memory()

    def _check_memory(self) -> None:
        # The planner does not count cache slots: say so once when they need more than the plan leaves free, each
        # slot counted as the planner counts an expert (as the device's backend holds it).
        rt, spec = self.runtime, self.runtime.plan.spec
        for d in self.devices.tolist():
            dev_id = rt.plan.device_ids[d]
            free = rt.plan.predicted.get("devices", {}).get(dev_id, {}).get("memory_free_bytes")
            need = self.settings.slots * resident_expert_bytes(rt.devices[d], rt.plan.precision[dev_id],
                                                               spec.hidden_size, spec.moe_intermediate_size)
            if free is not None and need > free:
                log.warning("cache on '%s': %d slots take %.3g GB but the plan leaves %.3g GB free there; lower "
                            "cache.slots, or raise the device's reserved_gb by the slots' size and plan again",
                            dev_id, self.settings.slots, need / 1e9, free / 1e9)

    def _owner(self) -> np.ndarray:
        # [L, E] index into self.devices of the device that would cache each expert; -1 where it may not be cached.
        rt = self.runtime
        plan = rt.plan
        L, E = plan.num_layers, plan.spec.num_experts
        owner = (np.arange(L)[:, None] * E + np.arange(E)[None, :]) % len(self.devices)  # [L, E]
        local = np.array([rt.is_local(d) for d in range(len(rt.devices))])  # [D]
        placeable = rt.placeable_mask  # [L, E, D] or None: where a copy can be built (a bundle holds some graphs only)
        for li in range(L):
            on_cache = np.isin(plan.device_of[li], self.devices)  # [R]
            home_elsewhere = np.ones(E, dtype=bool)
            home_elsewhere[plan.phy2log[li][on_cache]] = False  # a copy on a cache device already: nothing to cache
            remote = np.zeros(E, dtype=bool)
            remote[plan.phy2log[li][~local[plan.device_of[li]]]] = True  # a home in another process
            target = self.devices[owner[li]]  # [E]
            unbuildable = np.zeros(E, dtype=bool) if placeable is None else ~placeable[li, np.arange(E), target]
            owner[li, ~home_elsewhere | remote | ~local[target] | unbuildable] = -1
        return owner

    # ---- the step's calls ------------------------------------------------------------------------------------
    def redirect(self, layer, call) -> int | None:
        """The cache device a routed call runs on when its expert is cached there and that device is healthy; else
        None (it runs at home). Counts hits and misses in routed rows."""
        li, e = layer.index, int(layer.phy2log[call.index])
        d = int(self.policy.owner[li, e])
        if d < 0:
            return None
        rows = call.end - call.start
        self.tokens[li, e] += rows
        stats = self.runtime.stats
        target = int(self.devices[d])
        if (li, e) not in self.sessions or not self.runtime.health.usable(target):
            stats.cache_misses += rows
            return None
        stats.cache_hits += rows
        stats.cache_saved_s += self._seconds(call.device, rows) - self._seconds(target, rows)
        return target

    def session(self, layer: int, expert: int):
        """The cached copy of `expert` of MoE layer `layer`."""
        return self.sessions[(layer, expert)]

    def _seconds(self, device: int, rows: int) -> float:
        # modeled seconds of `rows` rows through one routed expert on `device` (the roofline at its precision)
        rt, spec = self.runtime, self.runtime.plan.spec
        dev = rt.devices[device]
        prec = rt.plan.precision[dev.id]
        h, i = spec.hidden_size, spec.moe_intermediate_size
        return expert_seconds(dev.type, prec, rows, h, i, expert_bytes(prec, h, i))

    # ---- between steps -------------------------------------------------------------------------------------
    def step(self) -> None:
        """Called between steps on the thread that runs the model: install finished loads, fold the last step's
        tokens into the scores, start new loads."""
        self._install()
        self.policy.observe(self.tokens)
        self.tokens[:] = 0
        held = np.zeros(self.policy.owner.shape, dtype=bool)  # [L, E] taking a slot: cached or loading
        for li, e in (*self.sessions, *self.loading):
            held[li, e] = True
        blocked = np.zeros_like(held)  # [L, E] loads that failed
        for li, e in self.failed:
            blocked[li, e] = True
        for li, e, victim in self.policy.choose(held, self.settings.max_loads - len(self.loading), blocked):
            if victim is not None:
                self._evict(victim)
            self._load(li, e)

    def _install(self) -> None:
        stats = self.runtime.stats
        for key in [k for k, (f, _, _) in self.loading.items() if f.done()]:
            future, nbytes, link_s = self.loading.pop(key)
            try:
                self.sessions[key] = future.result()
            except Exception as e:  # noqa: BLE001 -- a failed load leaves the expert at home; serving goes on
                self.failed.add(key)
                why = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
                if why not in self.errors:  # once per distinct error: one broken device would say it per expert
                    self.errors.add(why)
                    log.error("cache: loading expert %d of MoE layer %d failed (%s); it stays at home, and so does "
                              "every expert whose load fails the same way", key[1], key[0], why)
                continue
            stats.cache_loads += 1
            stats.cache_bytes += nbytes
            stats.cache_load_s += link_s

    def _evict(self, key: tuple[int, int]) -> None:
        # a cached copy leaves its slot; a load still in flight is dropped (its session, once compiled, with it)
        if self.sessions.pop(key, None) is not None:
            self.runtime.stats.cache_evictions += 1
        self.loading.pop(key, None)

    def _load(self, li: int, e: int) -> None:
        rt = self.runtime
        target = int(self.devices[self.policy.owner[li, e]])
        layer = rt.layers[li]
        home = int(layer.device_of[int(layer.slot_table[e, 0])])
        spec, dev = rt.plan.spec, rt.devices[target]
        nbytes = expert_bytes(rt.plan.precision[dev.id], spec.hidden_size, spec.moe_intermediate_size)
        link = rt.profile.link(rt.devices[home], dev)
        source = layer.weights.experts[e]
        future = rt.background(lambda: rt.compile(target, source, f"L{layer.weights.layer}.E{e}@cache", measure=False),
                               lane="cache")
        self.loading[(li, e)] = (future, nbytes,
                                 transfer_seconds(nbytes, link.bandwidth_gbs, link.efficiency, link.latency_us))

    def plan_changed(self) -> None:
        """After a plan switch: experts that now have a copy on a cache device (or none at home here) leave."""
        self.policy.owner = self._owner()
        for key in [k for k in (*self.sessions, *self.loading) if self.policy.owner[k] < 0]:
            self.sessions.pop(key, None)
            self.loading.pop(key, None)

    def to_dict(self) -> dict:
        """What the cache holds now, by device id."""
        ids = self.runtime.plan.device_ids
        out: dict[str, list] = {ids[d]: [] for d in self.devices.tolist()}
        for li, e in sorted(list(self.sessions)):  # a snapshot: /metrics reads it while the model thread steps
            out[ids[int(self.devices[self.policy.owner[li, e]])]].append([li, e])
        return out
