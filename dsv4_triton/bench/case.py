"""What a family's benchmark module declares: a list of ``Case``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass
class Case:
    """One op at one shape.

    ``make_inputs(seed)`` builds one input set (a tuple of positional args) on the GPU;
    the harness builds several and rotates among them so the timed reads miss L2.
    ``run(*inputs)`` is our public op; ``eager(*inputs)`` what a user would write in
    torch instead (also timed under ``torch.compile``); ``oracle(*inputs)`` the FP32
    reference whose output the error column compares against (first output if a tuple).
    ``bytes``/``flops`` count the minimum traffic/work: each input read once, each
    output written once.  ``ceiling`` names the roof that binds: "copy", "bf16", "fp8".
    ``launches`` is the number of kernel launches one call must make (checked).
    """

    op: str
    shape: str
    make_inputs: Callable[[int], tuple]
    run: Callable[..., Any]
    bytes: int
    flops: int = 0
    ceiling: str = "copy"
    eager: Optional[Callable[..., Any]] = None
    compile_eager: bool = True
    oracle: Optional[Callable[..., Any]] = None
    launches: Optional[int] = None
    notes: str = ""
    extra: dict = field(default_factory=dict)


def runs_cuda(op: str, *meta_args) -> bool:
    """Whether the registry sends op ``op`` with arguments of these shapes to its ``cuda``
    backend on this GPU: the backend is available here and its own ``covers`` takes them
    (asked on meta tensors, so no case has to allocate its inputs to know)."""
    import torch

    from .. import registry

    impl = registry.ops()[op].impls["cuda"]
    return impl.available(torch.device("cuda"))[0] and impl.covers(*meta_args) == ""
