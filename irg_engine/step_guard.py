"""A step's items through the runner so that a fault ends only the requests it belongs to, and
the engine's fault flag.

`run(items)` runs them as one step. If that raises, every sequence the step wrote is put back as
it was and each item runs alone: only the items that fail alone fail. When every item fails, the
fault looks like the engine's, so the guard flags it (`fault`, which /ready and the metrics
report) until a step succeeds. A request poisoned alone in its step looks the same, and a
balancer sends no traffic to a server that says it is faulty, so `probe` runs one greedy decode
step alone every `PROBE_INTERVAL_S` while a fault is flagged and the engine has no model work:
its success clears the flag; a model that is really broken keeps it. Success includes a token:
a model whose logits are NaN (an overflow in a low-precision dtype, say) runs its steps without
raising and fails every request at its first sampled token (`NonFiniteLogits`, which the engine
flags with `numbers=True`), so a probe that only ran the forward would clear the flag each time,
and so would any step that raises nothing (a prefill): such a fault clears only where a token is
drawn (`token_drawn`, or the probe's own).
"""

from __future__ import annotations

import logging
import time

from irg_engine.block_pool import BlockPool, KVSequence
from irg_engine.recipes.work import DecodeStep, Velocity
from irg_engine.runner import Runner, Scheduled
from irg_engine.sampler import NO_TOKEN

log = logging.getLogger("irg_engine")

PROBE_INTERVAL_S = 2.0


class StepGuard:
    def __init__(self, runner: Runner, pool: BlockPool) -> None:
        self.runner, self.pool = runner, pool
        self.fault: str | None = None
        self._numbers = False  # the fault is non-finite outputs: only a drawn token clears it
        self._probed = 0.0  # when `probe` last ran

    @property
    def healthy(self) -> bool:
        return self.fault is None

    def run(self, scheduled: list[Scheduled]) -> list[Exception | None]:
        """Each item's error, None where it ran (its result is on it)."""
        if (error := self._try(scheduled)) is None:
            if not self._numbers:
                self.fault = None
            return [None] * len(scheduled)
        log.error("engine step failed; retrying item by item", exc_info=error)
        errors = [self._try([sch]) for sch in scheduled]
        if all(errors):  # flagged before the failures go out, so readers see it with them
            self.flag(f"{type(error).__name__}: {error}")
        return errors

    def flag(self, fault: str, numbers: bool = False) -> None:
        """Record an engine fault (`numbers`: the model's outputs were not finite); the first
        probe comes `PROBE_INTERVAL_S` later, so the flag is seen even when nothing else runs."""
        self.fault, self._numbers = fault, numbers
        self._probed = time.monotonic()

    def token_drawn(self) -> None:
        """A decode row drew a real token: the model's numbers are sound again."""
        if self._numbers:
            self.fault, self._numbers = None, False

    def probe(self) -> None:
        """Call when the engine has no model work: one token alone, if a fault is flagged and
        the last probe is `PROBE_INTERVAL_S` old."""
        if self.healthy or time.monotonic() - self._probed < PROBE_INTERVAL_S:
            return
        self._probed = time.monotonic()
        seq = KVSequence("probe")
        # `last`: nothing is run ahead of it (decode-ahead) for a sequence freed right after.
        step = Scheduled(DecodeStep(seq, 0, last=True), 1)
        error = self._try([step])
        seq.free(self.pool)
        if error is None and step.result.token == NO_TOKEN:
            log.info("a probe step drew no token (non-finite logits): the fault stays")
            return
        if error is None:
            log.info("a probe step succeeded: the engine fault (%s) is cleared", self.fault)
            self.fault, self._numbers = None, False

    def _try(self, scheduled: list[Scheduled]) -> Exception | None:
        """Run these items; on an exception, put every sequence they wrote back as it was."""
        written = [s.item.ctx for s in scheduled if not isinstance(s.item, Velocity)]
        saved = [(seq, seq.save(self.pool)) for seq in written]
        try:
            self.runner.step(scheduled)
        except Exception as error:
            for seq, layout in saved:
                seq.restore(self.pool, layout)
            return error
        return None
