"""The serving engine in this process, on the built-in model deployed for real (FP32, onnxruntime experts):
transformers' continuous batching over hetrun's dispatcher, its recovery from a failed step, a device fault while
serving, per-request sampling, and the incremental detokeniser with stop strings.
"""

import asyncio

import pytest
import torch
import transformers

import hetrun
from hetrun.serve.builtin import builtin_model_dir, qa_pairs, training_text
from hetrun.serve.engine import Engine, EngineBusy, EngineConfig, GenerationFailed
from hetrun.serve.sampling import Sampling
from hetrun.serve.textstream import TextStream

PROFILE = {"name": "serve-failover", "fallback_device": "spare",
           "devices": [{"id": "a", "type": "host-cpu", "backend": "onnxruntime"},
                       {"id": "b", "type": "host-cpu", "backend": "onnxruntime"},
                       {"id": "spare", "type": "host-cpu", "backend": "onnxruntime"}]}
PROMPTS = ["The harbour master", "Every evening the clock maker", "A child once asked", "The grey island"]


@pytest.fixture(scope="module")
def model_dir():
    return builtin_model_dir()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@pytest.fixture(scope="module")
def reference(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()


@pytest.fixture(scope="module")
def deployed(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    return hetrun.deploy(model, PROFILE, precision="fp32")


def greedy(reference, ids, n):
    with torch.no_grad():
        return reference.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False)[0, len(ids):].tolist()


async def collect(engine, ids, n, sampling=None, on_step=None):
    steps = []
    async for step in engine.generate(ids, n, sampling):
        steps.append(step)
        if on_step is not None:
            on_step(len(steps))
    return steps


def run_engine(model, coro_fn, **config):
    engine = Engine(model, [-1], EngineConfig(context_length=512, **config))  # no EOS: exactly n tokens
    engine.start()
    try:
        return engine, asyncio.run(coro_fn(engine))
    finally:
        engine.stop()


def test_concurrent_requests_equal_transformers_greedy(deployed, reference, tokenizer):
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]

    async def all_at_once(engine):
        return await asyncio.gather(*(collect(engine, i, 12) for i in ids))

    _, results = run_engine(deployed, all_at_once)
    for i, steps in zip(ids, results):
        assert steps[-1].tokens == greedy(reference, i, 12) and steps[-1].finish_reason == "length"
        assert [len(s.tokens) for s in steps] == sorted({len(s.tokens) for s in steps})  # growing, never repeated


def test_a_failed_step_restarts_the_loop_and_the_request_completes(deployed, reference, tokenizer):
    """An exception the dispatcher cannot absorb kills transformers' manager; the engine starts a new one and
    resubmits the request with the tokens it had: the answer is the same as without the failure."""
    ids = tokenizer(PROMPTS[0])["input_ids"]
    block = next(m for m in deployed.modules() if type(m).__name__ == "HetrunMoEBlock")
    healthy = block.forward
    calls = {"n": 0}

    def fails_once(hidden):
        calls["n"] += 1
        if calls["n"] == 6:  # a few decode steps in
            raise RuntimeError("injected step failure")
        return healthy(hidden)

    block.forward = fails_once
    try:
        engine, steps = run_engine(deployed, lambda e: collect(e, ids, 16))
    finally:
        del block.forward
    assert steps[-1].tokens == greedy(reference, ids, 16)
    assert engine.restarts == 1 and engine.recovered == 1 and calls["n"] > 6


def test_a_step_that_keeps_failing_fails_the_request_and_the_engine_serves_on(deployed, reference, tokenizer):
    ids = tokenizer(PROMPTS[2])["input_ids"]
    block = next(m for m in deployed.modules() if type(m).__name__ == "HetrunMoEBlock")
    healthy = block.forward

    def always_fails(hidden):
        raise RuntimeError("injected persistent failure")

    async def fail_then_heal(engine):
        block.forward = always_fails
        try:
            with pytest.raises(GenerationFailed, match="injected persistent failure"):
                await collect(engine, ids, 8)
        finally:
            block.forward = healthy
        return await collect(engine, ids, 8)

    try:
        engine, steps = run_engine(deployed, fail_then_heal, max_retries=2)
    finally:
        del block.forward
    assert steps[-1].tokens == greedy(reference, ids, 8)
    assert engine.restarts == 3 and engine.recovered == 2 and (engine.outstanding, engine.waiting) == (0, 0)


def test_stopping_the_engine_ends_what_runs_with_a_clear_error(deployed, tokenizer):
    ids = tokenizer(PROMPTS[3])["input_ids"]

    async def stop_mid_request(engine):
        stream = engine.generate(ids, 400)
        await stream.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)
        with pytest.raises(GenerationFailed, match="the server stopped before this request finished"):
            async for _ in stream:
                pass
        return engine.outstanding

    assert run_engine(deployed, stop_mid_request)[1] == 0


def test_a_device_fault_while_serving_fails_over_and_the_request_completes(deployed, reference, tokenizer):
    ids = tokenizer(PROMPTS[1])["input_ids"]
    runtime = deployed.hetrun
    dev = runtime.plan.device_ids.index("b:0")
    broken = []

    def boom(x):
        raise RuntimeError("injected device fault")

    def break_device_b(step):
        if step == 3:  # mid-request: every expert session on device b starts failing
            for layer in runtime.layers:
                for r, session in enumerate(layer.sessions):
                    if int(layer.device_of[r]) == dev and session not in broken:
                        broken.append(session)
                        session.forward = boom

    faults_before = len(runtime.stats.faults)
    try:
        engine, steps = run_engine(deployed, lambda e: collect(e, ids, 16, on_step=break_device_b))
    finally:
        for session in broken:
            del session.forward
    assert broken and steps[-1].tokens == greedy(reference, ids, 16)
    assert engine.restarts == 0  # the dispatcher absorbed it inside the step
    new = runtime.stats.faults[faults_before:]
    assert new and all(f["device"] == "b:0" for f in new)


def test_seeded_sampling_is_per_request(deployed, tokenizer):
    ids = tokenizer(PROMPTS[2])["input_ids"]

    async def alone_then_crowded(engine):
        alone = await collect(engine, ids, 20, Sampling(1.0, 0.95, seed=11))
        crowd = [collect(engine, tokenizer(p)["input_ids"], 20, Sampling(1.0, seed=i)) for i, p in enumerate(PROMPTS)]
        mine, *_ = await asyncio.gather(collect(engine, ids, 20, Sampling(1.0, 0.95, seed=11)), *crowd)
        greedy_like = await collect(engine, ids, 20, Sampling(1.0, top_p=1e-9, seed=3))  # top_p keeps only the top
        plain = await collect(engine, ids, 20)
        return alone, mine, greedy_like, plain

    _, (alone, mine, greedy_like, plain) = run_engine(deployed, alone_then_crowded)
    assert alone[-1].tokens == mine[-1].tokens
    assert greedy_like[-1].tokens == plain[-1].tokens


def test_capacity_refuses_beyond_slots_and_queue(deployed, tokenizer):
    ids = tokenizer(PROMPTS[3])["input_ids"]

    async def over_capacity(engine):
        streams = [engine.generate(ids, 40) for _ in range(3)]
        firsts = [asyncio.ensure_future(s.__anext__()) for s in streams[:2]]
        await asyncio.sleep(0)
        with pytest.raises(EngineBusy):
            await streams[2].__anext__()
        await asyncio.gather(*firsts)
        for s in streams[:2]:
            await s.aclose()  # cancels them in the engine
        return engine.outstanding, engine.waiting

    _, (outstanding, waiting) = run_engine(deployed, over_capacity, max_num_seqs=1, max_queue=1)
    assert (outstanding, waiting) == (0, 0)


# ---- detokenising ----------------------------------------------------------------------------------------------
def test_text_stream_joins_to_the_whole_decode_and_holds_back_partial_characters(tokenizer):
    text = "The lamp keeper sees the sea — héllo wörld, 🙂 harbour."
    ids = tokenizer(text)["input_ids"]
    ts = TextStream(tokenizer)
    pieces = [ts.push([i]) for i in ids] + [ts.finish()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("stop", ["harbour", "the s", "é", "🙂 h", "."])
def test_text_stream_cuts_at_the_first_stop_string_and_never_emits_part_of_it(tokenizer, stop):
    text = "The lamp keeper sees the sea — héllo wörld, 🙂 harbour. The harbour."
    ids = tokenizer(text)["input_ids"]
    ts = TextStream(tokenizer, [stop, "never there"])
    pieces = []
    for i in ids:
        pieces.append(ts.push([i]))
        assert stop not in "".join(pieces)
        if ts.stopped:
            break
    pieces.append(ts.finish())
    assert ts.stopped and "".join(pieces) == text[:text.index(stop)]


def test_built_in_model_names():
    from hetrun.errors import HetrunError
    from hetrun.serve.builtin import preset_family

    assert preset_family("tiny") == "deepseek_v3" and preset_family("tiny:mixtral") == "mixtral"
    assert preset_family("path/to/model") is None
    with pytest.raises(HetrunError, match="unknown built-in model 'tiny:gpt'; choose one of: tiny, tiny:mixtral"):
        preset_family("tiny:gpt")


def test_training_text_has_question_answer_pairs_for_chat():
    pairs = qa_pairs(training_text())
    assert len(pairs) >= 5 and all(q.endswith("?") and a for q, a in pairs)
