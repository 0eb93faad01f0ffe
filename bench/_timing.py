""" Interleaved CPU timing of several variants of one operation, for the micro-benchmarks """
import time
from typing import Callable, Dict, List, Optional


def interleaved_times(variants: Dict[str, Callable[[], object]], repeats: int,
                      synchronize: Optional[Callable[[], None]] = None) -> Dict[str, List[float]]:
    """Seconds of each variant over `repeats` rounds, each round running every variant once in turn (A B C A B C ...,
    so a slow drift of the machine hits every variant alike), after one warm-up round that is not kept.
    `synchronize` (e.g. torch.cuda.synchronize) runs before and after each timed call."""
    sync = synchronize or (lambda: None)
    times = {name: [] for name in variants}
    for round_ in range(repeats + 1):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if round_:
                times[name].append(time.perf_counter() - t0)
    return times
