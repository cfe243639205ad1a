"""The engine when nothing fits in the free KV blocks: it preempts only what frees blocks, drops
cached prefixes before it preempts, ends only the requests that could never fit, never loops,
and a request preempted more than once sends each event once.

The programs here are bare sequences of prefills (and text events) on a tiny pool of 16-token
blocks, so each case puts the pool in exactly the state it is about.
"""

from __future__ import annotations

import pytest

from irg_engine import events as ev
from irg_engine.config import EngineConfig
from irg_engine.engine import Engine
from irg_engine.recipes import RecipeParams
from irg_engine.recipes.params import TextOut
from irg_engine.recipes.work import DecodeStep, PrefillText, ReadKV
from irg_engine.request import Request

STEP_CAP = 200  # far more than any case needs: a loop shows as a run that never goes idle


def ids(n: int, base: int) -> list[int]:
    return list(range(base, base + n))


def prefills(*segments: tuple[list[int], bool]):
    def program(env):
        ctx = env.contexts.new("main")
        for tokens, shared in segments:
            yield PrefillText(ctx, tokens, shared)

    return program


def run(engine: Engine, programs: dict) -> dict[str, list]:
    sinks = {name: [] for name in programs}
    for name, program in programs.items():
        engine.add(Request(name, RecipeParams("x"), sinks[name].append, program_factory=program))
    steps = 0
    while not engine.idle and steps < STEP_CAP:
        engine.step()
        steps += 1
    assert engine.idle, f"still busy after {STEP_CAP} steps ({engine.preemptions} preemptions)"
    return sinks


@pytest.fixture
def small_engine(tiny_model):
    def make(kv_tokens: int, **config) -> Engine:
        config.setdefault("prefix_cache_entries", 0)
        cfg = EngineConfig(kv_tokens=kv_tokens, block_size=16, decode_graphs="off", **config)
        return Engine(tiny_model, cfg)

    return make


def finished(sink: list) -> bool:
    return isinstance(sink[-1], ev.Finished)


def test_a_request_preempted_twice_sends_each_event_once(small_engine):
    def texts(env):
        ctx = env.contexts.new("b")
        yield PrefillText(ctx, ids(16, 5000))
        env.observer.text_done(TextOut("think", 1, "b1", []), [])
        yield PrefillText(ctx, ids(32, 6000))
        env.observer.text_done(TextOut("think", 1, "b2", []), [])
        yield PrefillText(ctx, ids(16, 7000))

    # a (older) grows in steps while b holds blocks: b is preempted at each of a's later steps.
    a = prefills(
        *((ids(n, base), False) for n, base in ((48, 1000), (32, 2000), (32, 3000), (16, 4000)))
    )
    eng = small_engine(128)
    sinks = run(eng, {"a": a, "b": texts})
    assert eng.preemptions >= 2
    assert [e.text for e in sinks["b"] if isinstance(e, ev.TextDone)] == ["b1", "b2"]
    assert finished(sinks["a"]) and finished(sinks["b"])
    assert eng.pool.num_used == 0


def test_a_cached_prefix_goes_before_a_request_is_preempted(small_engine):
    eng = small_engine(128, prefix_cache_entries=4)
    run(eng, {"z": prefills((ids(20, 500), True))})  # leaves a cached prefix of 2 blocks
    system = ids(16, 300)
    a = prefills((system, True), (ids(64, 1000), False), (ids(20, 2000), False))
    b = prefills((system, True), (ids(32, 3000), False))
    sinks = run(eng, {"a": a, "b": b})
    assert finished(sinks["a"]) and finished(sinks["b"])
    assert eng.preemptions == 0
    eng.clear_prefix_cache()
    assert eng.pool.num_used == 0


def test_only_the_request_that_can_never_fit_ends(small_engine):
    # 8 blocks: a needs 9 in all, b fits. b is neither preempted for a nor failed with it.
    eng = small_engine(128)
    a = prefills((ids(64, 1000), False), (ids(80, 2000), False))
    b = prefills((ids(48, 3000), False), (ids(32, 4000), False))
    sinks = run(eng, {"a": a, "b": b})
    assert sinks["a"][-1].code == "invalid_request" and "8 blocks of 16" in sinks["a"][-1].message
    assert finished(sinks["b"]) and eng.preemptions == 0
    assert eng.pool.num_used == 0


def test_a_request_that_fills_the_pool_exactly_is_not_refused_for_a_copy(small_engine):
    """Its last block is shared with the cached prefix, so its next prefill copies it first: the
    copy replaces that block, and the request still fits once the cache lets go."""
    eng = small_engine(64, prefix_cache_entries=2)  # 4 blocks
    sinks = run(eng, {"a": prefills((ids(20, 300), True), (ids(44, 1000), False))})
    assert finished(sinks["a"]), sinks["a"][-1]
    eng.clear_prefix_cache()
    assert eng.pool.num_used == 0


def test_a_request_that_adopts_a_prefix_late_never_stores_its_own_context_under_it(small_engine):
    """r misses the cached system prompt (s is still computing it), adopts it a step later, and
    t's prefix then evicts it; when r's own prompt is done, r must not store its context (system
    prompt + its prompt) as the system prompt, or a later request would start from r's prompt."""
    eng = small_engine(1024, prefix_cache_entries=1, token_budget=32)
    system = ids(32, 300)
    seen = []

    def q(env):
        ctx = env.contexts.new("main")
        yield PrefillText(ctx, system, True)
        keys, _ = yield ReadKV(ctx)
        seen.append(keys[0].shape[0])

    sinks = run(
        eng,
        {
            "s": prefills((system, True)),
            "t": prefills((ids(16, 600), True)),
            "r": prefills((system, True), (ids(96, 1000), False)),
        },
    )
    assert all(finished(s) for s in sinks.values())
    run(eng, {"q": q})
    assert seen == [len(system)]
    eng.clear_prefix_cache()
    assert eng.pool.num_used == 0


def test_a_copy_that_its_own_fork_keeps_the_original_of_counts_against_the_pool(small_engine):
    """a's last block is shared with its own fork, so its next prefill copies it and the fork
    keeps the original: 2 + 1 + 2 blocks, more than the pool's 4. a alone ends, as too big; the
    younger b is neither failed with it nor left waiting."""

    def a(env):
        ctx = env.contexts.new("main")
        yield PrefillText(ctx, ids(20, 1000))
        env.contexts.fork(ctx, "text_free")
        yield PrefillText(ctx, ids(44, 2000))

    eng = small_engine(64)
    sinks = run(eng, {"a": a, "b": prefills((ids(16, 3000), False))})
    assert sinks["a"][-1].code == "invalid_request", sinks["a"][-1]
    assert finished(sinks["b"])
    assert eng.pool.num_used == 0


def test_a_prompt_that_fills_the_pool_exactly_runs_in_chunks_of_a_small_budget(small_engine):
    # 4 blocks of 16 and a budget of 16: four chunks, the last with no block to spare.
    eng = small_engine(64, token_budget=16)
    sinks = run(eng, {"a": prefills((ids(64, 1000), False))})
    assert finished(sinks["a"]), sinks["a"][-1]
    assert eng.pool.num_used == 0


def test_decode_run_ahead_leaves_the_blocks_of_the_step_s_other_items_free(tiny_model, caplog):
    """A claiming step launches the next decode step before the step's prefill reserves its
    slots, and that launch may open a block; the scheduler gave every free block to the prefill
    chunk. So the launch waits where it would take one of those, and no step fails."""
    cfg = EngineConfig(
        kv_tokens=128, block_size=16, decode_graphs="static", decode_ahead=True,
        prefix_cache_entries=0,
    )  # fmt: skip
    eng = Engine(tiny_model, cfg)
    box = {}

    def decoder(env):
        ctx = box["d"] = env.contexts.new("d")
        yield PrefillText(ctx, ids(13, 100))
        token = 5
        for i in range(12):
            token = (yield DecodeStep(ctx, token, last=i == 11)).token

    sinks = {"d": [], "p": []}
    eng.add(Request("d", RecipeParams("x"), sinks["d"].append, program_factory=decoder))
    steps = 0
    while not eng.idle and steps < STEP_CAP:
        d = box.get("d")
        if not sinks["p"] and d is not None and d.length == 15:  # its next token opens a block
            p = prefills((ids(120, 1000), False))  # more than the 7 free blocks hold
            eng.add(Request("p", RecipeParams("x"), sinks["p"].append, program_factory=p))
        eng.step()
        steps += 1
    assert finished(sinks["d"]) and finished(sinks["p"])
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert eng.runner.ahead.used > 0 and eng.runner.ahead.rolled_back == 0
    assert eng.pool.num_used == 0
