"""``Trainer(strategy="deepsqueeze")`` (and ``"choco"``, ``"dpsgd"``): decentralized training.

Every worker trains its own copy of the model; DDP is kept for its conveniences (process group,
samplers, ``no_sync``) with :func:`ec_hooks.local_hook`, so no gradient is ever allreduced.
After each real optimizer step the models are mixed with the neighbours' by a gossip algorithm
of :mod:`ec_hooks.gossip`.  What the user sees is the *average* model ``x_bar``:

* validation, test and predict run on ``x_bar`` (one allreduce), and training then continues
  on the local models, bit for bit where it stopped;
* the checkpoint's ``state_dict`` is ``x_bar`` and loads strictly into the plain module; the
  checkpoint also carries every worker's local model, gossip buffers, optimizer and GradScaler
  state (:mod:`lightning_plugin.worker_state`), so ``fit(ckpt_path=...)`` resumes exactly;
* when ``fit`` ends, every worker's module holds ``x_bar``.

BatchNorm: DDP's per-forward buffer broadcast is turned off (``forward_sync_buffers=False``, or
``broadcast_buffers=False`` on older torch): each worker keeps the running statistics of its own
model.  They start equal (broadcast from rank 0) and are averaged with the parameters whenever
the average model is formed.  ``Trainer(sync_batchnorm=True)`` normalizes with statistics of all
workers' batches instead, at the price of an allreduce per BatchNorm layer and step.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from ec_hooks.compressors import Compressor
from ec_hooks.gossip import DPSGD, ChocoSGD, DeepSqueeze, GossipAlgorithm
from ec_hooks.hooks import local_hook
from ec_hooks.stats import CommStats
from ec_hooks.topology import Topology
from ec_hooks.validation import check_int, check_unit_interval
from lightning_plugin.arguments import (
    build_compressor,
    check_hierarchy,
    node_layout,
    reject_comm_hook_kwargs,
)
from lightning_plugin.averaging import ModelSwap, average_state_dict, broadcast_buffers
from lightning_plugin.worker_state import WorkerStateDDPStrategy

__all__ = ["GossipStrategy", "DeepSqueezeStrategy", "ChocoStrategy", "DPSGDStrategy"]

logger = logging.getLogger(__name__)

_DDP_HAS_FORWARD_SYNC_BUFFERS = (
    "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
)


class GossipStrategy(WorkerStateDDPStrategy):
    """Decentralized data-parallel training with a gossip algorithm (base of the concrete strategies).

    Args:
        topology: a name (``"ring"``, ``"torus"``, ``"complete"``, ``"exponential"``,
            ``"one_peer_exponential"``), a :class:`~ec_hooks.Topology` or a mixing matrix.
        compressor: a :class:`~ec_hooks.Compressor`, a compressor name, or ``None`` for the
            algorithm's default.
        density: fraction of the entries kept, for a compressor given by name.
        consensus_step: the mixing step in (0, 1]; ``None`` picks the default measured for the
            compressor (:func:`ec_hooks.gossip.default_consensus_step`).
        watch_every: measure the consensus distance every this many steps and warn when it keeps
            growing (0: off).
        hierarchical: average exactly inside each node and gossip between nodes; ``topology``
            is then over the nodes (:class:`ec_hooks.hierarchical.HierarchicalGossip`).  The
            nodes are the Trainer's ``num_nodes`` x ``devices`` unless ``nodes`` lists them.
        nodes: with ``hierarchical``, the global ranks of every node.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy`.

    One optimizer gossips all trainable parameters; with several optimizers, each optimizer's
    parameters are mixed after that optimizer's step.
    """

    algorithm_class: ClassVar[type[GossipAlgorithm]] = DeepSqueeze

    def __init__(
        self,
        topology: str | Topology | Any = "ring",
        compressor: str | Compressor | None = None,
        density: float | None = None,
        consensus_step: float | None = None,
        watch_every: int = 100,
        hierarchical: bool = False,
        nodes: list[list[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        reject_comm_hook_kwargs(type(self).__name__, kwargs)
        check_hierarchy(hierarchical, nodes)
        self.hierarchical = hierarchical
        self.nodes = nodes
        self.compressor = build_compressor(compressor, density)
        self.consensus_step = check_unit_interval("consensus_step", consensus_step, allow_none=True)
        self.watch_every = check_int("watch_every", watch_every, 0)
        if not isinstance(topology, (str, Topology)):
            try:
                topology = Topology.from_matrix(topology)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"topology: {exc}") from exc
        self.topology = topology
        self._check_algorithm_arguments()
        if "broadcast_buffers" not in kwargs and "forward_sync_buffers" not in kwargs:
            kwargs["forward_sync_buffers" if _DDP_HAS_FORWARD_SYNC_BUFFERS else "broadcast_buffers"] = False
        super().__init__(**kwargs)
        self.gossips: list[GossipAlgorithm] = []
        self._gossip_optimizers: list[int] = []
        self._swap = ModelSwap()
        self._stepped: dict[int, bool] = {}
        self._step_hooks: list = []

    def _check_algorithm_arguments(self) -> None:
        # A dry run of the algorithm's own constructor on simulated workers, so that every
        # argument it would reject at setup is rejected now, with its message.
        n = self.topology.size if isinstance(self.topology, Topology) else 4
        self.algorithm_class.simulated(
            [[torch.zeros(1)] for _ in range(n)], self.topology, self.compressor, self.consensus_step
        )

    # ------------------------------------------------------------------ what the monitor reads

    @property
    def comm_stats(self) -> list[CommStats]:
        """Communication statistics of this worker, one per gossip group."""
        return [gossip.stats for gossip in self.gossips]

    def consensus_distance(self) -> float:
        """``sqrt((1/n) sum_i ||x_i - x_bar||^2)`` over all gossiped parameters.  Collective."""
        if self._swap.holding_average:
            return 0.0
        return sum(gossip.consensus_distance() ** 2 for gossip in self.gossips) ** 0.5

    # ------------------------------------------------------------------ setup

    @override
    def _register_ddp_hooks(self) -> None:
        # On every device: the stock DDPStrategy registers hooks on CUDA only.
        assert isinstance(self.model, DistributedDataParallel)
        self.model.register_comm_hook(None, local_hook)

    @override
    def setup(self, trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        # DDP's constructor gave every worker rank 0's parameters, but not its buffers when
        # broadcast_buffers=False: every worker starts from rank 0's BatchNorm statistics too.
        assert self.lightning_module is not None
        broadcast_buffers(self.lightning_module)
        self._remove_step_hooks()
        self._swap = ModelSwap()
        self.gossips = self._make_gossips()
        self._stepped = {}
        for optimizer in self.optimizers:
            self._step_hooks.append(optimizer.register_step_post_hook(self._mark_stepped))
        rank_zero_info(f"{type(self).__name__}: {', '.join(repr(g) for g in self.gossips)}")

    def _make_gossips(self) -> list[GossipAlgorithm]:
        owned: set[int] = set()
        gossips = []
        self._gossip_optimizers = []
        for optimizer in self.optimizers:
            params = [
                p
                for group in optimizer.param_groups
                for p in group["params"]
                if p.requires_grad and id(p) not in owned
            ]
            owned.update(id(p) for p in params)
            if not params:
                continue
            hierarchy: dict[str, Any] = (
                {"hierarchical": True, "nodes": node_layout(self, self.nodes)} if self.hierarchical else {}
            )
            gossip = self.algorithm_class(
                params,
                topology=self.topology,
                compressor=self.compressor,
                consensus_step=self.consensus_step,
                watch_every=self.watch_every,
                **hierarchy,
            )
            gossips.append(gossip)
            self._gossip_optimizers.append(id(optimizer))
        return gossips

    def _mark_stepped(self, optimizer: Optimizer, *args: Any, **kwargs: Any) -> None:
        self._stepped[id(optimizer)] = True

    def _remove_step_hooks(self) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []

    # ------------------------------------------------------------------ training

    @override
    def optimizer_step(self, optimizer: Optimizer, closure, model=None, **kwargs: Any) -> Any:
        """The optimizer step, then gossip of that optimizer's parameters if it really stepped.

        Lightning calls this on real steps only (not on accumulation micro-steps).  A GradScaler
        skips ``optimizer.step()`` on inf/NaN gradients; the step post-hook tells.  With local
        gradients a worker may skip while its neighbours step, so with a GradScaler the workers
        agree first (an allreduce of one flag): the gossip runs only if every worker stepped.
        """
        self._stepped[id(optimizer)] = False
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        stepped = self._stepped[id(optimizer)]
        if self._may_skip_steps() and self.world_size > 1:
            flag = torch.tensor([1.0 if stepped else 0.0], device=self.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            stepped = bool(flag.item())
        if stepped:
            for gossip, optimizer_id in zip(self.gossips, self._gossip_optimizers):
                if optimizer_id == id(optimizer):
                    gossip.step()
        else:
            logger.debug("optimizer step skipped on some worker: no gossip this step")
        return output

    def _may_skip_steps(self) -> bool:
        plugin = self.precision_plugin
        return isinstance(plugin, MixedPrecision) and plugin.scaler is not None

    # ------------------------------------------------------------------ evaluation on x_bar

    def _swap_in(self) -> None:
        if self.gossips and self.world_size > 1:
            assert self.lightning_module is not None
            self._swap.swap_in_average(self.lightning_module)

    def _swap_out(self) -> None:
        assert self.lightning_module is not None
        self._swap.swap_back(self.lightning_module)

    @override
    def on_validation_start(self) -> None:
        self._swap_in()

    @override
    def on_validation_end(self) -> None:
        self._swap_out()

    @override
    def on_test_start(self) -> None:
        self._swap_in()

    @override
    def on_test_end(self) -> None:
        self._swap_out()

    @override
    def on_predict_start(self) -> None:
        self._swap_in()

    @override
    def on_predict_end(self) -> None:
        self._swap_out()

    @override
    def on_train_end(self) -> None:
        # The model a user keeps (and evaluates next) is the average one.
        self._swap_in()
        self._swap.keep_average()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        module = self.lightning_module
        assert module is not None
        if not self.gossips or self.world_size == 1 or self._swap.holding_average:
            return module.state_dict()
        return average_state_dict(module)

    # ------------------------------------------------------------------ checkpoints

    @override
    def has_worker_state(self) -> bool:
        return bool(self.gossips)

    @override
    def worker_state(self) -> dict | None:
        if not self.gossips:
            return None
        assert self.lightning_module is not None
        return {
            "model": self._swap.local_state_dict(self.lightning_module),
            "gossip": [gossip.state_dict() for gossip in self.gossips],
            # Local gradients: optimizer and GradScaler states differ from worker to worker.
            "optimizer_states": [self.optimizer_state(optimizer) for optimizer in self.optimizers],
            "precision_plugin": self.precision_plugin.state_dict(),
        }

    @override
    def load_worker_state(self, state: dict) -> None:
        if "gossip" not in state or "model" not in state:
            raise ValueError(
                f"the checkpoint's per-worker state has no gossip state (it holds {sorted(state)}): it was saved "
                "by another strategy; resume it with the strategy that saved it"
            )
        if len(state["gossip"]) != len(self.gossips):
            raise ValueError(
                f"the checkpoint has {len(state['gossip'])} gossip groups (one per optimizer), this run has "
                f"{len(self.gossips)}"
            )
        # Every gossip state is checked before anything is loaded, so that a checkpoint of another
        # model fails whole, naming the parameter, instead of leaving the run half restored.
        for i, (gossip, gossip_state) in enumerate(zip(self.gossips, state["gossip"])):
            try:
                gossip.check_state_dict(gossip_state)
            except ValueError as error:
                raise ValueError(
                    f"the checkpoint's state of gossip group {i} (one group per optimizer) does not fit this run: "
                    f"{error}"
                ) from error
        assert self.lightning_module is not None
        self.lightning_module.load_state_dict(state["model"], strict=True)
        for gossip, gossip_state in zip(self.gossips, state["gossip"]):
            gossip.load_state_dict(gossip_state)

    @override
    def teardown(self) -> None:
        self._remove_step_hooks()
        super().teardown()

    @classmethod
    def _register(cls, strategy_registry, name: str, description: str) -> None:
        for suffix, start_method in (("", "popen"), ("_spawn", "spawn")):
            strategy_registry.register(
                name + suffix,
                cls,
                description=f"{description}, start_method '{start_method}'",
                override=True,
                start_method=start_method,
            )


class DeepSqueezeStrategy(GossipStrategy):
    """DeepSqueeze: gossip of the compressed, error-compensated model (:class:`ec_hooks.DeepSqueeze`).

    Defaults: ring topology, ``TopK(density=0.01)``, the consensus step measured for the
    compressor.  See :class:`GossipStrategy` for the arguments.
    """

    algorithm_class = DeepSqueeze

    @classmethod
    @override
    def register_strategies(cls, strategy_registry) -> None:
        cls._register(
            strategy_registry, "deepsqueeze", "DeepSqueeze decentralized training (compressed gossip)"
        )


class ChocoStrategy(GossipStrategy):
    """CHOCO-SGD: gossip of compressed model differences (:class:`ec_hooks.ChocoSGD`)."""

    algorithm_class = ChocoSGD

    @classmethod
    @override
    def register_strategies(cls, strategy_registry) -> None:
        cls._register(strategy_registry, "choco", "CHOCO-SGD decentralized training (compressed differences)")


class DPSGDStrategy(GossipStrategy):
    """D-PSGD: uncompressed gossip of the model (:class:`ec_hooks.DPSGD`)."""

    algorithm_class = DPSGD

    @classmethod
    @override
    def register_strategies(cls, strategy_registry) -> None:
        cls._register(strategy_registry, "dpsgd", "D-PSGD decentralized training (uncompressed gossip)")
