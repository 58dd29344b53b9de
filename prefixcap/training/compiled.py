"""train.compile: whether a run's training step goes through torch.compile.

``auto`` follows what was measured (issue 26; ``python benchmarks/compile_payback.py``, 2-core x86_64 CPU,
2026-12-06; benchmarks/results/compile_payback*_cpu.json). On the CPU a compiled quickstart step was 1.36-1.47x as
fast as an eager one for the prefix system and 1.15-1.38x for the cross-attention one, and the first step's compile
(44-45 s from nothing, 5-7 s with inductor's kernels already on disk) paid for itself after 758 and 818 steps: the
quickstart's 2,000 ended 1.07x sooner on a first run and 1.28x on later ones, while a 500-step cross-attention run
took 1.6x as long. So auto compiles a CPU run of AUTO_MIN_STEPS steps or more, unless a wall-clock budget
(train.max_seconds) is under AUTO_MIN_SECONDS: the payback was ~140 s of eager training. On CUDA and other
accelerators nothing was measured yet (no GPU was lent), so auto stays eager there until benchmarks/gpu_suite.sh
says otherwise.
"""

from __future__ import annotations

import torch

from prefixcap.config import TrainConfig

AUTO_MIN_STEPS = 1000
AUTO_MIN_SECONDS = 300.0


def compiles(train: TrainConfig, device: torch.device) -> bool:
    """Whether this run compiles its training step: train.compile as set, or auto's measured choice."""
    if train.compile != "auto":
        return train.compile
    long_enough = train.steps >= AUTO_MIN_STEPS and (train.max_seconds or AUTO_MIN_SECONDS) >= AUTO_MIN_SECONDS
    return device.type == "cpu" and long_enough and can_compile_on_cpu()


def can_compile_on_cpu() -> bool:
    """torch.compile builds CPU kernels with a C++ compiler and needs a Python that dynamo supports; without either
    it fails at the first step. Asked the way inductor looks for its compiler (torch._inductor.config.cpp.cxx)."""
    import torch._dynamo
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    if not torch._dynamo.is_dynamo_supported():
        return False
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        return False
    return True
