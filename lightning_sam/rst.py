"""`RST` (Zhao et al. 2022): SAM or the base optimizer at random, SAM with a scheduled probability ``p_t``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_sam.optimizer import SAM, BaseOptimizer
from lightning_sam.policy import Policy, StepContext, check_number

__all__ = ["RST", "RSTPolicy"]

ProbabilitySchedule = Literal["constant", "linear", "cosine", "step"]
_SCHEDULES = ("constant", "linear", "cosine", "step")


class RSTPolicy(Policy):
    """RST's choice: step ``t`` is a SAM step when a uniform draw is below ``p_t``, else a one-pass step.

    The draws come from a CPU ``torch.Generator`` seeded with ``seed``, the same on every
    rank; it advances by one draw per step taken (in ``commit``: a skipped or abandoned step
    draws again), and its state is each group's ``rst_generator`` (bytes, saved in
    ``state_dict``).
    ``ascends`` draws from a copy, so that asking twice gives the same answer.
    """

    chooses_passes = True

    def __init__(self, p: float, p_end: float, schedule: ProbabilitySchedule, seed: int) -> None:
        super().__init__()
        self.p, self.p_end, self.schedule, self.seed = p, p_end, schedule, seed

    def probability(self, step: int, total_steps: int | None) -> float:
        """``p_t`` at optimizer step ``step`` of ``total_steps`` (``p`` at the first, ``p_end`` at the last)."""
        if self.schedule == "constant":
            return self.p
        if total_steps is None:
            raise ValueError(
                f"RST's {self.schedule} schedule runs over the training: pass total_steps=<optimizer steps> to RST "
                "(SAMMixin sets it from the Trainer), or use schedule='constant'."
            )
        fraction = min(step / total_steps, 1.0)
        if self.schedule == "linear":
            weight = fraction
        elif self.schedule == "cosine":
            weight = (1.0 - math.cos(math.pi * fraction)) / 2.0
        else:  # "step": p for the first half, p_end for the second
            weight = float(fraction >= 0.5)
        return self.p + (self.p_end - self.p) * weight

    def length_needed(self, optimizer: SAM) -> str | None:  # noqa: D102
        return None if self.schedule == "constant" else f"RST's {self.schedule} schedule"

    def ascends(self, step: int, optimizer: SAM) -> bool:  # noqa: D102
        return _draw(_generator(optimizer)) < self.probability(step, optimizer.total_steps)

    def commit(self, ctx: StepContext, optimizer: SAM) -> None:  # noqa: D102
        generator = _generator(optimizer)
        _draw(generator)  # the step's draw, now taken
        state = _packed(generator)
        for group in optimizer.param_groups:
            group["rst_generator"] = state

    def setup_group(self, options: dict[str, Any]) -> None:  # noqa: D102
        options.setdefault("rst_generator", _packed(torch.Generator().manual_seed(self.seed)))


# The generator lives on the host, and so does every number read here: no device waits for any of them.


def _generator(optimizer: SAM) -> torch.Generator:
    """A generator in the committed state (the first group's)."""
    generator = torch.Generator()
    generator.set_state(torch.frombuffer(bytearray(optimizer.param_groups[0]["rst_generator"]), dtype=torch.uint8))
    return generator


def _packed(generator: torch.Generator) -> bytes:
    """The generator's state as bytes: a plain value in a checkpoint's parameter group (``==`` compares it)."""
    return bytes(generator.get_state().numpy().tobytes())


def _draw(generator: torch.Generator) -> float:
    """One uniform draw in ``[0, 1)``."""
    return float(torch.rand((), generator=generator, dtype=torch.float64))


class RST(SAM):
    r"""Randomized sharpness-aware training, RST (Zhao et al. 2022, "SS-SAM: Stochastic Scheduled SAM").

    At each step a Bernoulli trial with probability ``p_t`` picks a SAM step (two passes)
    or a step of the base optimizer (one pass): on average ``1 + mean(p_t)`` passes per
    step. ``p_t`` follows a schedule over the ``T = total_steps`` steps, from ``p`` to
    ``p_end``: ``"constant"`` (``p``), ``"linear"``, ``"cosine"`` (``p + (p_end − p) ·
    (1 − cos(π t/T)) / 2``) or ``"step"`` (``p`` for the first half, ``p_end`` after), the
    paper's constant, linear, trigonometric and piecewise families.

    The trial is the same on every rank (one generator, seeded with ``seed``), costs no
    device read, and a skipped step does not advance it; the generator's state is in the
    checkpoint, so that a resumed run draws what the uninterrupted one would.

    A class rather than ``SAM(..., switch_probability=...)``: the schedule takes four
    settings that mean nothing to SAM, the other variants would inherit them without
    honouring them, and it would mix with ``interval`` and ``start`` in ways no paper
    defines; as a class it is one ``Policy`` like every variant, refuses what it cannot
    honour, and names itself in a LightningCLI config (``class_path: lightning_sam.RST``).

    Args:
        params: As for [`SAM`][lightning_sam.SAM].
        base_optimizer: As for `SAM`.
        rho: As for `SAM`.
        p: The probability of a SAM step (at the first step, for a schedule); the paper's
            main setting is 0.5.
        p_end: The probability at the last step (for a schedule other than ``"constant"``).
        schedule: ``"constant"``, ``"linear"``, ``"cosine"`` or ``"step"``.
        seed: The generator's seed; the same on every rank.
        **kwargs: The other arguments of `SAM` (``total_steps``: ``T`` for a schedule, set by
            ``SAMMixin`` from the Trainer; not ``interval`` nor ``start``) and those of the base.

    Examples:
        >>> import torch
        >>> from lightning_sam import RST, SAMStep
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = RST(model.parameters(), torch.optim.SGD, rho=0.05, p=0.5, seed=0, lr=0.1)
        >>> step = SAMStep(opt, model)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> passes = []
        >>> for _ in range(8):
        ...     _ = step.run(lambda: torch.nn.functional.mse_loss(model(x), y))
        ...     passes.append(2 if step.ascending else 1)
        ...     opt.step()
        ...     opt.zero_grad()
        >>> draws = torch.rand(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> passes == [2 if u < 0.5 else 1 for u in draws.tolist()]
        True
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizer,
        rho: float = 0.05,
        p: float = 0.5,
        p_end: float | None = None,
        schedule: ProbabilitySchedule = "constant",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        check_number("p", p, 0.0, 1.0, hint="The probability of a SAM step: a number in [0, 1] (the paper's 0.5).")
        if schedule not in _SCHEDULES:
            raise ValueError(f"Invalid schedule: {schedule!r}. Pass one of {', '.join(map(repr, _SCHEDULES))}.")
        if schedule == "constant" and p_end is not None:
            raise ValueError(f"p_end={p_end!r} needs a schedule: pass schedule='linear' (or 'cosine', 'step').")
        if schedule != "constant":
            if p_end is None:
                raise ValueError(f"schedule={schedule!r} goes from p to p_end: pass p_end=... (a number in [0, 1]).")
            check_number("p_end", p_end, 0.0, 1.0, hint="The probability at the last step: a number in [0, 1].")
        check_number(
            "seed",
            seed,
            0,
            2**64 - 1,
            integer=True,
            hint="The generator's seed: an integer in [0, 2**64), the same on every rank.",
        )
        for key in ("interval", "start"):
            if key in kwargs:
                raise ValueError(f"RST takes no {key}: its draw decides at every step whether to ascend. Remove it.")
        policy = RSTPolicy(p, p if p_end is None else p_end, schedule, seed)
        super().__init__(params, base_optimizer, rho=rho, policy=policy, **kwargs)
