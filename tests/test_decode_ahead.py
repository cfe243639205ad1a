"""Decode steps run ahead give the results of steps run in turn: claimed rows where the program
fed the drawn token, rolled back (slot and random stream) where it did not."""

from __future__ import annotations

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
