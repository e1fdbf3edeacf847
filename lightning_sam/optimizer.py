"""`SAM`: a ``torch.optim.Optimizer`` that wraps a base optimizer with SAM's two steps."""

from __future__ import annotations

import inspect
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_sam._compat import mark_stepped
from lightning_sam.functional import _resolve_foreach, all_finite, grad_norm_squared, perturb_, restore_

__all__ = ["SAM"]

_SAM_KEYS = ("rho", "adaptive", "eta", "perturb_eps")
_DAVDA54_STATE = ("old_p", "e_w")  # what davda54/sam and pytorch_optimizer leave in ``state`` between steps
_OURS = "sam."  # the variants' entries in a parameter's saved state

NonFinite = Literal["skip", "raise", "unchecked"]
_Group = tuple[dict[str, Any], list[Tensor], list[Tensor], bool]  # a group, its params with grads, grads, foreach


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _validate_group(group: dict[str, Any]) -> None:
    """Check SAM's per-group hyperparameters and parameters; raise ``ValueError`` naming the fix."""
    rho, eta, eps = group["rho"], group["eta"], group["perturb_eps"]
    if not (_is_number(rho) and rho >= 0):
        raise ValueError(f"Invalid rho: {rho!r}. rho is the radius of the ascent step and must be >= 0 (try 0.05).")
    if not (_is_number(eta) and eta >= 0):
        raise ValueError(f"Invalid eta: {eta!r}. eta is ASAM's offset in |w| + eta and must be >= 0 (try 0.01).")
    if not (_is_number(eps) and eps > 0):
        raise ValueError(
            f"Invalid perturb_eps: {eps!r}. It keeps rho / (norm + perturb_eps) finite and must be > 0 (try 1e-12)."
        )
    if not isinstance(group["adaptive"], bool):
        raise ValueError(f"Invalid adaptive: {group['adaptive']!r}. Pass True (ASAM) or False (SAM).")
    if group["adaptive"] and any(torch.is_complex(p) for p in group["params"]):
        raise ValueError(
            "ASAM (adaptive=True) is not defined for complex parameters (|w| scales a real direction). "
            "Use adaptive=False for this group, or split the complex parameters into their own group."
        )


@dataclass
class _Runtime:
    """What SAM keeps between ``first_step`` and the descent; never saved, never pickled.

    One object shared by reference, because Lightning's and Fabric's optimizer wrappers
    copy the optimizer's ``__dict__``.
    """

    perturbed: list[tuple[list[Tensor], list[Tensor], bool]] | None = None
    finite: bool = True
    buffers: dict[Tensor, Tensor] = field(default_factory=dict)
    driven: bool = False
    nonfinite: NonFinite = "skip"
    skipped_steps: int = 0
    warned: set[str] = field(default_factory=set)
    grad_scale: float = 1.0
    finalized: tuple[Tensor | None] | None = None  # set by finalize_gradient until the step takes it

    def buffers_for(self, params: list[Tensor]) -> list[Tensor]:
        """The saved-weights buffer of each parameter (of its local shard), allocated once and reused every step."""
        out = []
        for p in params:
            local = p.to_local() if hasattr(p, "to_local") else p
            buffer = self.buffers.get(p)
            if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (
                local.shape,
                local.dtype,
                local.device,
            ):
                buffer = self.buffers[p] = torch.empty_like(local, memory_format=torch.preserve_format)
            out.append(buffer)
        return out


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
    The copy of the weights lives outside ``state``, in one buffer per parameter that is
    allocated at the first step and reused (no allocation, no page faults per step).

    A gradient with a non-finite norm never moves the weights: ``first_step`` then leaves
    them at ``w`` (this costs one host sync per step). When a
    [`SAMStep`][lightning_sam.SAMStep] drives the optimizer (as ``SAMMixin`` does), both
    passes have run before ``step()``: it checks that the gradient is finite and steps
    the base optimizer, or skips the step and leaves weights and state unchanged.

    Args:
        params: Parameters or parameter groups; a group may set its own ``rho``,
            ``adaptive``, ``eta`` and ``perturb_eps``.
        base_optimizer: The optimizer class (not an instance) to step with, e.g.
            ``torch.optim.SGD``; it is built on the same parameter groups. Optimizers
            whose ``step`` needs a closure (``LBFGS``) cannot be wrapped.
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
        process_group: For parameters sharded by FSDP1 (``FullyShardedDataParallel``),
            whose gradients are plain tensors holding one rank's shard: the process group
            of the sharding, over which the squared norm and the finiteness check are
            summed (one all-reduce of a scalar each). Not for DDP (whose gradients are
            already whole on every rank) nor for FSDP2 or tensor parallelism (DTensor
            parameters are summed over their shards by themselves).
        interval: SAM on every ``interval``-th step only, the base optimizer alone (one
            pass) on the others (Composer's ``interval``).
        start: The first step with SAM (late-phase SAM, Zhou et al. 2024: the base
            optimizer alone before it): a step number, or a fraction in ``[0, 1)`` of
            ``total_steps``.
        total_steps: The length of the training in optimizer steps, for a fractional
            ``start`` (``SAMMixin`` sets it from the Trainer's ``estimated_stepping_batches``).
        **base_kwargs: Arguments of the base optimizer (``lr``, ``momentum`` ...).

    Examples:
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
        process_group: Any = None,
        interval: int = 1,
        start: int | float = 0,
        total_steps: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise ValueError(
                f"base_optimizer must be an optimizer class such as torch.optim.SGD, got {base_optimizer!r}. "
                "Pass the class itself and its arguments as keywords: SAM(params, torch.optim.SGD, lr=0.1)."
            )
        if issubclass(base_optimizer, SAM):
            raise ValueError("base_optimizer is itself a SAM optimizer: wrap the plain optimizer class instead.")
        closure = inspect.signature(base_optimizer.step).parameters.get("closure")
        if closure is not None and closure.default is inspect.Parameter.empty:
            raise ValueError(
                f"{base_optimizer.__name__}.step needs a closure (it re-evaluates the loss itself), so it cannot "
                "take SAM's second step from a given gradient. Use a first-order optimizer such as torch.optim.SGD "
                "or torch.optim.AdamW as the base."
            )
        if foreach is not None:
            base_kwargs["foreach"] = foreach
        sam_defaults = {"rho": rho, "adaptive": adaptive, "eta": eta, "perturb_eps": perturb_eps}
        _validate_group({**sam_defaults, "params": []})
        _validate_schedule(interval, start, total_steps)
        self._runtime = _Runtime()
        self.process_group = process_group
        self.interval, self.start, self.total_steps = interval, start, total_steps
        # The variants' tensors per parameter (kept apart from the base optimizer's state, which must start empty;
        # saved in state_dict as "sam.<name>" entries of each parameter's state).
        self.sam_state: defaultdict[Tensor, dict[str, Tensor]] = defaultdict(dict)
        super().__init__(params, {**sam_defaults, **base_kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)

    # Pickling, deepcopy and torch.save: the base optimizer travels, the runtime state does not.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_runtime"] = None
        state["process_group"] = None  # a process group does not pickle: set it again on the copy
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by torch's load_state_dict with the new state and groups only
        if self.__dict__.get("_runtime") is None:
            self._runtime = _Runtime()
        if "base_optimizer" not in self.__dict__:
            raise ValueError("This pickle holds no base optimizer: it was not made from a lightning_sam.SAM.")
        self.base_optimizer.param_groups = self.param_groups
        self.base_optimizer.state = self.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to SAM and its base optimizer (they share ``param_groups``)."""
        for key in _SAM_KEYS:
            param_group.setdefault(key, self.defaults[key])
        params = param_group["params"]
        param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
        _validate_group(param_group)
        if hasattr(self, "base_optimizer"):
            self.base_optimizer.add_param_group(param_group)
        else:  # called by Optimizer.__init__, before the base optimizer exists
            super().add_param_group(param_group)

    @property
    def is_perturbed(self) -> bool:
        """True between ``first_step`` and the restore: the weights may be at ``w + e``."""
        return self._runtime.perturbed is not None

    #: Variants whose state or update uses the first pass's gradient need it whole on every rank: under DDP
    #: their ascent is global (``SAMStep`` and ``SAMMixin`` take the first pass through the synced backward).
    ascent_must_be_global = False
    #: Variants that compute the update direction themselves: the finiteness check runs on it even when a
    #: GradScaler already checked the gradient it came from.
    changes_the_descent = False

    @property
    def steps_taken(self) -> int:
        """The optimizer steps taken so far (saved in ``state_dict``, as ``sam_steps`` of each group)."""
        return int(self.param_groups[0].get("sam_steps", 0))

    def ascent_due(self) -> bool:
        """Whether the coming step perturbs the weights (two passes) or not (one pass).

        With the defaults SAM always ascends; ``interval`` and ``start`` make it ascend on
        some steps only, and variants override this. [`SAMStep`][lightning_sam.SAMStep]
        and ``step(closure)`` run a single pass on the other steps.
        """
        start = self.start
        if isinstance(start, float):
            if self.total_steps is None:
                raise ValueError(
                    f"start={start} is a fraction of the training's length: pass total_steps=... to SAM (SAMMixin "
                    "sets it from the Trainer), or give start as a step number."
                )
            start = int(start * self.total_steps)
        step = self.steps_taken
        return step >= start and (step - start) % self.interval == 0

    def perturb_before_forward(self) -> bool:
        """For variants that perturb without a gradient (MSAM): move to ``w + e`` now; True if they did.

        Called before the forward pass of a one-pass step; ``restore()`` after its backward.
        """
        return False

    def _ascent_directions(self, groups: list[_Group]) -> list[list[Tensor]]:
        """What each group's ascent follows: the gradient (variants: a function of it)."""
        return [grads for _, _, grads, _ in groups]

    def _radius(self, group: dict[str, Any]) -> float:
        """The group's ascent radius for this step (variants: a schedule)."""
        return float(group["rho"])

    def _on_ascent(self, groups: list[_Group]) -> None:
        """After the ascent, with the first pass's gradients in ``.grad`` (variants keep what they need)."""

    def _descent_gradient(self, grad_scale: float) -> Tensor | None:
        """Before the base step, with the weights at ``w``: turn ``.grad`` into the update direction (variants).

        Args:
            grad_scale: The factor ``.grad`` carries now (a GradScaler's scale before its
                unscaling; 1 after it).

        Returns:
            None, or a 0-dim bool tensor that says whether the new direction is finite,
            when the variant knows it from what it computed (it spares a read of the
            gradients).
        """
        return None

    @torch.no_grad()
    def finalize_gradient(self, grad_scale: float = 1.0) -> None:
        """Turn ``.grad`` into this step's update direction now, for what reads it before ``step()``.

        Only the variants that compute their own direction (``changes_the_descent``:
        LookSAM, GSAM) change anything. Call it after the step's last backward and before
        clipping or inspecting the gradient (``SAMMixin`` does, so Lightning clips the
        direction the base optimizer steps with); ``step()`` then uses it as it is.

        Args:
            grad_scale: The factor ``.grad`` carries (a GradScaler's scale, before ``unscale_``).
        """
        if self._runtime.finalized is None:
            self._runtime.finalized = (self._descent_gradient(grad_scale),)

    def _take_descent_gradient(self) -> Tensor | None:
        """This step's direction, made now unless ``finalize_gradient`` made it; its known finiteness."""
        finalized, self._runtime.finalized = self._runtime.finalized, None
        return finalized[0] if finalized is not None else self._descent_gradient(1.0)

    def _reduced(self, value: Tensor) -> Tensor:
        """A sum over this rank's shards made the sum over every rank's (FSDP1's process group; else as it is)."""
        if self.process_group is not None:
            value = value.clone()
            torch.distributed.all_reduce(value, group=self.process_group)
        return value

    def _advance(self) -> None:
        """Count a step (whether it ran or was skipped), before its descent."""
        for group in self.param_groups:
            group["sam_steps"] = int(group.get("sam_steps", 0)) + 1

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """The global ``‖T g‖`` over all groups of the current gradients (0-dim tensor, no sync)."""
        return self._global_norm(self._groups_with_grads())

    def _global_norm(self, groups: list[_Group], directions: list[list[Tensor]] | None = None) -> Tensor:
        """``sqrt`` of the per-group ``‖T d‖²`` summed (``d``: the gradients, or ``directions``), over all groups."""
        vectors = directions if directions is not None else [grads for _, _, grads, _ in groups]
        squares = [
            grad_norm_squared(params, d, adaptive=group["adaptive"], eta=group["eta"], foreach=foreach)
            for (group, params, _, foreach), d in zip(groups, vectors, strict=True)
        ]
        total = torch.stack([s.to(squares[0].device) for s in squares]).sum() if squares else torch.zeros(())
        return self._reduced(total).sqrt()  # every rank joins, with or without gradients of its own

    def _groups_with_grads(self) -> list[_Group]:
        """Each group that has gradients: its parameters that have one, those gradients, and foreach or not."""
        groups = []
        for group in self.param_groups:
            params, grads = _params_and_grads(group)
            if params:
                groups.append((group, params, grads, _resolve_foreach(params, group.get("foreach"))))
        return groups

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scale: float = 1.0) -> Tensor:
        """Save the weights and move them to ``w + e`` along the current gradients.

        Parameters without a gradient are left where they are. If the norm of the
        gradient is not finite (an overflow, a NaN loss), no weight moves.

        Args:
            zero_grad: Clear the gradients afterwards, ready for the second backward.
            grad_scale: The factor the gradients carry (a GradScaler's scale). SAM's
                perturbation does not depend on it; the variants that keep the gradient
                (LookSAM, GSAM, FriendlySAM) divide it out.

        Returns:
            The global norm ``‖T g‖`` that scaled the perturbation (a 0-dim tensor).

        Raises:
            RuntimeError: The weights are already perturbed (``second_step`` was not called).
            ValueError: A gradient is sparse.
        """
        if self.is_perturbed:
            raise RuntimeError(
                "SAM.first_step() was called twice in a row: the weights are already perturbed. "
                "Call second_step() after the backward pass at the perturbed point."
            )
        groups = self._groups_with_grads()
        if not groups:
            _warn_once(
                self._runtime,
                "no_grads",
                "SAM.first_step found no parameter with a gradient, so the weights are not perturbed and the step is "
                "the base optimizer's. Run the backward pass first; under DeepSpeed ZeRO the gradients live in its "
                "own buffers, where SAM cannot see them (use DDP or FSDP2).",
            )
        self._runtime.grad_scale = grad_scale
        directions = self._ascent_directions(groups)
        norm = self._perturb(groups, directions, [self._radius(group) for group, *_ in groups])
        self._on_ascent(groups)
        if zero_grad:
            self.zero_grad()
        return norm

    def _perturb(self, groups: list[_Group], directions: list[list[Tensor]], radii: list[float]) -> Tensor:
        """Save ``w`` and move to ``w + radius · T² d / (‖T d‖ + eps)``; nothing moves if the norm is not finite."""
        norm = self._global_norm(groups, directions)
        runtime = self._runtime
        runtime.finite = bool(torch.isfinite(norm))  # the one host sync: never move w by a non-finite e
        perturbed = []
        if runtime.finite:
            for (group, params, _, foreach), d, radius in zip(groups, directions, radii, strict=True):
                scale = radius / (norm + group["perturb_eps"])
                backup = perturb_(
                    params,
                    d,
                    scale,
                    adaptive=group["adaptive"],
                    eta=group["eta"],
                    foreach=foreach,
                    out=runtime.buffers_for(params),
                )
                perturbed.append((params, backup, foreach))
        runtime.perturbed = perturbed
        return norm

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved weights back (bitwise) without stepping; a no-op when not perturbed.

        Use it to abandon a step, e.g. when the second pass produced a non-finite loss.
        """
        for params, backup, foreach in self._runtime.perturbed or ():
            restore_(params, backup, foreach=foreach)
        self._runtime.perturbed = None

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
        self._advance()
        self._take_descent_gradient()
        self._base_step()
        if zero_grad:
            self.zero_grad()

    def _base_step(self) -> None:
        self.base_optimizer.step()
        mark_stepped(self)

    @torch.no_grad()
    def _descend(self) -> bool:
        """A driven step's end: the weights are at ``w``, ``.grad`` holds the SAM gradient."""
        self.restore()  # a no-op unless a pass was abandoned with the weights still perturbed
        self._advance()
        known = self._take_descent_gradient()
        runtime = self._runtime
        check = runtime.nonfinite != "unchecked" or self.changes_the_descent
        if check and not (bool(known) if known is not None else self._grads_finite()):
            runtime.skipped_steps += 1
            message = (
                "SAM: the gradient is not finite (a NaN/inf loss or gradient in one of the passes); the step was "
                "skipped and the weights and optimizer state are unchanged."
            )
            if runtime.nonfinite == "raise":
                raise FloatingPointError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            return False
        self._base_step()
        return True

    def _grads_finite(self) -> bool:
        """Whether every gradient is finite: one read of the gradients, one host sync."""
        checks = [all_finite(grads, foreach=foreach) for _, _, grads, foreach in self._groups_with_grads()]
        finite = (
            torch.stack([c.to(checks[0].device) for c in checks]).all() if checks else torch.ones((), dtype=torch.bool)
        )
        if self.process_group is not None:  # every rank decides alike: skip if any shard is not finite
            not_finite = (~finite).float()
            torch.distributed.all_reduce(not_finite, group=self.process_group)
            return bool(not_finite == 0)
        return bool(finite)

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

        When a [`SAMStep`][lightning_sam.SAMStep] drives this optimizer, the closure (if
        any) runs both passes through it, and the step only descends: it skips a
        non-finite gradient (see ``SAMStep``'s ``nonfinite``) and otherwise steps the base
        optimizer.

        Args:
            closure: Clears the gradients, computes the loss at the (perturbed) weights,
                calls ``backward`` and returns the loss.

        Returns:
            What the closure returned (the loss at ``w + e``), or None without one.

        Raises:
            ValueError: No closure, and ``first_step`` was not called.
        """
        if self._runtime.driven:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._descend()
            return loss
        if closure is None:
            if not self.is_perturbed:
                raise ValueError(
                    "SAM.step() needs a closure that computes the loss and calls backward() at the perturbed "
                    "weights, e.g. opt.step(closure); or call opt.first_step() and the backward pass first."
                )
            self.second_step()
            return None
        if not self.is_perturbed and not self.ascent_due():  # a one-pass step: the gradient at w is the one
            self._advance()
            self._take_descent_gradient()
            self._base_step()
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
        """Load a state dict and keep sharing ``param_groups`` and ``state`` with the base optimizer.

        Also takes the state dict of the plain base optimizer (SAM's settings then stay
        as constructed) and those of davda54/sam and pytorch_optimizer's ``SAM`` (their
        leftover weight copies are dropped). The loaded settings are validated.
        """
        if self.is_perturbed:
            raise RuntimeError("Cannot load a state dict between first_step() and second_step(): call second_step().")
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"The state dict has {len(saved_groups) if isinstance(saved_groups, list) else 'no'} parameter "
                f"groups, this SAM has {len(self.param_groups)}: build the optimizer with the same groups."
            )
        groups = []
        for saved, current in zip(saved_groups, self.param_groups, strict=True):
            merged = {**{k: current[k] for k in _SAM_KEYS}, **saved}
            _validate_group({**merged, "params": current["params"]})
            groups.append(merged)
        state: dict[Any, Any] = {}
        ours: dict[Any, dict[str, Tensor]] = {}
        for key, value in state_dict.get("state", {}).items():
            if not isinstance(value, dict):
                state[key] = value
                continue
            if extra := {k[len(_OURS) :]: v for k, v in value.items() if k.startswith(_OURS)}:
                ours[key] = extra
            if base := {k: v for k, v in value.items() if not k.startswith(_OURS) and k not in _DAVDA54_STATE}:
                state[key] = base  # an empty entry is left out: the base optimizer initializes its own state
        super().load_state_dict({**state_dict, "param_groups": groups, "state": state})
        params = [p for group in self.param_groups for p in group["params"]]
        self.sam_state.clear()  # the same dict: optimizer wrappers hold it too
        for index, extra in ours.items():
            p = params[index]
            local = p.to_local() if hasattr(p, "to_local") else p
            self.sam_state[p] = {k: v.to(local.device) for k, v in extra.items()}

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and SAM's settings, with the variants' state as ``sam.*`` entries."""
        packed = super().state_dict()
        index = {id(p): i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        for p, extra in self.sam_state.items():
            saved = {_OURS + k: v for k, v in extra.items() if not k.startswith("_")}  # "_": within a step
            if saved:
                i = index[id(p)]
                packed["state"][i] = {**packed["state"].get(i, {}), **saved}
        return packed


def _validate_schedule(interval: Any, start: Any, total_steps: Any) -> None:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"Invalid interval: {interval!r}. SAM runs on every interval-th step: an integer >= 1.")
    valid_start = (isinstance(start, int) and not isinstance(start, bool) and start >= 0) or (
        isinstance(start, float) and 0.0 <= start < 1.0
    )
    if not valid_start:
        raise ValueError(
            f"Invalid start: {start!r}. The first step with SAM: a step number >= 0, or a fraction in [0, 1) of "
            "total_steps (0.7: SAM for the last 30% of the training)."
        )
    if total_steps is not None and (
        isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
    ):
        raise ValueError(f"Invalid total_steps: {total_steps!r}. The training's length in optimizer steps, >= 1.")


def _warn_once(runtime: _Runtime, key: str, message: str) -> None:
    if key not in runtime.warned:
        runtime.warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _params_and_grads(group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
    """The group's parameters that have a gradient, and those gradients."""
    params = [p for p in group["params"] if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]
    if any(g.is_sparse for g in grads):
        raise ValueError(
            "SAM got a sparse gradient (e.g. from nn.Embedding(sparse=True)); its norm and perturbation need dense "
            "gradients. Build the layer with sparse=False."
        )
    return params, grads
