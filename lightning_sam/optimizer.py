"""`SAM`: a ``torch.optim.Optimizer`` that wraps a base optimizer with SAM's two steps."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_sam.functional import grad_norm_squared, perturb_, restore_

__all__ = ["SAM"]

_SAM_KEYS = ("rho", "adaptive", "eta", "perturb_eps")


def _validate_group(group: dict[str, Any]) -> None:
    """Check SAM's per-group hyperparameters; raise ``ValueError`` naming the fix."""
    rho, eta, eps = group["rho"], group["eta"], group["perturb_eps"]
    if not (isinstance(rho, int | float) and math.isfinite(rho) and rho >= 0):
        raise ValueError(f"Invalid rho: {rho!r}. rho is the radius of the ascent step and must be >= 0 (try 0.05).")
    if not (isinstance(eta, int | float) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"Invalid eta: {eta!r}. eta is ASAM's offset in |w| + eta and must be >= 0 (try 0.01).")
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps > 0):
        raise ValueError(
            f"Invalid perturb_eps: {eps!r}. It keeps rho / (norm + perturb_eps) finite and must be > 0 (try 1e-12)."
        )
    if not isinstance(group["adaptive"], bool):
        raise ValueError(f"Invalid adaptive: {group['adaptive']!r}. Pass True (ASAM) or False (SAM).")


class SAM(Optimizer):
    r"""Sharpness-Aware Minimization around any base optimizer.

    Each step takes the gradient ``g`` at ``w``, saves an exact copy of ``w`` and moves
    to ``w + e`` with ``e = rho * T² g / (‖T g‖ + perturb_eps)``, where the norm runs
    over all parameter groups and ``T = I`` (SAM, Foret et al. 2021) or
    ``T = diag(|w| + eta)`` for groups with ``adaptive=True`` (ASAM, Kwon et al. 2021).
    The caller computes the gradient at ``w + e``; SAM copies ``w`` back bitwise and lets
    the base optimizer step with that second gradient.

    The API is that of davda54/sam: ``first_step``, ``second_step`` and
    ``step(closure)``. Like timm's ``Lookahead``, the wrapper shares ``param_groups`` and
    ``state`` with its base optimizer, so LR schedulers, ``state_dict`` and
    ``load_state_dict`` see the base optimizer's state (momentum buffers, Adam moments)
    together with SAM's per-group ``rho``, ``adaptive``, ``eta`` and ``perturb_eps``.
    The copy of the weights lives outside ``state`` and only between the two steps.

    Args:
        params: Parameters or parameter groups; a group may set its own ``rho``,
            ``adaptive``, ``eta`` and ``perturb_eps``.
        base_optimizer: The optimizer class (not an instance) to step with, e.g.
            ``torch.optim.SGD``; it is built on the same parameter groups.
        rho: Radius of the ascent step (``>= 0``; 0 gives the base optimizer exactly).
        adaptive: Use ASAM's scale-invariant perturbation.
        eta: ASAM's offset in ``|w| + eta`` (``>= 0``). ASAM's recipe is
            ``adaptive=True, rho=0.5, eta=0.01``; ``eta=0`` reproduces davda54/sam.
        perturb_eps: Added to the norm (``> 0``). Named so that ``eps`` still reaches
            the base optimizer (``SAM(params, torch.optim.Adam, eps=1e-8)``).
        foreach: Use the ``torch._foreach_*`` path for SAM's own tensor math (None:
            torch's default, foreach on CUDA and per-tensor on the CPU). When set it is
            passed on to the base optimizer too; when None the base optimizer keeps its
            own default.
        **base_kwargs: Arguments of the base optimizer (``lr``, ``momentum`` ...).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = closure()  # the gradient at w
        >>> perturbed_loss = opt.step(closure)  # the gradient at w + e, then the SGD step
        >>> bool(perturbed_loss >= 0)
        True
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        perturb_eps: float = 1e-12,
        foreach: bool | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise ValueError(
                f"base_optimizer must be an optimizer class such as torch.optim.SGD, got {base_optimizer!r}. "
                "Pass the class itself and its arguments as keywords: SAM(params, torch.optim.SGD, lr=0.1)."
            )
        if foreach is not None:
            base_kwargs["foreach"] = foreach
        sam_defaults = {"rho": rho, "adaptive": adaptive, "eta": eta, "perturb_eps": perturb_eps}
        _validate_group(sam_defaults)
        super().__init__(params, {**sam_defaults, **base_kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        # What lives between first_step and second_step: the saved weights. Kept in a dict that is shared, not
        # rebound, because Lightning's and Fabric's optimizer wrappers copy this object's __dict__.
        self._between_steps: dict[str, list[tuple[list[Tensor], list[Tensor], bool | None]] | None] = {"saved": None}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to SAM and its base optimizer (they share ``param_groups``)."""
        for key in _SAM_KEYS:
            param_group.setdefault(key, self.defaults[key])
        _validate_group(param_group)
        if hasattr(self, "base_optimizer"):
            self.base_optimizer.add_param_group(param_group)
        else:  # called by Optimizer.__init__, before the base optimizer exists
            super().add_param_group(param_group)

    @property
    def is_perturbed(self) -> bool:
        """True between ``first_step`` and ``second_step``: the weights are at ``w + e``."""
        return self._between_steps["saved"] is not None

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """The global ``‖T g‖`` over all groups of the current gradients (0-dim tensor, no sync)."""
        return _global_norm(self._groups_with_grads())

    def _groups_with_grads(self) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]:
        """Each group that has gradients, with its parameters that have one and those gradients."""
        return [(group, *pg) for group in self.param_groups if (pg := _params_and_grads(group))[0]]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> Tensor:
        """Save the weights and move them to ``w + e`` along the current gradients.

        Parameters without a gradient are left where they are.

        Args:
            zero_grad: Clear the gradients afterwards, ready for the second backward.

        Returns:
            The global norm ``‖T g‖`` that scaled the perturbation (a 0-dim tensor; not
            read on the host).

        Raises:
            RuntimeError: The weights are already perturbed (``second_step`` was not called).
        """
        if self.is_perturbed:
            raise RuntimeError(
                "SAM.first_step() was called twice in a row: the weights are already perturbed. "
                "Call second_step() after the backward pass at the perturbed point."
            )
        groups = self._groups_with_grads()
        norm = _global_norm(groups)
        perturbed = []
        for group, params, grads in groups:
            scale = group["rho"] / (norm + group["perturb_eps"])
            foreach = group.get("foreach")
            backup = perturb_(params, grads, scale, adaptive=group["adaptive"], eta=group["eta"], foreach=foreach)
            perturbed.append((params, backup, foreach))
        self._between_steps["saved"] = perturbed
        if zero_grad:
            self.zero_grad()
        return norm

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved weights back (bitwise) without stepping; a no-op when not perturbed.

        Use it to abandon a step, e.g. when the second pass produced a non-finite loss.
        """
        for params, backup, foreach in self._between_steps["saved"] or ():
            restore_(params, backup, foreach=foreach)
        self._between_steps["saved"] = None

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the saved weights and step the base optimizer with the current gradients.

        Args:
            zero_grad: Clear the gradients afterwards.

        Raises:
            RuntimeError: ``first_step`` was not called before.
        """
        if not self.is_perturbed:
            raise RuntimeError(
                "SAM.second_step() was called without first_step(): the weights are not perturbed. "
                "Call first_step() after the first backward pass, or use step(closure)."
            )
        self.restore()
        self.base_optimizer.step()
        # Tell torch's LR schedulers that the optimizer stepped (they watch ``step`` only).
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Do the rest of a SAM step.

        With a closure (the davda54/sam API), the gradients at ``w`` must already be
        computed: ``first_step(zero_grad=True)`` unless the weights are already perturbed,
        then the closure (the gradient at ``w + e``), then ``second_step``. Without one,
        it finishes a step begun with ``first_step``: this is what
        ``torch.amp.GradScaler.step(opt)`` and Lightning's precision plugins call, so SAM
        works with them unchanged (the scaler skips the call on inf/nan gradients; then
        call [`restore`][lightning_sam.SAM.restore]).

        Args:
            closure: Clears the gradients, computes the loss at the (perturbed) weights,
                calls ``backward`` and returns the loss.

        Returns:
            What the closure returned (the loss at ``w + e``), or None without one.

        Raises:
            ValueError: No closure, and ``first_step`` was not called.
        """
        if closure is None:
            if not self.is_perturbed:
                raise ValueError(
                    "SAM.step() needs a closure that computes the loss and calls backward() at the perturbed "
                    "weights, e.g. opt.step(closure); or call opt.first_step() and the backward pass first."
                )
            self.second_step()
            return None
        if not self.is_perturbed:
            self.first_step(zero_grad=True)
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict and keep sharing ``param_groups`` and ``state`` with the base optimizer."""
        if self.is_perturbed:
            raise RuntimeError("Cannot load a state dict between first_step() and second_step(): call second_step().")
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups
        self.base_optimizer.state = self.state


def _global_norm(groups: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]) -> Tensor:
    """``sqrt`` of the per-group ``‖T g‖²`` summed: the norm runs over all groups, each with its own ``T``."""
    squares = [
        grad_norm_squared(params, grads, adaptive=group["adaptive"], eta=group["eta"], foreach=group.get("foreach"))
        for group, params, grads in groups
    ]
    if not squares:
        return torch.zeros(())
    device = squares[0].device
    return torch.stack([s.to(device) for s in squares]).sum().sqrt()


def _params_and_grads(group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
    """The group's parameters that have a gradient, and those gradients."""
    params = [p for p in group["params"] if p.grad is not None]
    return params, [p.grad for p in params]
