"""`SAM`: a ``torch.optim.Optimizer`` that wraps a base optimizer with SAM's two steps."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_sam._compat import lightning_unrun_closure
from lightning_sam.policy import Policy, Schedule, is_number
from lightning_sam.protocol import StepProtocol

__all__ = ["SAM", "BaseOptimizer"]

BaseOptimizer = Callable[..., Optimizer]
"""An optimizer class, or a callable that builds one from parameter groups (``functools.partial``)."""

_SAM_KEYS = ("rho", "adaptive", "eta", "perturb_eps")
_DAVDA54_STATE = ("old_p", "e_w")  # what davda54/sam and pytorch_optimizer leave in ``state`` between steps
_OURS = "sam."  # the policy's entries in a parameter's saved state


class SAM(Optimizer):
    r"""Sharpness-Aware Minimization around any base optimizer.

    Each step takes the gradient ``g`` at ``w``, saves an exact copy of ``w`` and moves
    to ``w + e`` with ``e = rho * T² g / ‖T g‖``, where the norm runs over all parameter
    groups and ``T = I`` (SAM, Foret et al. 2021) or ``T = diag(|w| + eta)`` for groups
    with ``adaptive=True`` (ASAM, Kwon et al. 2021). The caller computes the gradient at
    ``w + e``; SAM copies ``w`` back bitwise and lets the base optimizer step with that
    second gradient.

    The API is that of davda54/sam: ``first_step``, ``second_step`` and
    ``step(closure)``. Like timm's ``Lookahead``, the wrapper shares ``param_groups`` and
    ``state`` with its base optimizer, so LR schedulers, ``state_dict`` and
    ``load_state_dict`` see the base optimizer's state (momentum buffers, Adam moments)
    together with SAM's per-group ``rho``, ``adaptive``, ``eta`` and ``perturb_eps``.

    Every step is a transaction (the rule is in [`lightning_sam.policy`][lightning_sam.policy]):
    what lives within it is in a fresh [`StepContext`][lightning_sam.policy.StepContext];
    the step reads one boolean on the host, its verdict, and a step that is not finite
    (or that a GradScaler skips, or that an exception abandons) leaves weights, optimizer
    state, the variant's state and ``steps_taken`` bitwise as they were. No weight ever
    moves by a non-finite amount. The variants are SAM with another
    [`Policy`][lightning_sam.policy.Policy] (``policy=``).

    Args:
        params: Parameters or parameter groups; a group may set its own ``rho``,
            ``adaptive``, ``eta`` and ``perturb_eps``.
        base_optimizer: The optimizer class (not an instance) to step with, e.g.
            ``torch.optim.SGD``, built on the same parameter groups with ``**base_kwargs``;
            or a callable that builds one from them, such as
            ``functools.partial(torch.optim.SGD, lr=0.1)`` (what LightningCLI passes for
            ``--optimizer.base_optimizer=torch.optim.SGD --optimizer.base_optimizer.lr=0.1``).
            Optimizers whose ``step`` needs a closure (``LBFGS``) cannot be wrapped.
        rho: Radius of the ascent step (``>= 0``; 0 gives the base optimizer exactly).
        adaptive: Use ASAM's scale-invariant perturbation.
        eta: ASAM's offset in ``|w| + eta`` (``>= 0``). ASAM's recipe is
            ``adaptive=True, rho=0.5, eta=0.01``; ``eta=0`` reproduces davda54/sam.
        perturb_eps: Added to the norm (``>= 0``; davda54/sam's 1e-12 if you want it). The
            default 0 keeps SAM invariant to the scale of the loss; a zero gradient moves
            nothing either way. Named so that ``eps`` still reaches the base optimizer.
        foreach: Use the ``torch._foreach_*`` path for SAM's own tensor math (None:
            torch's default, foreach on CUDA and per-tensor on the CPU). When set it is
            passed on to the base optimizer too.
        process_group: For parameters sharded by FSDP1 (``FullyShardedDataParallel``),
            whose gradients are plain tensors holding one rank's shard: the process group
            over which norms and the finiteness check are summed. Not for DDP nor for
            FSDP2 or tensor parallelism (DTensors are summed over their shards by themselves).
        interval: An ascent on every ``interval``-th step only, the base optimizer alone (one
            pass) on the others (Composer's ``interval``).
        start: The first step with an ascent (late-phase SAM, Zhou et al. 2024): a step
            number, or a fraction in ``[0, 1)`` of ``total_steps``.
        total_steps: The training's length in optimizer steps, for a fractional ``start``
            and the variants whose schedule runs over the training (AE-SAM's threshold, RST's
            probability); ``SAMMixin`` sets it at the first batch, from the fit as Lightning
            runs it ([`planned_steps`][lightning_sam.mixin.planned_steps]).
        policy: The variant's choices; None is SAM's (the variants' classes pass theirs).
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
        >>> bool(perturbed_loss >= 0), opt.steps_taken
        (True, 1)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        perturb_eps: float = 0.0,
        foreach: bool | None = None,
        process_group: Any = None,
        interval: int = 1,
        start: int | float = 0,
        total_steps: int | None = None,
        *,
        policy: Policy | None = None,
        **base_kwargs: Any,
    ) -> None:
        _validate_base(base_optimizer)
        if foreach is not None:
            base_kwargs["foreach"] = foreach
        sam_defaults = {"rho": rho, "adaptive": adaptive, "eta": eta, "perturb_eps": perturb_eps}
        _validate_group({**sam_defaults, "params": []})
        self.schedule = Schedule(interval, start, total_steps)
        self.policy = policy if policy is not None else Policy()
        self.protocol = StepProtocol(self)
        self.process_group = process_group
        super().__init__(params, {**sam_defaults, **base_kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        _validate_base(type(self.base_optimizer), built=True)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        for group in self.param_groups:
            self._setup_group(group)

    # Pickling, deepcopy and torch.save: the base optimizer and the policy travel, the open step does not.
    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k != "step"}  # an LR scheduler's counting wrapper: as
        return {**state, "protocol": None, "process_group": None}  # torch's optimizers; a process group does not pickle

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by torch's load_state_dict with the new state and groups only
        if self.__dict__.get("protocol") is None:
            self.protocol = StepProtocol(self)
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
            self._setup_group(self.param_groups[-1])
        else:  # called by Optimizer.__init__, before the base optimizer exists
            super().add_param_group(param_group)

    def _setup_group(self, group: dict[str, Any]) -> None:
        """The keys a group's checkpoint holds from the start (torch's distributed checkpoint loads no others)."""
        group.setdefault("sam_steps", self.param_groups[0].get("sam_steps", 0))
        group.setdefault("sam_ascents", self.param_groups[0].get("sam_ascents", 0))
        self.policy.setup_group(group)

    @property
    def sam_state(self) -> dict[Tensor, dict[str, Tensor]]:
        """The variant's state per parameter (saved in ``state_dict`` as ``sam.<name>`` entries)."""
        return self.policy.state

    @property
    def total_steps(self) -> int | None:
        """The training's length in optimizer steps, for a fractional ``start``."""
        return self.schedule.total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        self.schedule.total_steps = value

    @property
    def steps_taken(self) -> int:
        """The optimizer steps taken so far, never the skipped ones (saved in ``state_dict``)."""
        return int(self.param_groups[0].get("sam_steps", 0))

    @property
    def ascents_taken(self) -> int:
        """The steps taken so far that ascended (SAM steps; the others took one pass), saved in ``state_dict``."""
        return int(self.param_groups[0].get("sam_ascents", 0))

    @property
    def sam_fraction(self) -> float:
        """The fraction of the steps taken so far that were SAM steps (0 before the first step); no device read."""
        return self.ascents_taken / self.steps_taken if self.steps_taken else 0.0

    @property
    def skipped_steps(self) -> int:
        """The steps skipped as non-finite here (not saved; a GradScaler's skips are the scaler's)."""
        return self.protocol.skipped_steps

    @property
    def is_perturbed(self) -> bool:
        """True between the ascent and the restore: the weights may be at ``w + e``."""
        ctx = self.protocol.ctx
        return ctx is not None and ctx.perturbed is not None

    def restore(self) -> None:
        """Copy the saved weights back (bitwise) without stepping; a no-op when not perturbed."""
        self.protocol.restore()

    @torch.no_grad()
    def finalize_gradient(self, grad_scale: Tensor | float | None = None) -> None:
        """Turn ``.grad`` into this step's direction now, for what reads it before ``step()`` (clipping, hooks).

        Only variants that compute their own direction (LookSAM, GSAM) change anything. Call
        it after the step's last backward (``SAMMixin`` does, so that Lightning clips what
        the base optimizer steps with).

        Args:
            grad_scale: The factor ``.grad`` carries (a GradScaler's scale, before ``unscale_``).
        """
        self.protocol.finalize(self._as_scale(grad_scale))

    # The davda54/sam entry points ---------------------------------------------------------------------------

    def first_step(self, zero_grad: bool = False, grad_scale: Tensor | float | None = None) -> Tensor:
        """Begin a step: save the weights and move them to ``w + e`` along the current gradients.

        Args:
            zero_grad: Clear the gradients afterwards, ready for the second backward.
            grad_scale: The factor the gradients carry (a GradScaler's scale); the variants
                that keep the gradient divide it out.

        Returns:
            The global norm ``‖T g‖`` that scaled the perturbation (a 0-dim tensor).
        """
        if self.policy.pre_forward or self.policy.chooses_passes:
            raise ValueError(_no_first_gradient(self))
        if self.is_perturbed:
            raise RuntimeError(
                "SAM.first_step() was called twice in a row: the weights are already perturbed. "
                "Call second_step() after the backward pass at the perturbed point."
            )
        self.protocol.begin(grad_scale=self._as_scale(grad_scale))
        norm = self.protocol.perturb()
        if zero_grad:
            self.zero_grad()
        return norm

    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the saved weights and step the base optimizer with the current gradients (or skip a non-finite step).

        Args:
            zero_grad: Clear the gradients afterwards.
        """
        if self.policy.pre_forward or self.policy.chooses_passes:
            raise ValueError(_no_first_gradient(self))
        if not self.is_perturbed:
            raise RuntimeError(
                "SAM.second_step() was called without first_step(): the weights are not perturbed. "
                "Call first_step() after the first backward pass, or use step(closure)."
            )
        self.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Do the rest of a SAM step.

        With a closure (the davda54/sam API), the gradients at ``w`` must already be
        computed: SAM moves to ``w + e``, runs the closure (the gradient at ``w + e``) and
        steps. Without one, it finishes a step begun with ``first_step``: this is what
        ``torch.amp.GradScaler.step(opt)`` and Lightning's precision plugins call. When a
        [`SAMStep`][lightning_sam.SAMStep] drives this optimizer, the passes ran through
        it (the closure, if any, runs them) and the step only descends.

        Args:
            closure: Clears nothing, computes the loss at the current weights, calls
                ``backward`` and returns the loss.

        Returns:
            What the closure returned, or None if it did not run (without one, and on a step
            of davda54's loop that does not ascend: the gradient at ``w`` is the one).
        """
        protocol = self.protocol
        if closure is None and not self.is_perturbed and _initializes_state(self):
            self.base_optimizer.step()  # torch.distributed.checkpoint creates a fresh optimizer's state so
            self.policy.ensure_state([p for group in self.param_groups for p in group["params"]])
            return None
        if closure is None and not (protocol.driven or self.is_perturbed):
            raise ValueError(_needs_a_closure(self))
        if protocol.driven or closure is None or self.is_perturbed:  # the passes ran, or run in the closure
            perturbed = self.is_perturbed
            try:
                loss = None if closure is None else _run(closure)
            finally:
                protocol.restore()
            if perturbed:
                protocol.end_micro_batch()
            protocol.finish()
            return loss
        if _lacks_the_mixin(lightning_unrun_closure(closure)):  # no gradient at w: the forward runs inside
            raise _without_mixin(self)
        if not (protocol.begin().ascending and protocol.decide()):  # one pass: the gradient at w is the one
            protocol.finish()
            return None
        if self.policy.pre_forward:  # MSAM: the closure takes the only gradient, at the moved point
            self.zero_grad()
        protocol.perturb()
        if not self.policy.pre_forward:
            self.zero_grad()
        try:
            loss = _run(closure)
        finally:
            protocol.restore()
        protocol.end_micro_batch()
        protocol.finish()
        return loss

    def _as_scale(self, grad_scale: Tensor | float | None) -> Tensor | None:
        """A scale as a tensor on the parameters' device (one copy, not one per tensor)."""
        if grad_scale is None:
            return None
        return torch.as_tensor(grad_scale, device=self.param_groups[0]["params"][0].device)

    def sum_over_shards(self, value: Tensor) -> Tensor:
        """A sum over this rank's shards made the sum over every rank's (FSDP1's process group; else as it is)."""
        if self.process_group is not None:
            value = value.clone()
            torch.distributed.all_reduce(value, group=self.process_group)
        return value

    # Checkpoints ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and SAM's settings, with the variant's state as ``sam.*`` entries."""
        packed = super().state_dict()
        index = {id(p): i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        for p, entries in self.policy.state.items():
            if entries:
                i = index[id(p)]
                packed["state"][i] = {**packed["state"].get(i, {}), **{_OURS + k: v for k, v in entries.items()}}
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict and keep sharing ``param_groups`` and ``state`` with the base optimizer.

        Also takes the state dict of the plain base optimizer or of another variant (SAM's
        settings then stay as constructed; the variant's state starts afresh) and those of
        davda54/sam and pytorch_optimizer's ``SAM`` (their weight copies are dropped).
        """
        if self.is_perturbed:
            raise RuntimeError("Cannot load a state dict between first_step() and second_step(): call second_step().")
        saved_groups = _saved_groups(state_dict, self.param_groups)
        state, ours = _split_state(state_dict.get("state", {}), {_OURS + name for name in self.policy.state_names()})
        self.protocol.ctx = None
        super().load_state_dict({**state_dict, "param_groups": saved_groups, "state": state})
        # The saved groups name their parameters (indices, or names in torch's distributed checkpoints), as torch reads
        param_of = {
            key: p for saved, group in zip(saved_groups, self.param_groups, strict=True)
            for key, p in zip(saved["params"], group["params"], strict=True)
        }  # fmt: skip
        self.policy.state.clear()  # the same dict: optimizer wrappers hold it too
        for key, extra in ours.items():
            p = param_of[key]
            self.policy.state[p] = {k: v.to(p.device) for k, v in extra.items()}
        for group in self.param_groups:
            self._setup_group(group)


def _saved_groups(state_dict: dict[str, Any], current: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The saved groups, with SAM's settings where a state dict of the plain base optimizer has none; validated."""
    saved_groups = state_dict.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(current):
        raise ValueError(
            f"The state dict has {len(saved_groups) if isinstance(saved_groups, list) else 'no'} parameter "
            f"groups, this SAM has {len(current)}: build the optimizer with the same groups."
        )
    groups = []
    for saved, group in zip(saved_groups, current, strict=True):
        merged = {**{k: group[k] for k in _SAM_KEYS}, **saved}
        _validate_group({**merged, "params": group["params"]})
        groups.append(merged)
    return groups


def _split_state(saved: dict[Any, Any], ours: set[str]) -> tuple[dict[Any, Any], dict[Any, dict[str, Tensor]]]:
    """A saved ``state`` split into the base optimizer's and the policy's entries (davda54's copies dropped)."""
    base_state: dict[Any, Any] = {}
    policy_state: dict[Any, dict[str, Tensor]] = {}
    for key, value in saved.items():
        if not isinstance(value, dict):
            base_state[key] = value
            continue
        if extra := {k[len(_OURS) :]: v for k, v in value.items() if k in ours}:
            policy_state[key] = extra
        if base := {k: v for k, v in value.items() if not k.startswith(_OURS) and k not in _DAVDA54_STATE}:
            base_state[key] = base  # an empty entry is left out: the base optimizer initializes its own state
    return base_state, policy_state


def _initializes_state(optimizer: SAM) -> bool:
    """A step with zero gradients at learning rate 0 before any state exists (torch.distributed.checkpoint's way)."""
    if optimizer.state or not all(float(group.get("lr", 1.0)) == 0.0 for group in optimizer.param_groups):
        return False
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return bool(grads) and all(not bool(g.any()) for g in grads)  # host reads, on this rare path only


def _run(closure: Callable[[], Any]) -> Any:
    with torch.enable_grad():
        return closure()


def _validate_base(base_optimizer: Any, built: bool = False) -> None:
    """Refuse what cannot be a base optimizer: before building it (``built=False``), and the class of what was built."""
    if not built and (isinstance(base_optimizer, Optimizer) or not callable(base_optimizer)):
        raise ValueError(
            f"base_optimizer must be an optimizer class such as torch.optim.SGD, got {base_optimizer!r}. "
            "Pass the class itself and its arguments as keywords: SAM(params, torch.optim.SGD, lr=0.1)."
        )
    if not isinstance(base_optimizer, type):
        return  # a callable that builds one (functools.partial): what it builds is checked
    if not issubclass(base_optimizer, Optimizer):
        raise ValueError(
            f"base_optimizer must build a torch.optim.Optimizer, got a {base_optimizer.__name__}. "
            "Pass an optimizer class such as torch.optim.SGD (or a functools.partial of one)."
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


def _validate_group(group: dict[str, Any]) -> None:
    """Check SAM's per-group hyperparameters and parameters; raise ``ValueError`` naming the fix."""
    rho, eta, eps = group["rho"], group["eta"], group["perturb_eps"]
    if not (is_number(rho) and rho >= 0):
        raise ValueError(f"Invalid rho: {rho!r}. rho is the radius of the ascent step and must be >= 0 (try 0.05).")
    if not (is_number(eta) and eta >= 0):
        raise ValueError(f"Invalid eta: {eta!r}. eta is ASAM's offset in |w| + eta and must be >= 0 (try 0.01).")
    if not (is_number(eps) and eps >= 0):
        raise ValueError(f"Invalid perturb_eps: {eps!r}. It is added to the norm and must be >= 0 (the default: 0).")
    if not isinstance(group["adaptive"], bool):
        raise ValueError(f"Invalid adaptive: {group['adaptive']!r}. Pass True (ASAM) or False (SAM).")
    if group["adaptive"] and any(torch.is_complex(p) for p in group["params"]):
        raise ValueError(
            "ASAM (adaptive=True) is not defined for complex parameters (|w| scales a real direction). "
            "Use adaptive=False for this group, or split the complex parameters into their own group."
        )


def _needs_a_closure(optimizer: SAM) -> str:
    name = type(optimizer).__name__
    if optimizer.policy.pre_forward:
        message = f"{name}.step() needs a closure that computes the loss and calls backward()."
    else:
        message = (
            f"{name}.step() needs a closure that computes the loss and calls backward() at the perturbed weights, "
            "e.g. opt.step(closure); or call opt.first_step() and the backward pass first."
        )
    if "lightning.pytorch" in sys.modules:  # fp16's GradScaler and DeepSpeed step without a closure
        message += (
            f" In a LightningModule that returns a {name} from configure_optimizers, put SAMMixin first among its "
            "bases: `from lightning_sam import SAMMixin` and `class Model(SAMMixin, pl.LightningModule)`."
        )
    return message


def _lacks_the_mixin(module: Any | None) -> bool:
    """Whether ``module`` is a LightningModule without SAMMixin (None: no Lightning loop called)."""
    if module is None:
        return False
    mixin = sys.modules.get("lightning_sam.mixin")  # not imported: no module can be a SAMMixin
    return mixin is None or not isinstance(module, mixin.SAMMixin)


def _without_mixin(optimizer: SAM) -> Exception:
    """The error for a LightningModule under automatic optimization that returns a SAM without SAMMixin."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException  # Lightning called: it is there

    name = type(optimizer).__name__
    return MisconfigurationException(
        f"configure_optimizers returned a {name}, but the LightningModule does not use SAMMixin: Lightning's "
        f"automatic optimization runs the forward and backward inside {name}.step(closure), so {name} would train "
        "with the base optimizer alone. Put SAMMixin first among the module's bases: "
        "`from lightning_sam import SAMMixin` and `class Model(SAMMixin, pl.LightningModule)`."
    )


def _no_first_gradient(optimizer: SAM) -> str:
    name = type(optimizer).__name__
    if optimizer.policy.chooses_passes:
        return (
            f"{name} chooses at each step whether it takes a second pass, which first_step()/second_step() always "
            f"take. Use {name}.step(closure) after the backward pass at w (the closure runs the second pass only "
            "when the step needs it), or SAMStep/SAMMixin."
        )
    return (
        f"{name} perturbs before the forward pass and takes no gradient at w, so first_step()/second_step() cannot "
        f"run it. Use {name}.step(closure) (the closure computes the loss and calls backward), or SAMStep/SAMMixin."
    )
