"""The graph bundle side of `hetrun bench generate`, run as `python -I -m hetrun.bench.graph_child FOLDER IDS THREADS
NEW`: its process imports onnxruntime, numpy and hetrun's light modules, never torch or transformers, so its peak
memory is the graph bundle runner's own (hetrun.bundle.graph_runner). Prints one JSON line, as child_process.py
does for llama.cpp."""

import json
import sys
import time

from hetrun.bench.child_process import peak_rss_gb, status_bytes


def main(argv: list[str]) -> int:
    """Prefill and decode tokens/s (best of two runs after a warm-up), the greedy tokens, the prompt's last logits,
    peak RSS and the resident memory before the bundle loaded."""
    import onnxruntime  # noqa: F401 -- the library loaded before the floor is read, as the other systems do

    from hetrun.bundle.graph_runner import GraphModel

    folder, ids, threads, new = argv[0], json.loads(argv[1]), int(argv[2]), int(argv[3])
    floor = status_bytes("VmRSS:") / 1e9
    model = GraphModel(folder, threads)
    model.generate(ids[:8], 2)  # warm-up
    best: dict[int, float] = {}
    for _ in range(2):
        for n in (1, new):
            t0 = time.perf_counter()
            tokens, logits = model.run(ids, n, eos=set())
            best[n] = min(best.get(n, float("inf")), time.perf_counter() - t0)
    print(json.dumps({"prefill_tps": len(ids) / best[1], "decode_tps": (new - 1) / max(best[new] - best[1], 1e-9),
                      "tokens": tokens, "logits": logits.tolist(), "peak_rss_gb": peak_rss_gb(), "floor_gb": floor}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
