"""Golden-case runner: compares our numbers with reference data from the published model.

`python -m irg_engine.parity CASE_DIR [CASE_DIR ...]` loads each case (`case.json` +
`expected.safetensors`, its checkpoint named by the `checkpoint` field), runs the case kind named
by its `case` field (see `parity_cases.py`), and prints one line per case with its worst relative
L2 error, then `N passed, M failed`; the exit code is non-zero if any case failed.

A case passes when every float tensor checked is within `--tolerance` relative L2 (default 1e-4,
the golden README's suggestion), every id, position and flag is equal, and uint8 images differ by
at most one level on at most 0.1% of values.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from irg_engine import checkpoint
from irg_engine.config import EngineConfig
from irg_engine.engine import Engine
from irg_engine.events import FINAL, Failed
from irg_engine.model.bagel import LoadedModel
from irg_engine.recipes.dense import DenseContexts, drive
from irg_engine.recipes.params import Observer, RecipeParams
from irg_engine.recipes.work import Env
from irg_engine.request import Request

DEFAULT_TOLERANCE = 1e-4
PIXEL_FRACTION = 1e-3


def rel_l2(ours: torch.Tensor, golden: torch.Tensor) -> float:
    ours, golden = ours.detach().double().cpu(), golden.double()
    denom = golden.norm()
    return float((ours - golden).norm() / denom) if denom > 0 else float(ours.norm())


@dataclass
class Checks:
    """Accumulates the comparisons of one case."""

    tolerance: float = DEFAULT_TOLERANCE
    worst: tuple[float, str] = (0.0, "")
    failures: list[str] = field(default_factory=list)
    count: int = 0

    def close(self, name: str, ours: torch.Tensor, golden: np.ndarray) -> None:
        self.count += 1
        g = torch.from_numpy(np.asarray(golden))
        if tuple(ours.shape) != tuple(g.shape):
            self.failures.append(f"{name}: shape {tuple(ours.shape)} != {tuple(g.shape)}")
            return
        err = rel_l2(ours, g)
        if err > self.worst[0] or not self.worst[1]:
            self.worst = (err, name)
        if not err <= self.tolerance:
            self.failures.append(f"{name}: rel L2 {err:.2e} > {self.tolerance:.0e}")

    def equal(self, name: str, ours, golden) -> None:
        self.count += 1
        a = np.asarray(ours.cpu() if isinstance(ours, torch.Tensor) else ours)
        b = np.asarray(golden)
        if a.shape != b.shape or not np.array_equal(a, b):
            self.failures.append(f"{name}: {_short(a)} != {_short(b)}")

    def pixels(self, name: str, ours: np.ndarray, golden: np.ndarray) -> None:
        self.count += 1
        if ours.shape != golden.shape:
            self.failures.append(f"{name}: shape {ours.shape} != {golden.shape}")
            return
        diff = np.abs(ours.astype(np.int16) - golden.astype(np.int16))
        off = int((diff > 0).sum())
        if diff.max(initial=0) > 1 or off > PIXEL_FRACTION * diff.size:
            self.failures.append(f"{name}: {off} of {diff.size} values differ, max {diff.max()}")


def _short(a: np.ndarray) -> str:
    flat = a.reshape(-1)
    text = np.array2string(flat[:8], separator=",")
    return f"{text[:-1]}, ...] (shape {a.shape})" if flat.size > 8 else f"{text} (shape {a.shape})"


@dataclass
class Case:
    root: Path
    spec: dict
    expected: dict[str, np.ndarray]

    @property
    def kind(self) -> str:
        return self.spec["case"]

    @staticmethod
    def load(root: Path) -> Case:
        spec = json.loads((root / "case.json").read_text())
        return Case(root, spec, load_file(str(root / "expected.safetensors")))

    def tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.expected[name].copy())


class ModelCache:
    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._models: dict[Path, LoadedModel] = {}

    def get(self, case: Case) -> LoadedModel:
        path = (case.root / case.spec["checkpoint"]).resolve()
        if path not in self._models:
            self._models[path] = checkpoint.load(path, self.device, dtype=torch.float32)
        return self._models[path]


class Executor:
    """Runs a program (`factory(env) -> generator`) to its end and returns its return value.

    The base class is the sequential reference (`recipes/dense.py`); `EngineExecutor` submits the
    program to a shared engine instead, so cases running in parallel threads share its steps.
    """

    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    def run(self, factory, observer: Observer | None = None):
        observer = observer or Observer()
        env = Env(self.model.tokenizer, self.model.cfg, DenseContexts(), observer)
        return drive(self.model, factory(env))

    def close(self) -> None:
        """Nothing to release for the sequential executor."""


class EngineExecutor(Executor):
    def __init__(self, model: LoadedModel) -> None:
        super().__init__(model)
        self.engine = Engine(model, EngineConfig())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        with torch.no_grad():
            while not self._stop.is_set():
                if not self.engine.step():
                    time.sleep(0.002)

    def run(self, factory, observer: Observer | None = None):
        done = threading.Event()
        final: list = []

        def emit(event) -> None:
            if isinstance(event, FINAL):
                final.append(event)
                done.set()

        req = Request(
            f"parity-{id(done)}",
            RecipeParams("parity"),
            emit,
            observer=observer,
            program_factory=factory,
        )
        self.engine.add(req)
        done.wait()
        if isinstance(final[0], Failed):
            raise RuntimeError(f"engine failed the case: {final[0].message}")
        return req.result

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.engine.close()


def run_case(
    case: Case, model: LoadedModel, tolerance: float, ex: Executor | None = None
) -> Checks:
    from irg_engine.parity_cases import CASES

    checks = Checks(tolerance)
    runner = CASES.get(case.kind)
    if runner is None:
        checks.failures.append(f"unknown case kind {case.kind!r}")
        return checks
    with torch.no_grad():
        runner(case, model, checks, ex or Executor(model))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m irg_engine.parity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("cases", nargs="+", type=Path, help="golden case folders")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    parser.add_argument(
        "--engine",
        action="store_true",
        help="run the cases through the batched engine, all submitted at once",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the model runs (float32 everywhere, TF32 off: CUDA is compared exactly)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="list every failure")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    models = ModelCache(args.device)
    executors: dict[int, Executor] = {}

    def one(root: Path) -> tuple[str, Checks, float]:
        start = time.perf_counter()
        try:
            case = Case.load(root)
            model = models.get(case)
            checks = run_case(case, model, args.tolerance, executors.get(id(model)))
            return case.kind, checks, time.perf_counter() - start
        except (OSError, KeyError, ValueError, RuntimeError, checkpoint.CheckpointError) as e:
            checks = Checks(args.tolerance)
            checks.failures.append(f"could not run: {e}")
            return root.name, checks, time.perf_counter() - start

    if args.engine:  # one engine per checkpoint; every case submitted at once, one thread each
        for root in args.cases:
            try:
                model = models.get(Case.load(root))
            except (OSError, KeyError, ValueError, checkpoint.CheckpointError):
                continue
            executors.setdefault(id(model), EngineExecutor(model))
        with ThreadPoolExecutor(max(1, len(args.cases))) as pool:
            results = list(pool.map(one, args.cases))
    else:
        results = [one(root) for root in args.cases]
    for ex in executors.values():
        ex.close()
    passed = failed = 0
    for label, checks, seconds in results:
        ok = not checks.failures and checks.count > 0
        passed += ok
        failed += not ok
        err, where = checks.worst
        print(
            f"{'PASS' if ok else 'FAIL'} {label:6s} worst rel L2 {err:.2e} ({where}), "
            f"{checks.count} checks, {seconds:.1f}s"
        )
        for failure in checks.failures if args.verbose else checks.failures[:3]:
            print(f"     {failure}")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
