"""Decode steps run ahead give the results of steps run in turn: claimed rows where the program
fed the drawn token, rolled back (slot and random stream) where it did not."""

from __future__ import annotations

import time

import pytest
import torch

from irg_engine.config import EngineConfig
from irg_engine.engine import Engine
from irg_engine.recipes.work import DecodeStep, PrefillText
from irg_engine.request import RequestContexts
from irg_engine.runner import Scheduled


def test_steps_run_ahead_match_steps_run_in_turn(tiny_model):
    runners = [
        Engine(tiny_model, EngineConfig(decode_graphs="static", decode_ahead=ahead)).runner
        for ahead in (True, False)
    ]
    seqs, gens = [], []
    for runner in runners:
        contexts = RequestContexts(runner.pool)
        pair = [contexts.new("hot"), contexts.new("greedy")]
        for i, seq in enumerate(pair):
            runner.step([Scheduled(PrefillText(seq, [100 + i, 101, 102]), 3)])
        seqs.append((contexts, pair))
        gens.append(torch.Generator().manual_seed(7))
    fed = [[5, 6], [5, 6]]
    drawn = []
    # Steps 3 and 6 feed other tokens than the ones drawn: the rows run ahead are rolled back.
    for step in range(8):
        results = []
        for k, runner in enumerate(runners):
            _, (hot, greedy) = seqs[k]
            batch = [
                Scheduled(DecodeStep(hot, fed[k][0], 1.0, gens[k]), 1),
                Scheduled(DecodeStep(greedy, fed[k][1], 0.0, None), 1),
            ]
            runner.step(batch)
            results.append(batch)
            tokens = [sch.result.token for sch in batch]
            fed[k] = [t + 1 for t in tokens] if step in (2, 5) else tokens
        (a, b) = results
        assert [s.result.token for s in a] == [s.result.token for s in b], step
        for x, y in zip(a, b, strict=True):
            assert torch.allclose(x.result.logits, y.result.logits, atol=1e-6), step
        drawn.append([s.result.token for s in a])
        assert seqs[0][1][0].length == seqs[1][1][0].length
    ahead = runners[0].ahead
    assert ahead.used > 0 and ahead.rolled_back >= 4  # both rows, twice
    assert len({t for row in drawn for t in row}) > 2  # the hot row really samples
    ahead.claim([])  # the last launch, never claimed
    for runner, (contexts, _) in zip(runners, seqs, strict=True):
        contexts.free_all()
        assert runner.pool.num_used == 0


def test_a_row_launched_from_the_stop_token_gives_back_its_draw_at_once(tiny_model):
    """A claimed row launches the next step before its token is read; when that token turns out
    to be the stop token, the program ends and draws from its generator before any later step:
    the draw made for the row run ahead must already be undone by then."""
    runners = [
        Engine(tiny_model, EngineConfig(decode_graphs="static", decode_ahead=ahead)).runner
        for ahead in (True, False)
    ]
    sampled = []
    for runner in runners:
        contexts = RequestContexts(runner.pool)
        seq = contexts.new("hot")
        runner.step([Scheduled(PrefillText(seq, [100, 101, 102]), 3)])
        gen = torch.Generator().manual_seed(11)
        token, drawn = 5, []
        for _ in range(5):
            sch = Scheduled(DecodeStep(seq, token, 1.0, gen, stop_token=None), 1)
            runner.step([sch])
            token = sch.result.token
            drawn.append(token)
        sampled.append((runner, contexts, seq, gen, drawn))
    assert sampled[0][4] == sampled[1][4]
    # The next step's drawn token is the stop token: found on the runner without decode-ahead.
    _, _, seq, gen, drawn = sampled[1]
    probe = Scheduled(DecodeStep(seq, drawn[-1], 1.0, gen), 1)
    sampled[1][0].step([probe])
    stop = probe.result.token
    runner, contexts, seq, gen, drawn = sampled[0]
    last = Scheduled(DecodeStep(seq, drawn[-1], 1.0, gen, stop_token=stop), 1)
    runner.step([last])  # claimed, and the step after it launched before `stop` was read
    assert last.result.token == stop and runner.ahead.used >= 5
    assert all(not row.live for g in runner.ahead.pending for row in g.rows)
    # The program ends here and draws from its generator: as if nothing had run ahead.
    after = [float(torch.rand((), generator=s[3])) for s in sampled]
    assert after[0] == after[1]
    runner.ahead.claim([])
    for runner, contexts, *_ in sampled:
        contexts.free_all()
        assert runner.pool.num_used == 0


def test_a_claiming_step_launches_the_next_before_reading_its_tokens(tiny_model):
    runner = Engine(tiny_model, EngineConfig(decode_graphs="static")).runner
    contexts = RequestContexts(runner.pool)
    seq = contexts.new("greedy")
    runner.step([Scheduled(PrefillText(seq, [100, 101, 102]), 3)])
    token = 5
    for _ in range(4):
        sch = Scheduled(DecodeStep(seq, token), 1)
        runner.step([sch])
        token = sch.result.token
        (group,) = runner.ahead.pending
        (row,) = group.rows
        # Launched in this step, fed this step's token (known to the host by its end).
        assert row.live and row.token == token and row.length == seq.length
    assert runner.ahead.used == 3 and runner.ahead.rolled_back == 0
    runner.ahead.claim([])
    assert runner.ahead.rolled_back == 1
    contexts.free_all()
    assert runner.pool.num_used == 0


@pytest.mark.gpu
def test_a_claiming_step_does_not_wait_for_the_step_it_launched(tiny_dir):
    """On CUDA a claim reads its own tokens while the step it launched still runs: with ~1 s of
    device work queued behind that launch, the claiming step returns at once."""
    from irg_engine import checkpoint

    model = checkpoint.load(tiny_dir, "cuda", dtype=torch.float32)
    runner = Engine(model, EngineConfig()).runner
    contexts = RequestContexts(runner.pool)
    seq = contexts.new("s")
    runner.step([Scheduled(PrefillText(seq, [100, 101, 102]), 3)])
    token = 5
    for _ in range(3):  # capture, then claiming steps
        sch = Scheduled(DecodeStep(seq, token), 1)
        runner.step([sch])
        token = sch.result.token
    run = runner.graphs.run

    def slow(*args):
        out = run(*args)
        torch.cuda._sleep(2_000_000_000)  # ~1 s of device time behind the launch
        return out

    runner.graphs.run = slow
    sch = Scheduled(DecodeStep(seq, token), 1)
    t0 = time.perf_counter()
    runner.step([sch])
    assert time.perf_counter() - t0 < 0.2 and runner.ahead.used == 3
    torch.cuda.synchronize()
