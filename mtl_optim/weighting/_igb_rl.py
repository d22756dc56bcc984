"""IGB v2: improvable gap balancing with a soft actor-critic agent."""

from __future__ import annotations

import time
import weakref
from typing import Any, cast

import torch
from torch import Tensor

from .._linalg import LOG_EPS, safe_log
from .._method import Seeded
from .._validation import check_int, check_nonnegative, positive
from ._base import Weighting
from ._epoch_means import EpochMeans, pop_state
from ._sac import LOGPROBS, SAC, LogProb, schedule

_STATE_KEYS = (
    "base_losses",
    *EpochMeans.KEYS,
    "step",
    "last_losses",
    "last_weights",
    "reward_scale",
    "lr_initial",
    "rescale_pending",
    "sac_updates",
    "agent",
)


class IGBRL(Seeded, Weighting):
    r"""Improvable Gap Balancing, reinforcement-learning version (Dai, Fei & Lu, "Improvable Gap
    Balancing for Multi-Task Learning", UAI 2023, arXiv 2307.15429; official
    ``ImprovableGapBalancing_v2`` + ``SAC_Agent``; see
    docs/methods/weightings.md, "IGB v2 (IGBRL)").

    A soft actor-critic agent (:class:`~mtl_optim.weighting._sac.SAC`) picks the task weights.
    The state is the detached batch losses :math:`s_t = L_t \in R^K` (not normalised), the action
    the weights :math:`w_t = K \operatorname{softmax}(u)`, :math:`u \sim \mathcal N(\mu(s_t),
    \sigma(s_t))`, and the objectives are those of IGB v1,

    .. math::
        o_i = w_i \log \max(L_{t,i}, \varepsilon),

    with :math:`w` a constant for autograd. Once the base losses :math:`L_{\mathrm{base}}` exist
    (the mean losses of epoch ``base_epoch``, as in :class:`~mtl_optim.weighting.IGB`), every
    call from the second on stores the transition :math:`(L_{t-1}, w_{t-1}, r_t, L_t)` with the
    reward, the worst task's normalised improvement,

    .. math::
        r_t = \rho \cdot \min_i \frac{L_{t-1,i} - L_{t,i}}{L_{\mathrm{base},i}}, \qquad
        \rho = \frac{\mathrm{lr}_{\mathrm{initial}}}{\mathrm{lr}_{\mathrm{current}}},

    so the reward is amplified after learning-rate decay (:math:`\rho = 1` when the weighting is
    not attached to an optimizer). :math:`L_{t-1}` and :math:`L_t` come from different batches,
    so the reward is noisy. The official schedule, with :math:`S` = ``steps_per_epoch`` and the
    step :math:`t` counting calls from 0:

    * warm-up: while :math:`t < \mathrm{start\_epoch} \cdot S` the weights are RLW-style
      :math:`K \operatorname{softmax}(\xi)`, :math:`\xi \sim \mathcal N(0, I)`; afterwards a
      stochastic action of the actor;
    * training: when :math:`t \ge \mathrm{update\_after} \cdot S` and
      :math:`t \bmod \mathrm{update\_every} = 0`, :math:`\lfloor \mathrm{update\_every} \cdot
      \kappa/2 \rfloor` SAC updates on minibatches of :math:`\lfloor \mathrm{batch\_size} \cdot
      \kappa/2 \rfloor` (:math:`\kappa = 1 + |\mathcal B|/\mathrm{capacity}`): 25 of 128 with an
      empty buffer, 50 of 256 with a full one.

    Per call: store, then train, then act (the official order).

    Cost: the agent lives on the CPU in float32 whatever the losses' device and dtype, so every
    call copies the K loss values to the host (a device sync; the official code syncs every
    step too) and runs one tiny actor forward; every ``update_every`` calls a burst of 25–50
    small-MLP SAC updates runs inside the call: a latency spike. :attr:`last_update_seconds`
    (seconds per SAC update in the last burst) and :attr:`sac_updates` (the total) report it.

    Decisions and deviations from the official code:

    * the official log-probability subtracts a tanh-squash correction although the squash is
      :math:`K\operatorname{softmax}` (``logprob="tanh_correction"``, default, for parity);
      ``logprob="gaussian"`` leaves it out;
    * all draws (warm-up weights, actions, minibatches, network init) come from the private
      seeded CPU generator (:class:`~mtl_optim._method.Seeded`), never the global RNG, and the
      whole agent (networks, optimizer states, log α, replay buffer) is in :meth:`state_dict`
      (the official buffer save/load is broken), so a resumed run is bit-identical;
    * :math:`\rho` is read from ``param_groups[0]["lr"]`` at the first call after each
      ``opt.end_epoch()`` (and at the first call), i.e. at the start of each epoch as in the
      official trainer, whatever the order of ``scheduler.step()`` and ``opt.end_epoch()``;
      an lr of 0 leaves :math:`\rho` unchanged;
    * the official two-slot rings of losses and weights reduce to the previous call's
      :math:`(L_{t-1}, w_{t-1})`;
    * a training step with an empty buffer is skipped (the official code would fail to sample;
      it happens only when ``base_epoch`` >= ``update_after``);
    * the logarithm is floored at ``eps`` with ``ValueError`` on a negative loss, and the
      reward divides by :math:`\max(L_{\mathrm{base}}, \varepsilon)`, as for IGB v1;
      :math:`\log\alpha` is float32 (the official code keeps it in float64).

    The step counts calls, i.e. ``opt.backward`` calls: with gradient accumulation count
    ``steps_per_epoch`` in ``backward`` calls.

    Partial labels are not supported (``supports_missing`` is False, and ``opt.backward`` with
    a ``None`` loss raises ``ValueError``): the agent's state is the full vector of K losses and
    its action the K weights, and its reward compares all K losses of consecutive batches; a
    missing loss has no value to put there.

    Args:
        steps_per_epoch: calls per epoch (:math:`S`, the official ``train_batch``).
        base_epoch: the 0-indexed epoch whose mean losses become the base losses.
        start_epoch: epochs of random warm-up weights.
        update_after: epochs before the first SAC training.
        update_every: calls between SAC trainings (and the updates of a full-buffer burst).
        sac_lr: Adam's learning rate for the actor, the critics and :math:`\log\alpha`.
        buffer_size: the replay buffer's capacity.
        batch_size: the minibatch size with a full buffer.
        logprob: ``"tanh_correction"`` (official) or ``"gaussian"``.
        eps: the floor under the losses (and base losses).
        seed: the generator's seed, or ``None``.
    """

    separable = True

    def __init__(
        self,
        steps_per_epoch: int,
        *,
        base_epoch: int = 1,
        start_epoch: int = 5,
        update_after: int = 3,
        update_every: int = 50,
        sac_lr: float = 3e-4,
        buffer_size: int = 10_000,
        batch_size: int = 256,
        logprob: LogProb = "tanh_correction",
        eps: float = LOG_EPS,
        seed: int | None = None,
    ) -> None:
        self.steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch, 1)
        self.base_epoch = check_int("base_epoch", base_epoch, 0)
        self.start_epoch = check_int("start_epoch", start_epoch, 0)
        self.update_after = check_int("update_after", update_after, 0)
        # The schedule halves update_every and batch_size when the buffer is nearly empty.
        self.update_every = check_int("update_every", update_every, 2)
        self.sac_lr = positive("sac_lr", sac_lr)
        self.buffer_size = check_int("buffer_size", buffer_size, 1)
        self.batch_size = check_int("batch_size", batch_size, 2)
        if logprob not in LOGPROBS:
            raise ValueError(f"logprob must be one of {LOGPROBS}, got {logprob!r}")
        self.logprob = logprob
        self.eps = positive("eps", eps)
        super().__init__(seed)
        self.base_losses: Tensor | None = None
        self._epoch = EpochMeans()
        self.agent: SAC | None = None  # built at the first call, when K is known
        self.step = 0
        self._last: tuple[Tensor, Tensor] | None = None  # (L_{t-1}, w_{t-1}), CPU float32
        self.reward_scale = 1.0
        self._lr_initial: float | None = None
        self._optimizer: weakref.ref | None = None
        self._rescale_pending = True
        self.sac_updates = 0
        self.last_update_seconds: float | None = None

    @property
    def epochs(self) -> int:
        return self._epoch.epochs

    def attach(self, optimizer: Any) -> None:
        self._optimizer = weakref.ref(optimizer)
        self._lr_initial = float(optimizer.param_groups[0]["lr"])

    def reward(self, previous: Tensor, current: Tensor) -> float:
        r""":math:`r = \rho \min_i (L_{t-1,i} - L_{t,i}) / \max(L_{\mathrm{base},i}, \varepsilon)`
        for two ``(K,)`` loss vectors (needs the base losses)."""
        if self.base_losses is None:
            raise RuntimeError(
                f"{self!r}: the reward needs the base losses (epoch {self.base_epoch})"
            )
        base = self.base_losses.clamp(min=self.eps)
        gain = (previous.to(torch.float64) - current.to(torch.float64)) / base
        return self.reward_scale * gain.min().item()

    def forward(self, losses: Tensor) -> Tensor:
        check_nonnegative(losses, type(self).__name__)
        state = losses.detach().to("cpu", torch.float32)  # the per-call host sync
        agent = self._agent(state.numel())
        self._epoch.add(losses, self)
        if self._rescale_pending:
            self._read_lr()
        if self._last is not None and self.base_losses is not None:
            previous, action = self._last
            agent.buffer.add(previous, action, self.reward(previous, state), state)
        s = self.steps_per_epoch
        if self.step >= self.update_after * s and self.step % self.update_every == 0:
            self._train(agent)
        if self.step < self.start_epoch * s:
            xi = torch.randn(state.numel(), generator=self.generator)
            w = state.numel() * torch.softmax(xi, dim=0)
        else:
            w = agent.act(state)
        self._last = (state, w)
        self.step += 1
        self.weights = w.to(dtype=losses.dtype, device=losses.device)
        return self.weights * safe_log(losses, self.eps)

    def snapshot(self) -> Any:
        """Cheap unless the next call trains the agent: a forward changes only the counters,
        the epoch sums, the RNG and one row of the replay buffer (the full state, with the
        networks and buffer, is copied only before a SAC training round)."""
        s = self.steps_per_epoch
        trains = self.step >= self.update_after * s and self.step % self.update_every == 0
        if self.agent is None or trains:
            return ("full", super().snapshot())
        buf = self.agent.buffer
        row = {key: getattr(buf, key)[buf.ptr].clone() for key in buf.KEYS}
        light = {
            "generator": self.generator.get_state(),
            "epoch": self._epoch.state_dict(),
            "step": self.step,
            "last": self._last,
            "reward_scale": self.reward_scale,
            "rescale_pending": self._rescale_pending,
            "weights": self.weights,
            "buffer": (buf.ptr, buf.size, row),
        }
        return ("light", light)

    def restore(self, snapshot: Any) -> None:
        kind, state = snapshot
        if kind == "full":
            super().restore(state)
            return
        self.generator.set_state(state["generator"])
        self._epoch.load_state_dict(state["epoch"])
        self.step, self._last = state["step"], state["last"]
        self.reward_scale, self._rescale_pending = state["reward_scale"], state["rescale_pending"]
        self.weights = state["weights"]
        buf = cast(SAC, self.agent).buffer  # a "light" snapshot exists only with an agent
        buf.ptr, buf.size, row = state["buffer"]
        for key, value in row.items():
            getattr(buf, key)[buf.ptr] = value

    def _agent(self, k: int) -> SAC:
        if self.agent is None:
            self.agent = SAC(
                k,
                self.generator,
                capacity=self.buffer_size,
                lr=self.sac_lr,
                logprob=self.logprob,
            )
        elif self.agent.dim != k:
            raise ValueError(f"{self!r} was run with {self.agent.dim} tasks, got {k}")
        return self.agent

    def _read_lr(self) -> None:
        optimizer = None if self._optimizer is None else self._optimizer()
        if optimizer is not None and self._lr_initial is not None:
            lr = float(optimizer.param_groups[0]["lr"])
            if lr > 0:
                self.reward_scale = self._lr_initial / lr
        self._rescale_pending = False

    def _train(self, agent: SAC) -> None:
        if agent.buffer.size == 0:
            return
        n, batch = schedule(
            agent.buffer.size, agent.buffer.capacity, self.update_every, self.batch_size
        )
        start = time.perf_counter()
        for _ in range(n):
            agent.update(batch)
        self.last_update_seconds = (time.perf_counter() - start) / n
        self.sac_updates += n

    def end_epoch(self) -> None:
        epoch = self._epoch.epochs
        mean = self._epoch.close()
        if mean is not None and self.base_losses is None and epoch == self.base_epoch:
            self.base_losses = mean
        self._rescale_pending = True

    def state_dict(self) -> dict[str, Any]:
        last = (None, None) if self._last is None else tuple(t.clone() for t in self._last)
        return {
            **super().state_dict(),
            "base_losses": None if self.base_losses is None else self.base_losses.clone(),
            **self._epoch.state_dict(),
            "step": self.step,
            "last_losses": last[0],
            "last_weights": last[1],
            "reward_scale": self.reward_scale,
            "lr_initial": self._lr_initial,
            "rescale_pending": self._rescale_pending,
            "sac_updates": self.sac_updates,
            "agent": None if self.agent is None else self.agent.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        mine = pop_state(state, _STATE_KEYS, self)
        if mine["agent"] is None:
            self.agent = None
        else:  # built before the generator is restored: building it draws the init seed
            self.agent = None
            self._agent(int(mine["agent"]["dim"])).load_state_dict(mine["agent"])
        super().load_state_dict(state)
        base = mine["base_losses"]
        self.base_losses = None if base is None else torch.as_tensor(base, dtype=torch.float64)
        self._epoch.load_state_dict(mine)
        self.step = int(mine["step"])
        last = mine["last_losses"], mine["last_weights"]
        self._last = None if last[0] is None else (last[0].clone(), last[1].clone())
        self.reward_scale = float(mine["reward_scale"])
        lr = mine["lr_initial"]
        self._lr_initial = None if lr is None else float(lr)
        self._rescale_pending = bool(mine["rescale_pending"])
        self.sac_updates = int(mine["sac_updates"])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps_per_epoch={self.steps_per_epoch!r}, "
            f"base_epoch={self.base_epoch!r}, start_epoch={self.start_epoch!r}, "
            f"update_after={self.update_after!r}, update_every={self.update_every!r}, "
            f"sac_lr={self.sac_lr!r}, buffer_size={self.buffer_size!r}, "
            f"batch_size={self.batch_size!r}, logprob={self.logprob!r}, eps={self.eps!r}, "
            f"seed={self.seed!r})"
        )
