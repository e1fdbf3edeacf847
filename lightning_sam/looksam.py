"""`LookSAM` (Liu et al. 2022): SAM's ascent every ``k``-th step, and what it adds reused on the steps between."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_sam.functional import _locals, add_scaled_, copy_scaled_, dot, like_param, mul_
from lightning_sam.optimizer import SAM, BaseOptimizer
from lightning_sam.policy import (
    Policy,
    StepContext,
    check_number,
    first_and_second,
    groups_with_grads,
    guarded_ratio,
    present,
    zeros_like_param,
)

__all__ = ["LookSAM", "LookSAMPolicy"]


class LookSAMPolicy(Policy):
    r"""LookSAM's choices: a SAM step keeps ``g_v``; the steps between add ``alpha · ‖g‖/‖g_v‖ · g_v`` to ``g``.

    ``g_v = g_s − (⟨g_s, g⟩ / ‖g‖²) g`` over the whole gradient (a parameter that a pass
    did not reach counts as 0 there), in at least float32 whatever the weights' dtype.
    Saved: ``looksam_gv`` and ``looksam_gv_norm`` per parameter.
    """

    needs_global_ascent = True
    keeps_first_gradient = True

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def state_names(self) -> tuple[str, ...]:  # noqa: D102
        return ("looksam_gv", "looksam_gv_norm")

    @torch.no_grad()
    def descent(self, ctx: StepContext, optimizer: SAM, grad_scale: Tensor | None) -> Tensor | None:  # noqa: D102
        if ctx.ascending:
            return self._project(ctx, optimizer, grad_scale) if ctx.kept else None
        return self._reuse(optimizer)

    def _project(self, ctx: StepContext, optimizer: SAM, grad_scale: Tensor | None) -> Tensor:
        """A SAM step: the base optimizer steps with ``g_s`` as it is; ``g_v`` goes into the context for commit."""
        params, firsts, seconds = first_and_second(ctx, optimizer)
        first = [i for i, g in enumerate(firsts) if g is not None]
        only_second = [i for i, s in enumerate(seconds) if s is not None and firsts[i] is None]
        both = [i for i in first if seconds[i] is not None]
        g = present(firsts, first)
        g_s_g = optimizer.sum_over_shards(
            dot(present(seconds, both), present(firsts, both), like=present(params, both))
        )
        g_g = optimizer.sum_over_shards(dot(g, g, like=present(params, first)))
        c = guarded_ratio(g_s_g, g_g)  # in .grad's units: the kept g is unscaled, g_s carries grad_scale
        unscale = None if grad_scale is None else grad_scale.reciprocal()
        fresh = optimizer.protocol.buffers.get(present(params, only_second), "kept", wide=True)
        copy_scaled_(fresh, present(seconds, only_second), unscale)  # no first gradient: g_v = g_s / scale there
        mul_(g, -c)  # in place: each kept g becomes g_v = (g_s − c·g) / scale
        add_scaled_(present(firsts, both), present(seconds, both), 1.0)
        if unscale is not None:
            mul_(g, unscale)
        new = dict(zip(present(params, first) + present(params, only_second), g + fresh, strict=True))
        order = [p for p in params if p in new]
        g_v = [new[p] for p in order]
        gv_squared = optimizer.sum_over_shards(dot(g_v, g_v, like=order))
        ctx.outcome["looksam"] = (order, g_v, gv_squared.sqrt())
        return torch.isfinite(gv_squared) & torch.isfinite(g_g)  # g_v finite: g_s is; ‖g‖² finite: g is

    def _reuse(self, optimizer: SAM) -> Tensor | None:
        """A step between: ``g + alpha · ‖g‖ / ‖g_v‖ · g_v``, with ``‖g‖`` over every gradient."""
        params = [p for group in groups_with_grads(optimizer.param_groups) for p in group.params]
        if not params:
            return None
        grads = [p.grad for p in params if p.grad is not None]
        g_squared = optimizer.sum_over_shards(dot(grads, grads))
        with_gv = [p for p in params if "looksam_gv" in self.state.get(p, {})]
        if with_gv:  # every entry holds the same norm (ensure_state shares it)
            scale = guarded_ratio(self.alpha * g_squared.sqrt(), self.state[with_gv[0]]["looksam_gv_norm"])
            add_scaled_([p.grad for p in with_gv], [self.state[p]["looksam_gv"] for p in with_gv], scale)  # type: ignore[misc]
        return torch.isfinite(g_squared)  # g finite, and g_v (committed) and the guarded scale are

    @torch.no_grad()
    def commit(self, ctx: StepContext, optimizer: SAM) -> None:  # noqa: D102
        self.ensure_state([p for group in groups_with_grads(optimizer.param_groups) for p in group.params])
        outcome = ctx.outcome.get("looksam")
        if outcome is None:
            return
        params, g_v, norm = outcome
        self.ensure_state(params)
        fresh = set(params)
        for p, v in zip(params, g_v, strict=True):
            old = self.state[p]["looksam_gv"]
            self.state[p]["looksam_gv"] = like_param(p, v)
            optimizer.protocol.buffers.replace(p, "kept", _locals([old])[0])  # the buffers trade places
        for p, entries in self.state.items():
            if p not in fresh and "looksam_gv" in entries:  # reached by neither pass: the whole g_v is 0 there
                _locals([entries["looksam_gv"]])[0].zero_()
            entries["looksam_gv_norm"] = norm

    def ensure_state(self, params: list[Tensor]) -> None:  # noqa: D102
        shared = next((e["looksam_gv_norm"] for e in self.state.values() if "looksam_gv_norm" in e), None)
        for p in params:
            if "looksam_gv" not in self.state.get(p, {}):  # "no g_v yet": zeros, and the norm every entry shares
                if shared is None:  # (0 before a SAM step)
                    shared = torch.zeros((), device=p.device)
                self.state.setdefault(p, {}).update({"looksam_gv": zeros_like_param(p), "looksam_gv_norm": shared})


class LookSAM(SAM):
    r"""LookSAM (Liu et al. 2022, "Towards Efficient and Scalable Sharpness-Aware Minimization").

    Every ``k``-th step is a SAM step; it also keeps ``g_v``, the part of the SAM
    gradient ``g_s`` orthogonal to the plain gradient ``g``:
    ``g_v = g_s − (⟨g_s, g⟩ / ‖g‖²) g``. The steps between take one pass and step with
    ``g + alpha · (‖g‖ / ‖g_v‖) · g_v``: about ``1 + 1/k`` passes per step. Before the
    first SAM step (with ``start``) they are the base optimizer's.

    Args:
        params: As for [`SAM`][lightning_sam.SAM].
        base_optimizer: As for `SAM`.
        rho: As for `SAM`.
        k: A SAM step every ``k`` steps (the paper's 5); it is LookSAM's ``interval``.
        alpha: The weight of the kept direction (the paper's 0.7).
        **kwargs: The other arguments of `SAM` (``start`` too, not ``interval``) and those
            of the base optimizer.

    Examples:
        >>> import torch
        >>> from lightning_sam import LookSAM, SAMStep
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=5, lr=0.1)
        >>> step = SAMStep(opt, model)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> passes = []
        >>> for _ in range(6):
        ...     _ = step.run(lambda: torch.nn.functional.mse_loss(model(x), y))
        ...     passes.append(2 if step.ascending else 1)
        ...     opt.step()
        ...     opt.zero_grad()
        >>> passes
        [2, 1, 1, 1, 1, 2]
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizer,
        rho: float = 0.05,
        k: int = 5,
        alpha: float = 0.7,
        **kwargs: Any,
    ) -> None:
        check_number("k", k, 1, integer=True, hint="A SAM step every k steps: an integer >= 1 (the paper's 5).")
        check_number("alpha", alpha, 0.0, hint="The weight of the kept direction: a number >= 0 (the paper's 0.7).")
        if "interval" in kwargs:
            raise ValueError(f"LookSAM takes no interval: k is its interval. Pass k={kwargs['interval']!r} instead.")
        super().__init__(params, base_optimizer, rho=rho, interval=k, policy=LookSAMPolicy(alpha), **kwargs)

    @property
    def k(self) -> int:
        """A SAM step every ``k`` steps."""
        return self.schedule.interval
