"""The SD-1.5 iteration benchmark's code paths, on tiny modules (the accelerator path cannot run here otherwise)."""

import math
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


@pytest.mark.slow
def test_sd15_iteration_runs_and_trains_on_tiny_modules(capsys):
    """The run path (random weights on the device, the jitted iteration with AdamW): finite losses that change
    between iterations (the LoRA was updated), and a timing line with the FLOP rate."""
    import sd15_step

    assert (
        sd15_step.main(["--size", "tiny", "--images", "4", "--microbatch", "2", "--steps", "2", "--iterations", "1"])
        == 0
    )
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"iteration \d+: [\d.]+ s, loss (\S+)", out)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), out
    assert losses[0] != losses[1], out
    assert re.search(r"s/iter \(median of 1\); \S+ PFLOP/iter -> \S+ TFLOP/s", out), out


@pytest.mark.slow
def test_sd15_abstract_memory_is_flat_in_steps_on_tiny_modules(capsys):
    """The abstract path: one image's chain gradient compiles to the same temporary memory at 2 and 4 steps."""
    import sd15_step

    args = [
        "--size",
        "tiny",
        "--abstract",
        "--images",
        "2",
        "--microbatch",
        "1",
        "--steps",
        "2",
        "--steps-list",
        "2",
        "4",
    ]
    assert sd15_step.main(args) == 0
    out = capsys.readouterr().out
    temps = re.findall(r"chain gradient \(replayed\), (\d) steps, (\w+) .*?temp (\S+) GiB", out)
    by_steps = {(steps, kind): float(temp) for steps, kind, temp in temps}
    assert len(by_steps) == 4, out
    for kind in ("stock", "fused"):
        assert by_steps[("2", kind)] == pytest.approx(by_steps[("4", kind)], rel=0.05), out
