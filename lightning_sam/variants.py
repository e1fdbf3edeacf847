"""Cheaper and better SAM variants: `LookSAM`, `GSAM`, `FriendlySAM` and `MSAM`, each a [`SAM`][lightning_sam.SAM].

Each keeps SAM's API (``Variant(params, base_optimizer_cls, rho=..., ..., **base_kwargs)``) and its guarantees
(bitwise restore, non-finite steps skipped, sharded parameters, ``state_dict``), and changes one of SAM's three
choices: which steps ascend (``ascent_due``), along what (``_ascent_directions``, ``perturb_before_forward``), and
what the base optimizer steps with (``_descent_gradient``). Their state is saved in checkpoints, as ``sam.*``
entries of each parameter's state (at run time it lives in ``sam_state``, apart from the base optimizer's
``state``). With gradient accumulation the first passes' gradients of a step add up, like the second passes'.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_sam.functional import _locals, dot
from lightning_sam.optimizer import SAM, _Group

__all__ = ["GSAM", "MSAM", "FriendlySAM", "LookSAM"]

_EPS = 1e-12


def _check(name: str, value: Any, low: float, high: float = math.inf, *, integer: bool = False, hint: str) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not (low <= value <= high) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r}. {hint}")


class _KeepsFirstGradient(SAM):
    """Keeps the first passes' gradient of an ascending step (summed over micro-batches) until its descent.

    In one buffer per parameter, reused from step to step (a temporary per step costs more
    than the arithmetic on a CPU); not saved, since it lives within a step.
    """

    ascent_must_be_global = True
    changes_the_descent = True
    _key = "_first_grad"  # "_": within a step, not saved

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._keeping: set[Tensor] = set()  # the parameters whose buffer holds this step's first gradient

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_keeping": set()}

    def _on_ascent(self, groups: list[_Group]) -> None:
        unscale = 1.0 / self._runtime.grad_scale  # in the units of the gradient the base optimizer will see
        for _, params, grads, _ in groups:
            for p, g in zip(params, _locals(grads), strict=True):
                kept = self.sam_state[p].get(self._key)
                if p in self._keeping and kept is not None:
                    kept.add_(g, alpha=unscale)
                    continue
                if kept is None or kept.shape != g.shape:
                    kept = self.sam_state[p][self._key] = torch.empty_like(g)
                torch.mul(g, unscale, out=kept)
                self._keeping.add(p)

    def _take_first_gradients(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], bool] | None:
        """(params, second gradients, kept first gradients (local), whether every gradient has one); None if none."""
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        kept = [p for p in params if p in self._keeping]
        self._keeping.clear()
        if not kept:
            return None
        grads = [p.grad for p in kept if p.grad is not None]
        return kept, grads, [self.sam_state[p][self._key] for p in kept], len(kept) == len(params)


class LookSAM(_KeepsFirstGradient):
    r"""LookSAM (Liu et al. 2022, "Towards Efficient and Scalable Sharpness-Aware Minimization").

    Every ``k``-th step is a SAM step; it also keeps ``g_v``, the part of the SAM
    gradient ``g_s`` orthogonal to the plain gradient ``g``:
    ``g_v = g_s − (⟨g_s, g⟩ / ‖g‖²) g``. The steps between take one pass and step with
    ``g + alpha · (‖g‖ / ‖g_v‖) · g_v``: about ``1 + 1/k`` passes per step.

    Args:
        params: As for [`SAM`][lightning_sam.SAM].
        base_optimizer: As for `SAM`.
        rho: As for `SAM`.
        k: A SAM step every ``k`` steps (the paper's 5).
        alpha: The weight of the kept direction (the paper's 0.7).
        **kwargs: The other arguments of `SAM` and those of the base optimizer.

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
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        k: int = 5,
        alpha: float = 0.7,
        **kwargs: Any,
    ) -> None:
        _check("k", k, 1, integer=True, hint="A SAM step every k steps: an integer >= 1 (the paper's 5).")
        _check("alpha", alpha, 0.0, hint="The weight of the kept direction: a number >= 0 (the paper's 0.7).")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        self.k, self.alpha = k, alpha

    def ascent_due(self) -> bool:  # noqa: D102
        return self.steps_taken % self.k == 0

    @torch.no_grad()
    def _descent_gradient(self, grad_scale: float) -> Tensor | None:
        taken = self._take_first_gradients()
        if taken is not None:  # a SAM step: keep the part of g_s orthogonal to g, in g's buffer (unscaled)
            params, g_s, g_local, whole = taken
            g_s_g, g_g = self._reduced(dot(g_s, g_local, like=g_s)), self._reduced(dot(g_local, g_local, like=g_s))
            c = float(g_s_g / (g_g + _EPS))
            for p, s_local, v in zip(params, _locals(g_s), g_local, strict=True):
                v.mul_(-c).add_(s_local).div_(grad_scale)  # g_v = g_s - c·g
                old = self.sam_state[p].get("looksam_gv")
                self.sam_state[p]["looksam_gv"] = v  # the buffers trade places: no allocation
                if old is not None and old.shape == v.shape:
                    self.sam_state[p][self._key] = old
                else:
                    del self.sam_state[p][self._key]
            gv_norm = self._reduced(dot(g_local, g_local, like=g_s)).sqrt()  # g_local now holds g_v
            for p in params:
                self.sam_state[p]["looksam_gv_norm"] = gv_norm
            return torch.isfinite(g_s_g) & torch.isfinite(g_g) if whole else None
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        params = [p for p in params if "looksam_gv" in self.sam_state[p]]
        if not params:
            return None
        grads = [p.grad for p in params if p.grad is not None]
        g_norm = self._reduced(dot(grads, grads)).sqrt()
        scale = float(self.alpha * g_norm / (self.sam_state[params[0]]["looksam_gv_norm"] + _EPS))
        for g, p in zip(_locals(grads), params, strict=True):
            g.add_(self.sam_state[p]["looksam_gv"], alpha=scale)
        whole = len(params) == sum(p.grad is not None for group in self.param_groups for p in group["params"])
        return torch.tensor(math.isfinite(scale)) & torch.isfinite(g_norm) if whole else None


class GSAM(_KeepsFirstGradient):
    r"""GSAM (Zhuang et al. 2022, "Surrogate Gap Guided Sharpness-Aware Minimization").

    A SAM step whose update also descends the surrogate gap: with ``∇f`` the gradient at
    ``w`` and ``∇f_p`` the one at ``w + e``, the base optimizer steps with
    ``∇f_p − alpha · ∇f_⊥``, where ``∇f_⊥ = ∇f − (⟨∇f, ∇f_p⟩ / ‖∇f_p‖²) ∇f_p`` is the
    part of ``∇f`` orthogonal to ``∇f_p``. Optionally ``rho`` follows the learning rate,
    as in the paper: ``rho_t = rho_min + (rho − rho_min)(lr_t − lr_min)/(lr_max − lr_min)``
    with ``lr_max`` each group's learning rate when the optimizer was built.

    Args:
        params: As for [`SAM`][lightning_sam.SAM].
        base_optimizer: As for `SAM`.
        rho: As for `SAM` (the largest ``rho`` when ``rho_min`` is set).
        alpha: The weight of the surrogate gap's descent (the paper's range 0.01-0.3).
        rho_min: Tie ``rho`` to the learning rate, down to ``rho_min`` at ``lr_min``.
        lr_min: The learning rate at which ``rho`` reaches ``rho_min``.
        **kwargs: The other arguments of `SAM` and those of the base optimizer.

    Examples:
        >>> import torch
        >>> from lightning_sam import GSAM, SAMStep
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.1, lr=0.1)
        >>> step = SAMStep(opt, model)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> loss = step.run(lambda: torch.nn.functional.mse_loss(model(x), y))
        >>> opt.step()
        >>> sorted(step.stats)
        ['first_order_sharpness', 'grad_norm', 'loss', 'perturbed_loss']
    """

    _key = "gsam_g"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        alpha: float = 0.1,
        rho_min: float | None = None,
        lr_min: float = 0.0,
        **kwargs: Any,
    ) -> None:
        _check("alpha", alpha, 0.0, hint="The weight of the surrogate gap's descent: a number >= 0 (try 0.1).")
        if rho_min is not None:
            _check("rho_min", rho_min, 0.0, rho, hint="The smallest rho: a number in [0, rho].")
        _check("lr_min", lr_min, 0.0, hint="The learning rate at which rho reaches rho_min: a number >= 0.")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        self.alpha, self.rho_min, self.lr_min = alpha, rho_min, lr_min
        for group in self.param_groups:
            group.setdefault("gsam_lr_max", group["lr"])

    def _radius(self, group: dict[str, Any]) -> float:
        if self.rho_min is None:
            return float(group["rho"])
        span = group["gsam_lr_max"] - self.lr_min
        fraction = (float(group["lr"]) - self.lr_min) / span if span > 0 else 1.0
        return float(self.rho_min + (group["rho"] - self.rho_min) * min(max(fraction, 0.0), 1.0))

    @torch.no_grad()
    def _descent_gradient(self, grad_scale: float) -> Tensor | None:
        taken = self._take_first_gradients()
        if taken is None:
            return None
        _, g_p, g_local, whole = taken  # g_p carries grad_scale, the kept ∇f does not
        g_gp, gp_gp = self._reduced(dot(g_local, g_p, like=g_p)), self._reduced(dot(g_p, g_p))
        c = float(g_gp / (gp_gp + _EPS))
        for gp_local, g in zip(_locals(g_p), g_local, strict=True):
            g.sub_(gp_local, alpha=c)  # the kept ∇f becomes ∇f_⊥ = ∇f − c·∇f_p, in place
            gp_local.sub_(g, alpha=self.alpha * grad_scale)
        return torch.isfinite(g_gp) & torch.isfinite(gp_gp) & torch.tensor(math.isfinite(c)) if whole else None


class FriendlySAM(SAM):
    r"""Friendly SAM (Li et al. 2024, "Friendly Sharpness-Aware Minimization").

    The ascent follows ``g − sigma · m`` instead of ``g``, where ``m`` is an exponential
    moving average of past gradients (``m ← lmbda · m + (1 − lmbda) · g``, after its use):
    the batch-specific part of the gradient, which is what SAM's generalization comes
    from, with the full-gradient part that hurts it taken out.

    Args:
        params: As for [`SAM`][lightning_sam.SAM].
        base_optimizer: As for `SAM`.
        rho: As for `SAM`.
        sigma: How much of the moving average to take out (the paper's 1).
        lmbda: The moving average's decay (the authors' code: 0.9; the paper's CIFAR runs
            0.6 to 0.95).
        **kwargs: The other arguments of `SAM` and those of the base optimizer.

    Examples:
        >>> import torch
        >>> from lightning_sam import FriendlySAM, SAMStep
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.9, lr=0.1)
        >>> step = SAMStep(opt, model)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> for _ in range(2):
        ...     _ = step.run(lambda: torch.nn.functional.mse_loss(model(x), y))
        ...     opt.step()
        ...     opt.zero_grad()
        >>> "fsam_m" in opt.sam_state[model.weight]  # the moving average, saved in state_dict
        True
    """

    ascent_must_be_global = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        **kwargs: Any,
    ) -> None:
        _check("sigma", sigma, 0.0, hint="How much of the moving average to take out: a number >= 0 (try 1.0).")
        _check("lmbda", lmbda, 0.0, 1.0, hint="The moving average's decay: a number in [0, 1] (try 0.9).")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        self.sigma, self.lmbda = sigma, lmbda

    @torch.no_grad()
    def _ascent_directions(self, groups: list[_Group]) -> list[list[Tensor]]:
        unscale = 1.0 / self._runtime.grad_scale  # the moving average is of unscaled gradients
        directions = []
        for _, params, grads, _ in groups:
            group_directions = []
            for p, g in zip(params, grads, strict=True):
                state = self.sam_state[p]
                m = state.get("fsam_m")
                if m is None:
                    state["fsam_m"] = g.detach() * unscale
                    group_directions.append(g)
                    continue
                d = state.get("_fsam_d")  # one buffer, reused every step; "_": not saved
                if d is None or d.shape != g.shape:
                    d = state["_fsam_d"] = torch.empty_like(g)
                torch.mul(g, unscale, out=d).sub_(m, alpha=self.sigma)  # d = g − sigma·m
                m.mul_(self.lmbda).add_(g, alpha=(1 - self.lmbda) * unscale)
                group_directions.append(d)
            directions.append(group_directions)
        return directions


class MSAM(SAM):
    r"""Momentum-SAM (Becker et al. 2024, "Momentum-SAM: Sharpness Aware Minimization without Computational Overhead").

    One pass per step: before the forward the weights move to ``w − rho · v / ‖v‖``, where
    ``v`` is the base optimizer's momentum (SGD's momentum buffer, Adam's first moment),
    the gradient is taken there, the weights go back to ``w`` (bitwise, from a copy) and
    the base optimizer steps with that gradient. No second pass; one copy of the weights.
    The first step, with no momentum yet, is the base optimizer's. Drive it with
    [`SAMStep`][lightning_sam.SAMStep] or ``SAMMixin`` (they call
    ``perturb_before_forward`` and ``restore``).

    Args:
        params: As for [`SAM`][lightning_sam.SAM].
        base_optimizer: SGD with ``momentum > 0``, or an optimizer that keeps ``exp_avg``
            (Adam, AdamW, NAdam, RAdam...).
        rho: The radius (the authors' default for SGD, 0.3).
        **kwargs: The other arguments of `SAM` and those of the base optimizer.

    Examples:
        >>> import torch
        >>> from lightning_sam import MSAM, SAMStep
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = MSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
        >>> step = SAMStep(opt, model)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> for _ in range(3):
        ...     _ = step.run(lambda: torch.nn.functional.mse_loss(model(x), y))  # one pass
        ...     opt.step()
        ...     opt.zero_grad()
        >>> step.ascending, opt.steps_taken
        (False, 3)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer],
        rho: float = 0.3,
        **kwargs: Any,
    ) -> None:
        if base_optimizer is torch.optim.SGD and not kwargs.get("momentum"):
            raise ValueError("MSAM perturbs along SGD's momentum: pass momentum > 0 (e.g. momentum=0.9).")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)

    def ascent_due(self) -> bool:  # noqa: D102
        return False

    @torch.no_grad()
    def perturb_before_forward(self) -> bool:  # noqa: D102
        groups: list[_Group] = []
        directions: list[list[Tensor]] = []
        radii: list[float] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if _momentum(self.state[p]) is not None]
            if params:
                groups.append((group, params, [], False))
                directions.append([_momentum(self.state[p]) for p in params])  # type: ignore[misc]
                radii.append(-self._radius(group))  # along −v, without a negated copy
        if not groups:
            return False
        self._perturb(groups, directions, radii)
        return bool(self._runtime.perturbed)


def _momentum(state: dict[str, Any]) -> Tensor | None:
    momentum: Tensor | None = state.get("momentum_buffer", state.get("exp_avg"))
    return momentum
