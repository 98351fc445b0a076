"""DDP communication hooks: Mem-SGD (error-feedback compression) and a local no-op hook.

Usage::

    state = ErrorFeedbackState(compressor=TopK(density=0.01), module=ddp_model)
    ddp_model.register_comm_hook(state, error_feedback_hook)

The whole data path of one bucket is :func:`error_feedback_hook`, top to bottom.

Exact resume.  A new DDP instance reduces its first step in one bucket that holds every
parameter and only then rebuilds its buckets (of ``bucket_cap_mb``) in the order in which the
gradients became ready.  A run resumed from a checkpoint therefore meets, at its first step, a
bucket layout that the uninterrupted run no longer uses, and compressing that bucket whole would
select other entries (top-k over the whole model instead of per bucket, other rand-k indices,
another QSGD norm).  The state dict records the bucket layouts in use (tuples of parameter keys);
at the first step after :meth:`ErrorFeedbackState.load_state_dict`, a bucket made of whole saved
layouts is split into them, and each is compressed and communicated exactly as the uninterrupted
run does it (one collective each, the same buffer, hence the same summation order on 3 or more
ranks, and the same randomness).  Randomness (rand-k indices, QSGD rounding) is keyed by the
bucket's parameter keys, not by ``bucket.index()``, so it is the same wherever DDP puts that
bucket in its list.  The resumed run is then bit-identical to the uninterrupted one, on any
number of ranks, for every compressor and through a warm-up (``start_iter``).

It is not bit-identical at that first step (later steps follow from it) when

* the state dict carries no ``"layouts"`` (it was written before they were recorded), or
* one of DDP's first buckets holds only *part* of a saved layout: DDP bucketed the first step
  by size (``find_unused_parameters=True`` on a model whose registration order is not its
  gradient order, or per-bucket caps) in a way that cuts across the saved layouts.

Such a bucket is compressed as it comes (a warning, once): correct Mem-SGD, no memory is lost,
but other entries are selected at that step.  A resume with another ``bucket_cap_mb``
splits its first step into the saved layouts and uses its own layout from the next step on.
"""

import functools
import logging
import math
import time
from collections.abc import Hashable, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ec_hooks import checkpoints, flat, kernels, transport
from ec_hooks.agreement import Agreement, compressor_config
from ec_hooks.compressors import Compressor, TopK, make_compressor
from ec_hooks.compressors.base import seed_from
from ec_hooks.layouts import SavedLayouts
from ec_hooks.memory import ErrorFeedbackMemory, Frozen, live_mask, memory_dtype
from ec_hooks.momentum import MomentumCorrection, VelocityUpdate, optimizer_conflicts
from ec_hooks.stats import CommStats
from ec_hooks.usage import ParameterUse, skips_unused_parameters
from ec_hooks.validation import check_int
from ec_hooks.warmup import DensityWarmup

__all__ = ["ErrorFeedbackState", "error_feedback_hook", "local_hook"]

logger = logging.getLogger(__name__)


class ErrorFeedbackState:
    """State of :func:`error_feedback_hook`: the compressor, the fp32 memories and the statistics.

    Args:
        process_group: the group to communicate in (default: the DDP model's group when
            ``module`` is one, else the world); refused when it is not the DDP model's group.
        compressor: a :class:`~ec_hooks.compressors.Compressor` or a name from
            ``ec_hooks.COMPRESSOR_NAMES`` (default ``TopK(density=0.01)``).
        start_iter: number of initial steps that use DDP's plain allreduce (no compression, memory
            untouched), as ``start_powerSGD_iter`` in torch's PowerSGD.
        module: the model (DDP-wrapped or not).  When given, memories are keyed by parameter name,
            so a state dict loads into any bucket layout and is checked against the model;
            without it, parameters are keyed by the order in which the hook first meets them,
            which is stable for a given model and ``bucket_cap_mb``.  Pass the DDP model: with
            ``find_unused_parameters=True`` the hook then leaves the memories of the parameters
            that DDP skips at a step untouched (see :mod:`ec_hooks.usage`).
        dense_fallback: allreduce the densified compressed bucket when allgathering the payloads
            would put more bytes on the wire than a ring allreduce of the dense bucket
            (``world_size * payload > 2 * dense``).
        momentum: momentum correction (DGC, see :mod:`ec_hooks.momentum`): each worker keeps an
            fp32 velocity ``u = momentum * u + g`` per parameter and feeds ``u`` to error
            feedback.  The optimizer must then step *without*
            momentum (``torch.optim.SGD(..., momentum=0)``): its momentum would apply on top.
            ``0`` (default) is plain error feedback.
        nesterov: Nesterov momentum: feed ``g + momentum * u`` instead of ``u``.
        weight_decay: add ``weight_decay * p`` to the local gradient before the velocity, where
            ``torch.optim.SGD`` adds it before its momentum (then set the optimizer's to 0).
        clip_norm: clip each worker's bucket gradient to this L2 norm before it enters the
            velocity and the memory (DGC's local clipping).  ``None`` (default): no clipping.
        density_warmup_steps: ramp the compressor's density from ``density_warmup_start`` down
            to its own, dividing by 4 per stage, over this many compressed steps (DGC's warm-up;
            top-k and rand-k).
        density_warmup_start: the ramp's first density (default 0.25, DGC's).
        momentum_masking: DGC's momentum factor masking: clear the velocity where the memory
            was sent (for compressors that send exact entries).  Default ``False``: the velocity
            is kept, so that every gradient gets its full momentum ``1 / (1 - mu)`` (measured
            better on the recipes, ``docs/momentum-correction.md``).
        send_momentum_tail: masking that keeps the mass: each entry sent also carries the
            momentum its velocity would still add to the memory, ``momentum / (1 - momentum) u``,
            and its velocity is cleared (top-k, rand-k, shared-index top-k; see :class:`~ec_hooks.momentum.MomentumCorrection`).
            Default ``False``.
        hierarchical: reduce dense inside each node and compress only between nodes
            (:mod:`ec_hooks.hierarchical`); needs the default process group.
        nodes: with ``hierarchical``, the global ranks of every node; default: ``LOCAL_WORLD_SIZE``
            consecutive ranks per node, as torchrun assigns them.  Not combined with momentum
            correction, weight decay, clipping or a density warm-up yet (ValueError).

    The process group is not part of the state dict (as in torch's ``PowerSGDState``).

    At the first step, and at the first step after each :meth:`load_state_dict`, the ranks
    compare their configurations and counters (:mod:`ec_hooks.agreement`) and all raise a
    ``ValueError`` naming what differs.  Sparse gradients (``nn.Embedding(sparse=True)``) and the
    compiled-autograd Python reducer are refused at construction when ``module`` shows them.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        compressor: Compressor | str | None = None,
        start_iter: int = 0,
        module: torch.nn.Module | None = None,
        dense_fallback: bool = True,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        clip_norm: float | None = None,
        density_warmup_steps: int = 0,
        momentum_masking: bool = False,
        density_warmup_start: float = 0.25,
        hierarchical: bool = False,
        nodes: Sequence[Sequence[int]] | None = None,
        send_momentum_tail: bool = False,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ErrorFeedbackState needs an initialized process group: call "
                "torch.distributed.init_process_group() before creating it"
            )
        if module is not None:
            _check_module(module)
            process_group = _group_of(module, process_group)
        self.process_group = process_group
        self.compressor = make_compressor(TopK(0.01) if compressor is None else compressor)
        self.start_iter = check_int("start_iter", start_iter, 0)
        if not isinstance(dense_fallback, bool):
            raise ValueError(f"dense_fallback must be True or False, got {dense_fallback!r}")
        self.dense_fallback = dense_fallback
        correction = MomentumCorrection(
            momentum, nesterov, weight_decay, clip_norm, momentum_masking, send_momentum_tail
        )
        # None: plain error feedback, no velocity is kept
        self.momentum_correction = (
            correction
            if (correction.momentum or correction.weight_decay or correction.clip_norm is not None)
            else None
        )
        self.density_warmup = DensityWarmup(self.compressor, density_warmup_steps, density_warmup_start)
        #: the transports each bucket chooses from, by bytes on the wire (see ec_hooks.transport)
        self.transports: tuple[transport.Transport, ...] = (
            transport.SharedIndexAllreduce(),
            transport.CandidateAllreduce(),
            transport.AllreduceMean(),
            transport.AllgatherSum(),
            *((transport.DenseAllreduce(),) if dense_fallback else ()),
        )
        #: how many buckets each transport has moved (by transport name)
        self.transport_counts: dict[str, int] = {}
        self.iteration = 0
        self.memory = ErrorFeedbackMemory()
        self.stats = CommStats()
        self._param_keys: dict[int, Hashable] = {}
        self._params: dict[Hashable, torch.Tensor] = {}  # for weight decay in the hook
        self._module_names: set[Hashable] | None = None
        self._shapes: dict[Hashable, int] = {}
        # Bucket layouts of the checkpoint last loaded (see the module docstring).
        self._saved_layouts = SavedLayouts()
        self._layout_seeds: dict[tuple, int] = {}
        self.hierarchy = None
        if not isinstance(hierarchical, bool):
            raise ValueError(f"hierarchical must be True or False, got {hierarchical!r}")
        if nodes is not None and not hierarchical:
            raise ValueError("nodes is only used with hierarchical=True")
        if hierarchical:
            if process_group is not None:
                raise ValueError(
                    "hierarchical=True works on the default process group: leave process_group=None"
                )
            if self.momentum_correction is not None or density_warmup_steps:
                raise ValueError(
                    "hierarchical=True is not combined with momentum correction (momentum, weight_decay, "
                    "clip_norm) or density_warmup_steps yet: leave them at their defaults"
                )
            from ec_hooks import hierarchical as _hierarchical

            self.hierarchy = _hierarchical.NodeHierarchy(self, _hierarchical.node_layout(nodes))
        self._usage: ParameterUse | None = None
        self._agreement = Agreement()
        self._resumed = False
        if module is not None:
            self.bind_module(module)

    @property
    def world_size(self) -> int:
        return transport.world_size(self.process_group)

    @property
    def rank(self) -> int:
        return transport.rank_in(self.process_group)

    def bind_module(self, module: torch.nn.Module) -> None:
        """Key the memories by the parameter names of ``module`` (DDP wrapper stripped)."""
        if isinstance(module, DistributedDataParallel):
            if self._usage is not None:
                self._usage.remove()
            self._usage = ParameterUse(module) if skips_unused_parameters(module) else None
            module = module.module
        self._param_keys = {id(p): name for name, p in module.named_parameters()}
        self._shapes = {name: p.numel() for name, p in module.named_parameters()}
        self._module_names = set(self._shapes)
        for name, p in module.named_parameters():
            self.memory.set_shape(name, p.shape)

    def _key(self, param: torch.Tensor) -> Hashable:
        key = self._param_keys.get(id(param))
        if key is None:
            if self._module_names is not None:
                # A copied or unpickled state no longer knows the model's parameters by identity;
                # numbering them would silently orphan name-keyed memories.
                raise ValueError(
                    "ErrorFeedbackState meets a parameter of no bound module: after copying or unpickling "
                    "the state, call state.bind_module(model) again"
                )
            key = f"param{len(self._param_keys)}"
            self._param_keys[id(param)] = key
            self.memory.set_shape(key, param.shape)
        self._params[key] = param
        return key

    def _layout_seed(self, keys: tuple) -> int:
        """The randomness key of a bucket: a digest of its parameter keys, identical on every
        worker and in every process (names are hashed with blake2b, never Python's ``hash``)."""
        seed = self._layout_seeds.get(keys)
        if seed is None:
            seed = self._layout_seeds[keys] = seed_from(*keys)
        return seed

    def _advance(self, bucket: dist.GradBucket) -> None:
        if bucket.is_last():
            if self._usage is not None:
                self._usage.end_step()
            self.iteration += 1
            self.stats.end_step()
            # Only the first step after a load meets DDP's initial bucket; from the next one on,
            # DDP's own (rebuilt) layout rules, as it did in the run that saved the state.
            self._saved_layouts.clear()

    def rescale_memories(self, factor: float) -> None:
        """Multiply the memories by ``factor``: call it when a GradScaler changes the loss scale.

        With AMP the hook sees gradients multiplied by the loss scale ``S``, so the memories hold
        residuals in units of ``S``.  After ``scaler.update()`` changed ``S_old`` to ``S_new``,
        ``state.rescale_memories(S_new / S_old)`` keeps them in step with the next gradients.
        The velocities of momentum correction are in the same units and are rescaled too.
        """
        if not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"factor must be a finite positive number, got {factor!r}")
        self.memory.scale_(factor)
        if self.momentum_correction is not None:
            self.momentum_correction.scale_(factor)

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """Warn (once per problem, in the log) about what in ``optimizer`` undoes the momentum
        correction: momentum or weight decay applied twice, or weight decay left after the
        hook's momentum (:func:`~ec_hooks.momentum.optimizer_conflicts`); returns the warnings.
        The hook cannot see the optimizer: call this once, after building both."""
        found = optimizer_conflicts(self.momentum_correction, optimizer)
        for problem in found:
            logger.warning("ErrorFeedbackState.check_optimizer: %s", problem)
        return found

    def _compressor_now(self) -> Compressor:
        return self.density_warmup.at(self.iteration - self.start_iter)

    @property
    def _corrected(self) -> MomentumCorrection:
        """The momentum correction, where a velocity exists (a state with momentum)."""
        assert self.momentum_correction is not None
        return self.momentum_correction

    def _velocity_step(self, keys: tuple, numels: Sequence[int], grad: torch.Tensor) -> VelocityUpdate | None:
        if self.momentum_correction is None:
            return None
        params = [self._params[k] for k in keys] if self.momentum_correction.weight_decay else None
        return self.momentum_correction.step(keys, numels, grad, params)

    def state_dict(self) -> dict:
        """Counters, memories (by parameter key), statistics and the bucket layouts in use."""
        layouts = self.memory.layouts() or self._saved_layouts.layouts
        return {
            "iteration": self.iteration,
            "start_iter": self.start_iter,
            "compressor": self.compressor.config(),
            "world_size": self.world_size,
            "rank": self.rank,
            "memories": self.memory.state_dict(),
            "shapes": {key: list(shape) for key, shape in self.memory.shapes.items()},
            **self._momentum_state_dict(),
            "layouts": sorted([list(layout) for layout in layouts], key=repr),
            "stats": self.stats.state_dict(),
            "hierarchy": None if self.hierarchy is None else self.hierarchy.describe(),
        }

    def _momentum_state_dict(self) -> dict:
        if self.momentum_correction is None:
            return {}
        return {
            "momentum_correction": self.momentum_correction.config(),
            "velocities": self.momentum_correction.velocity.state_dict(),
            "clip_scale": self.momentum_correction.clip_scale,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore memories, counters and bucket layouts; refuses a state of another world size,
        rank or model.  State dicts without ``"layouts"`` (older ones) load too; the first step
        after them is then not bit-identical to an uninterrupted run (see the module docstring)."""
        checkpoints.check_state_dict(
            state_dict,
            kind="an ErrorFeedbackState state dict",
            required=("memories",),
            owner="ErrorFeedbackState",
            world_size=self.world_size,
            rank=self.rank,
            missing_ok=True,
            why_world_size="error-feedback memories belong to individual workers and cannot be redistributed",
            why_rank="load each worker's own state (loading one rank's memory everywhere would send it n times)",
        )
        saved_hierarchy = state_dict.get("hierarchy")
        hierarchy = None if self.hierarchy is None else self.hierarchy.describe()
        if saved_hierarchy != hierarchy:
            raise ValueError(
                f"state_dict was saved with hierarchy={saved_hierarchy}, this state has hierarchy={hierarchy}: "
                "hierarchical memories hold a node's shard, flat ones a worker's whole gradient"
            )
        memories = state_dict["memories"]
        velocities = self._check_velocities(state_dict)
        shapes = state_dict.get("shapes")
        if shapes is not None and not isinstance(shapes, dict):
            raise ValueError(
                f"state_dict 'shapes' must map parameter keys to shapes, got {type(shapes).__name__}"
            )
        self.memory.check_state_dict(memories, shapes)
        if self._module_names is None:
            # Keys met by this state's earlier steps are known: check what can be checked now.
            for key, tensor in memories.items():
                known = self.memory.shapes.get(key)
                if known is not None and torch.as_tensor(tensor).numel() != math.prod(known):
                    raise ValueError(
                        f"state_dict memory for {key!r} has {torch.as_tensor(tensor).numel()} entries, "
                        f"the parameter has {math.prod(known)}: the state dict belongs to another model"
                    )
        else:
            for kind, tensors in (("memories", memories), ("velocities", velocities or {})):
                unknown = sorted(set(tensors) - self._module_names)
                if unknown:
                    raise ValueError(
                        f"state_dict has {kind} for parameters the model does not have: {unknown[:5]}"
                    )
                for key, tensor in tensors.items():
                    if torch.as_tensor(tensor).numel() != self._shapes[key]:
                        raise ValueError(
                            f"state_dict {kind} entry for {key!r} has {torch.as_tensor(tensor).numel()} entries, "
                            f"the parameter has {self._shapes[key]}"
                        )
        layouts = self._check_layouts(state_dict.get("layouts", []))
        checkpoints.warn_if_compressor_changed(
            logger, state_dict.get("compressor"), self.compressor, "error-feedback memories"
        )
        self.memory.load_state_dict(memories, shapes)
        if velocities is not None:
            self._corrected.velocity.load_state_dict(velocities)
            self._corrected.clip_scale = float(state_dict.get("clip_scale", 1.0))
        self._saved_layouts.expect(layouts)
        self._resumed = True
        self._agreement.expect()
        self.iteration = int(state_dict.get("iteration", 0))
        if "stats" in state_dict:
            self.stats.load_state_dict(state_dict["stats"])

    def _check_velocities(self, state_dict: dict) -> dict | None:
        """The velocities to load (``None``: this state keeps none), or a ValueError."""
        saved = state_dict.get("momentum_correction")
        ours = None if self.momentum_correction is None else self.momentum_correction.config()
        if saved != ours:
            # Velocities are optimizer state: continuing with other momentum settings is not a resume.
            raise ValueError(
                f"state_dict was saved with momentum_correction={saved}, this state has {ours}: resume with "
                "the same momentum, nesterov, weight_decay and clip_norm"
            )
        if ours is None:
            return None
        velocities = state_dict.get("velocities")
        if not isinstance(velocities, dict):
            raise ValueError("state_dict has momentum_correction settings but no 'velocities' dict")
        return velocities

    def _check_layouts(self, layouts) -> list[tuple]:
        if not isinstance(layouts, (list, tuple)) or not all(
            isinstance(x, (list, tuple)) and x for x in layouts
        ):
            raise ValueError(
                f"state_dict 'layouts' must be a list of non-empty lists of parameter keys, got {layouts!r}"
            )
        layouts = [tuple(layout) for layout in layouts]
        keys = [key for layout in layouts for key in layout]
        if len(set(keys)) != len(keys):
            raise ValueError("state_dict 'layouts' lists a parameter in more than one bucket layout")
        if self._module_names is not None:
            unknown = sorted(set(keys) - self._module_names, key=repr)
            if unknown:
                raise ValueError(
                    f"state_dict has bucket layouts with parameters the model does not have: {unknown[:5]}"
                )
        return layouts

    def __getstate__(self):
        # Process groups do not pickle; the state re-attaches to the default group.
        state = self.__dict__.copy()
        state["process_group"] = None
        state["_param_keys"] = {}
        state["_params"] = {}
        state["_usage"] = None  # hooks on the model's parameters: bind_module() adds them again
        return state

    def _agreement_fields(self, grad: torch.Tensor) -> dict:
        """What every rank must share (see :mod:`ec_hooks.agreement`)."""
        return {
            "hook": "error_feedback_hook",
            "compressor": compressor_config(self.compressor),
            "start_iter": self.start_iter,
            "dense_fallback": self.dense_fallback,
            "momentum_correction": None
            if self.momentum_correction is None
            else self.momentum_correction.config(),
            "density_warmup_steps": self.density_warmup.steps,
            "density_warmup_start": self.density_warmup.start,
            "transports": [type(t).__name__ for t in self.transports],
            "hierarchical": self.hierarchy is not None,
            "iteration": self.iteration,
            "resumed": self._resumed,
            "wire_dtype": str(grad.dtype),
            "skips_unused_parameters": self._usage is not None,
            "saved_layouts": sorted(map(repr, self._saved_layouts.layouts)),
        }


def _group_of(ddp: torch.nn.Module, process_group):
    """The DDP model's process group, which ``process_group`` (when given) must be."""
    group = getattr(ddp, "process_group", None) if isinstance(ddp, DistributedDataParallel) else None
    if group is None:
        return process_group
    if process_group is None:
        # The world stays None (the default), as a state built without module= has it.
        return None if group is dist.group.WORLD else group
    if process_group is not group and (
        dist.get_process_group_ranks(process_group) != dist.get_process_group_ranks(group)
    ):
        raise ValueError(
            f"process_group has ranks {dist.get_process_group_ranks(process_group)} but the DDP model "
            f"(module=) reduces over ranks {dist.get_process_group_ranks(group)}: pass process_group=None to use "
            "the DDP model's group"
        )
    return process_group


def _check_module(module: torch.nn.Module) -> None:
    """Refuse at construction what the hook cannot serve: sparse gradients, the compiled-autograd
    Python reducer (which calls comm hooks with one parameter, not a bucket)."""
    if getattr(module, "_use_python_reducer", False):
        raise ValueError(
            "this DDP model uses the compiled-autograd Python reducer (torch._dynamo.config.optimize_ddp = "
            "'python_reducer'), which calls comm hooks per parameter, not per bucket: error_feedback_hook needs "
            "buckets; use the default optimize_ddp mode ('ddp_optimizer') or do not compile the backward pass"
        )
    inner = module.module if isinstance(module, DistributedDataParallel) else module
    sparse = [
        name or type(m).__name__
        for name, m in inner.named_modules()
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse
    ]
    if sparse:
        raise ValueError(
            f"module has embeddings with sparse=True ({', '.join(sparse[:3])}): their gradients are sparse "
            "tensors, which error-feedback compression does not take; build them with sparse=False"
        )


def error_feedback_hook(
    state: ErrorFeedbackState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Mem-SGD for one DDP bucket (Stich, Cordonnier, Jaggi, 2018).

    With gradient ``g``, this worker's fp32 memory ``m`` and the compressor ``C``.  With momentum
    correction (``momentum``, ``weight_decay`` or ``clip_norm`` set, see
    :class:`~ec_hooks.momentum.MomentumCorrection`), ``g <- clip(g + wd p)``,
    ``u_new = mu u + g``, and the velocity ``s = u_new`` (Nesterov: ``g + mu u_new``) takes the
    place of ``g`` in steps 1-5; without it, ``s = g``.

    1. During warm-up (``iteration < start_iter``): DDP's plain allreduce of ``s``; memory
       untouched (with momentum correction, the velocity is then kept unmasked).
    2. ``acc = m + g`` in place in ``m``; inf/NaN gradient entries (an AMP overflow step) are
       not added, so they never enter memory.
    3. ``payload = C(acc)``, values in the gradient's dtype unless the compressor sets its own
       (top-k's ``value_dtype``); for top-k, 2 and 3 are one fused pass
       (:meth:`~ec_hooks.TopK.compress_error_feedback_`).
    4. Transport (:mod:`ec_hooks.transport`), with each worker's "non-finite" status word
       appended, by the transport of ``state.transports`` that accepts the compressor and puts
       the fewest bytes on the wire for this bucket: summable payloads are averaged by one
       allreduce; others are allgathered as one byte buffer each and summed (top-k: a
       scatter-add of all workers' values), unless the densified ``C(acc)`` allreduced costs
       less (``dense_fallback``); shared-index compressors (:class:`~ec_hooks.CyclicTopK`) have
       their leader broadcast the indices, then allreduce every worker's values there.
    5. When every worker's gradient was finite: ``m = acc - C(acc)`` (what was not sent stays).
       Otherwise the step is void everywhere: the finite gradient entries added in step 2 are
       taken out of ``m`` again (its value before step 2, to float rounding), and the
       result is NaN, so that a GradScaler sees the overflow on every rank and skips the step.
       With momentum correction, ``u = u_new`` when the step stands (else ``u`` is untouched);
       with ``momentum_masking``, ``u`` is then cleared where the compressor sent exact
       entries (top-k, rand-k; :meth:`~ec_hooks.Compressor.sent_indices`).
    6. Return the mean ``(1/n) sum_i C_i`` in the bucket's dtype.

    Invariant: ``sum_t s_t = sum_t C(acc_t) + m_T`` on every worker, to float rounding, where
    ``s_t`` is the gradient, or with momentum correction the velocity ``u_new`` of step ``t``
    (Nesterov: ``g_t + mu u_new``): no gradient mass is lost, momentum is applied before it is
    delayed.  Density warm-up (``density_warmup_steps``) only changes ``C`` per step.

    Before step 1, at the first call after construction or a load, the ranks compare their
    configurations (:mod:`ec_hooks.agreement`).  With ``find_unused_parameters=True``, the
    parameters that no rank used at this step are masked out of steps 2-6 (:mod:`ec_hooks.usage`):
    DDP drops their output, so their memories are neither selected from nor cleared.

    Randomness is keyed by the bucket's parameters; the first bucket after
    :meth:`ErrorFeedbackState.load_state_dict` goes through these steps once per saved bucket
    layout it holds (see the module docstring).
    """
    grad = _check_bucket(bucket)
    params = bucket.parameters()
    state._agreement.check(
        lambda: state._agreement_fields(grad), state.process_group, grad.device, "error_feedback_hook"
    )
    keys = tuple(state._key(p) for p in params)
    numels = [p.numel() for p in params]
    if sum(numels) != grad.numel():
        raise RuntimeError(
            f"bucket {bucket.index()} holds {grad.numel()} gradient entries, its parameters {sum(numels)}"
        )
    # Parameters that no rank used at this step: DDP drops their output, so their memories stay.
    live = None
    if state._usage is not None and state.iteration >= state.start_iter:
        live = live_mask(numels, state._usage.live(params, state.process_group, grad.device), grad.device)
    units = state._saved_layouts.split(keys)
    reduce = _reduce if state.hierarchy is None else state.hierarchy.reduce
    if units is None:
        fut = (
            reduce(state, keys, numels, grad)
            if live is None
            else _reduce_live(state, keys, numels, grad, live, reduce)
        )
    else:
        fut = _reduce_by_layout(state, keys, numels, grad, units, reduce, live)
    if state.hierarchy is not None and bucket.is_last():
        state.hierarchy.flush()  # the last bucket's exchange between nodes is still in flight
    state._advance(bucket)
    return fut


def _check_bucket(bucket) -> torch.Tensor:
    """The bucket's flat dense gradient; a clear error for what the hook cannot take."""
    if isinstance(bucket, (tuple, list)):
        raise TypeError(
            f"error_feedback_hook got a {type(bucket).__name__} of (gradient, parameter) instead of a DDP "
            "GradBucket: the compiled-autograd Python reducer (torch._dynamo.config.optimize_ddp = "
            "'python_reducer') calls comm hooks per parameter; use the default optimize_ddp mode "
            "('ddp_optimizer') or do not compile the backward pass"
        )
    grad = bucket.buffer()
    if grad.layout != torch.strided:
        raise TypeError(
            f"error_feedback_hook got a {grad.layout} gradient (bucket {bucket.index()}): sparse gradients, e.g. of "
            "nn.Embedding(sparse=True), cannot be compressed with error feedback; build the embedding with sparse=False"
        )
    return grad


def _reduce_by_layout(
    state: ErrorFeedbackState,
    keys: tuple,
    numels: Sequence[int],
    grad: torch.Tensor,
    units: list[tuple],
    reduce=None,
    live: torch.Tensor | None = None,
) -> torch.futures.Future[torch.Tensor]:
    """``reduce`` (:func:`_reduce` by default) of each saved layout in ``units`` on its slices of
    ``grad``, reassembled."""
    reduce = _reduce if reduce is None else reduce
    # The uninterrupted run met this very bucket at its first step: laying the memories out for
    # it once lists them in the same order (memory norms then sum in the same order too).
    state.memory.buffer_for(keys, numels, grad.device, memory_dtype(grad.dtype))
    where = dict(zip(keys, flat.spans(numels)))
    futures = []
    for unit in units:
        unit_grad = torch.cat([grad[slice(*where[k])] for k in unit])
        unit_numels = [where[k][1] - where[k][0] for k in unit]
        if live is None:
            futures.append(reduce(state, unit, unit_numels, unit_grad))
        else:
            unit_live = torch.cat([live[slice(*where[k])] for k in unit])
            futures.append(_reduce_live(state, unit, unit_numels, unit_grad, unit_live, reduce))

    def assemble(fut: torch.futures.Future) -> torch.Tensor:
        out = torch.empty_like(grad)
        for unit, unit_fut in zip(units, fut.value()):
            # wait(), not value(): on CUDA it also orders this stream after the unit's work
            mean = unit_fut.wait()
            for key, part in zip(unit, flat.split(mean, [where[k][1] - where[k][0] for k in unit])):
                out[slice(*where[key])].copy_(part)
        return out

    return torch.futures.collect_all(futures).then(assemble)


def _reduce(
    state: ErrorFeedbackState, keys: tuple, numels: Sequence[int], grad: torch.Tensor
) -> torch.futures.Future[torch.Tensor]:
    """Steps 1-6 of :func:`error_feedback_hook` for the flat gradient of parameters ``keys``."""
    group = state.process_group
    bytes_dense = grad.numel() * grad.element_size()
    # Registers the layout even in warm-up, so that a checkpoint taken then records it.
    memory = state.memory.buffer_for(keys, numels, grad.device, memory_dtype(grad.dtype))
    # 2a. momentum correction: error feedback accumulates the velocity instead of the gradient
    velocity = state._velocity_step(keys, numels, grad)
    signal = grad if velocity is None else velocity.signal
    if state.iteration < state.start_iter:
        state.stats.record(
            bytes_sent=bytes_dense, bytes_dense=bytes_dense, entries_sent=grad.numel(), entries=grad.numel()
        )
        if velocity is None:
            return transport.allreduce_mean(grad, group)
        return transport.allreduce_mean(signal.to(grad.dtype, copy=True), group).then(
            lambda fut: _commit_dense_velocity(state, velocity, fut.value())
        )

    started = time.perf_counter()
    compressor, n = state._compressor_now(), state.world_size
    key = state._layout_seed(keys)

    # 2-3. error compensation and compression; TopK fuses both into one pass over the bucket
    # (CyclicTopK only accumulates: its payload waits for the leader's indices, in the transport)
    # The fused kernels take fp32 memories; fp64 ones (fp64 models) take the reference path.
    compensate = (
        compressor.compress_error_feedback_
        if memory.dtype == torch.float32
        else functools.partial(Compressor.compress_error_feedback_, compressor)
    )
    payload, finite = compensate(
        memory, signal, step=state.iteration, key=key, rank=state.rank, wire_dtype=grad.dtype
    )
    tail = None  # (indices, values) of the momentum tails sent with the payload
    tails_added: list = []  # the same, for a shared-index transport (it adds them: add_tails)
    add_tails = None
    if velocity is not None and state._corrected.send_tail:
        corrected = state._corrected
        if payload is not None:
            payload, tail = _with_momentum_tails(
                state, compressor, memory, velocity, payload, key, grad.dtype
            )
        else:

            def add_tails(indices: torch.Tensor) -> None:
                tails = corrected.tail(velocity, indices).to(memory.dtype)
                memory.index_add_(0, indices, tails)
                tails_added.append((indices, tails))

    # 4. transport: the cheapest of the state's transports for this compressor and bucket
    chosen = transport.choose(state.transports, compressor, grad.numel(), grad.dtype, n)
    fut, bytes_sent = chosen.start(
        transport.Outgoing(
            compressor,
            memory,
            payload,
            finite,
            signal,
            grad.dtype,
            state.iteration,
            key,
            state.rank,
            add_tails,
        ),
        group,
    )
    state.transport_counts[chosen.name] = state.transport_counts.get(chosen.name, 0) + 1
    state.stats.record(
        bytes_sent=bytes_sent,
        bytes_dense=bytes_dense,
        entries_sent=compressor.entries_sent(grad.numel()),
        entries=grad.numel(),
        seconds=time.perf_counter() - started,
    )
    backend = compressor.backend

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        delivery = fut.value()
        tail_sent = tail if tail is not None or not tails_added else tails_added[0]
        mean, all_finite = delivery.mean, delivery.all_finite
        # 5. memory update, conditional on every worker's status
        if memory.is_cuda:
            # No host sync on the GPU path: the update is masked by the status instead.
            delivery.update_memory(memory, scale=all_finite.float())
            mean = torch.where(all_finite, mean, float("nan"))
        elif bool(all_finite):
            delivery.update_memory(memory)
        else:
            mean = torch.full_like(mean, float("nan"))
        kernels.undo_accumulate_(memory, signal, all_finite, backend=backend)
        if tail_sent is not None:
            # a voided step takes the tails out of the memory again (adds -0 when it stands)
            memory.index_add_(0, tail_sent[0], tail_sent[1] * (~all_finite).to(tail_sent[1].dtype), alpha=-1)
        if velocity is not None:
            sent = delivery.sent_indices() if tail_sent is None else tail_sent[0]
            state._corrected.commit(velocity, all_finite, sent)
        state.stats.set_residual(keys, memory, live_keys=state.memory.layouts())
        # 6. the bucket's new gradient
        return mean.to(grad.dtype).view_as(grad)

    return fut.then(finish)


def _with_momentum_tails(
    state: ErrorFeedbackState,
    compressor: Compressor,
    memory: torch.Tensor,
    velocity: VelocityUpdate,
    payload,
    key: int,
    wire_dtype: torch.dtype,
):
    """``send_momentum_tail``: the payload's entries with their velocity's tail added (in the
    memory too, which the sent values are then subtracted from), and ``(indices, tails)``; the
    payload unchanged and ``None`` for a compressor that sends every entry (nothing is masked)."""
    sent = compressor.sent_indices(payload)
    if sent is None or not sent.numel():
        return payload, None
    tails = state._corrected.tail(velocity, sent).to(memory.dtype)
    memory.index_add_(0, sent, tails)
    # The same entries again: top-k of a vector that is 0 elsewhere selects them (or 0-valued
    # fillers), rand-k draws the same indices for the same step and key.
    only_sent = torch.zeros_like(memory).index_copy_(0, sent, memory.index_select(0, sent))
    payload = compressor.compress(
        only_sent, step=state.iteration, key=key, rank=state.rank, wire_dtype=wire_dtype
    )
    return payload, (sent, tails)


def _commit_dense_velocity(
    state: ErrorFeedbackState, velocity: VelocityUpdate, mean: torch.Tensor
) -> torch.Tensor:
    """Warm-up with momentum correction: every entry went out uncompressed, nothing is masked;
    a non-finite mean (an overflow on some worker) keeps the old velocity."""
    state._corrected.commit(velocity, torch.isfinite(mean).all(), None)
    return mean


def _reduce_live(
    state: ErrorFeedbackState,
    keys: tuple,
    numels: Sequence[int],
    grad: torch.Tensor,
    live: torch.Tensor,
    reduce=None,
) -> torch.futures.Future[torch.Tensor]:
    """``reduce`` (:func:`_reduce` by default) of the live entries only (``live``: a mask over
    ``grad``): the others, parameters that DDP skips at this step, are zero in what is compressed,
    keep their memory and velocity (:class:`~ec_hooks.memory.Frozen`) and get a zero output (DDP
    drops it)."""
    reduce = _reduce if reduce is None else reduce
    buffers = [state.memory.buffer_for(keys, numels, grad.device, memory_dtype(grad.dtype))]
    if state.momentum_correction is not None:
        buffers.append(state.momentum_correction.velocity.buffer_for(keys, numels, grad.device))
    frozen = [Frozen(buffer, live) for buffer in buffers]
    # The skipped entries' per-parameter state steps aside for this step; what is compressed is the rest.
    for buffer in buffers:
        buffer.masked_fill_(~live, 0)
    fut = reduce(state, keys, numels, torch.where(live, grad, 0))

    def restore(fut: torch.futures.Future) -> torch.Tensor:
        mean = fut.value()
        for f in frozen:
            f.restore()
        return mean.masked_fill_(~live, 0)

    return fut.then(restore)


def local_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP comm hook that communicates nothing: every worker keeps its own gradient.

    For decentralized loops (DeepSqueeze, CHOCO-SGD, D-PSGD) that keep DDP for its conveniences
    (buffer broadcast, ``no_sync``) while the models are mixed by gossip after the optimizer step.
    ``state`` is ignored (pass ``None``).
    """
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut
