"""What benchmark child processes share, on the standard library alone: their own memory figures (status_bytes,
peak_rss_gb), and llama.cpp's side of `hetrun bench generate`, run as a script (python -I child_process.py GGUF IDS
THREADS NEW) so that its process imports llama_cpp and nothing else: its peak memory is llama.cpp's own, not
torch's and transformers'. The script prints one JSON line: prefill and decode tokens/s, greedy tokens, the
prompt's last logits, peak RSS and the resident memory once llama_cpp was imported."""

import json
import resource
import sys
import time


def run(path: str, ids: list[int], threads: int, new_tokens: int) -> dict:
    """Greedy generation of `new_tokens` from `ids`, best of two runs after a warm-up, and the logits of the last
    prompt position."""
    import llama_cpp  # optional: the `bench` extra

    floor = status_bytes("VmRSS:") / 1e9  # the library loaded, no weight read yet
    llm = llama_cpp.Llama(path, n_ctx=len(ids) + new_tokens + 8, n_threads=threads, n_threads_batch=threads,
                          n_batch=len(ids), verbose=False)
    best_first, best_all, tokens = float("inf"), float("inf"), []
    for _ in range(3):  # the first run warms up
        llm.reset()
        t0 = time.perf_counter()
        got, first = [], 0.0
        for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if not got:
                first = time.perf_counter() - t0
            got.append(int(tok))
            if len(got) == new_tokens:
                break
        best_first, best_all, tokens = min(best_first, first), min(best_all, time.perf_counter() - t0), got
    llm.reset()
    llm.eval(ids)  # the prompt once more, untimed: the logits of its last position
    last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # float* [V]
    return {"prefill_tps": len(ids) / best_first, "decode_tps": (new_tokens - 1) / max(best_all - best_first, 1e-9),
            "tokens": tokens, "logits": [last[i] for i in range(llm.n_vocab())], "peak_rss_gb": peak_rss_gb(),
            "floor_gb": floor}


def status_bytes(key: str, pid: "int | str" = "self") -> int:
    """A `kB` figure of /proc/PID/status (e.g. "VmHWM:", "VmRSS:") in bytes; 0 where there is none."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_gb() -> float:
    """This process's own peak resident memory: VmHWM (ru_maxrss survives exec on Linux, so a child would report its
    parent's peak), else ru_maxrss."""
    hwm = status_bytes("VmHWM:")
    if hwm:
        return hwm / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9


if __name__ == "__main__":
    gguf, ids, threads, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(run(gguf, ids, threads, new)))
