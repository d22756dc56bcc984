"""A small soft actor-critic (twin Q, automatic entropy tuning) for IGB v2's task weights."""

from __future__ import annotations

import copy
import math
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LogProb = Literal["tanh_correction", "gaussian"]
LOGPROBS = get_args(LogProb)
_LOG_STD_MIN, _LOG_STD_MAX = -20.0, 2.0


def schedule(size: int, capacity: int, update_every: int, batch_size: int) -> tuple[int, int]:
    r"""IGB v2's training burst: ``(number of SAC updates, minibatch size)``.

    With :math:`\kappa = 1 + |\mathcal B| / \mathrm{capacity}` both scale from half to all:
    :math:`\lfloor \mathrm{update\_every} \cdot \kappa / 2 \rfloor` updates of
    :math:`\lfloor \mathrm{batch\_size} \cdot \kappa / 2 \rfloor` transitions, i.e. 25 of 128 with
    an empty buffer and 50 of 256 with a full one (defaults 50 and 256).
    """
    kappa = 1 + size / capacity
    return int(update_every * (kappa / 2)), int(batch_size * (kappa / 2))


def _linear(n_in: int, n_out: int, generator: torch.Generator) -> nn.Linear:
    r"""``nn.Linear`` with torch's default init, :math:`U(\pm 1/\sqrt{n_{in}})`, drawn from
    ``generator`` instead of the global RNG."""
    layer = nn.utils.skip_init(nn.Linear, n_in, n_out)
    bound = 1 / math.sqrt(n_in)
    with torch.no_grad():
        nn.init.uniform_(layer.weight, -bound, bound, generator=generator)
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


def _mlp(sizes: list[int], generator: torch.Generator, relu_last: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(_linear(n_in, n_out, generator))
        if relu_last or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Actor(nn.Module):
    r"""Gaussian policy squashed by :math:`a = K \operatorname{softmax}(u)`.

    A trunk :math:`K \to h_1 \to h_2` with ReLU after every hidden layer, then heads
    :math:`\mu` and :math:`\log\sigma` (clamped to :math:`[-20, 2]`);
    :math:`u = \mu + \sigma \odot \xi`, :math:`\xi \sim \mathcal N(0, I)` (reparameterised).
    """

    def __init__(self, dim: int, hidden: tuple[int, ...], generator: torch.Generator) -> None:
        super().__init__()
        self.trunk = _mlp([dim, *hidden], generator, relu_last=True)
        self.mu = _linear(hidden[-1], dim, generator)
        self.log_std = _linear(hidden[-1], dim, generator)

    def forward(self, state: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(state)
        return self.mu(h), self.log_std(h).clamp(_LOG_STD_MIN, _LOG_STD_MAX)


class TwinCritic(nn.Module):
    r"""Two independent Q networks :math:`(s, a) \in R^{2K} \to h_1 \to h_2 \to 1`."""

    def __init__(self, dim: int, hidden: tuple[int, ...], generator: torch.Generator) -> None:
        super().__init__()
        sizes = [2 * dim, *hidden, 1]
        self.q1 = _mlp(sizes, generator, relu_last=False)
        self.q2 = _mlp(sizes, generator, relu_last=False)

    def forward(self, state: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        sa = torch.cat([state, action], dim=-1)
        return self.q1(sa), self.q2(sa)


class ReplayBuffer:
    """Transitions ``(s, a, r, s')`` in preallocated CPU float32 tensors (a ring)."""

    KEYS = ("state", "action", "reward", "next_state")

    def __init__(self, dim: int, capacity: int) -> None:
        self.capacity = capacity
        self.ptr = 0
        self.size = 0
        self.state = torch.zeros(capacity, dim)
        self.action = torch.zeros(capacity, dim)
        self.reward = torch.zeros(capacity, 1)
        self.next_state = torch.zeros(capacity, dim)

    def add(self, state: Tensor, action: Tensor, reward: float, next_state: Tensor) -> None:
        i = self.ptr
        self.state[i], self.action[i], self.next_state[i] = state, action, next_state
        self.reward[i] = reward
        self.ptr = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        """``n`` transitions drawn uniformly with replacement."""
        idx = torch.randint(0, self.size, (n,), generator=generator)
        return tuple(getattr(self, key)[idx] for key in self.KEYS)

    def state_dict(self) -> dict[str, Any]:
        # Only the filled rows: [0, size) is filled (the ring wraps only once it is full).
        rows = {key: getattr(self, key)[: self.size].clone() for key in self.KEYS}
        return {"ptr": self.ptr, "size": self.size, **rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        size = int(state["size"])
        if size > self.capacity:
            raise ValueError(f"the saved buffer holds {size} > capacity {self.capacity} rows")
        for key in self.KEYS:
            getattr(self, key).zero_()[:size] = torch.as_tensor(state[key])
        self.ptr, self.size = int(state["ptr"]), size


class SAC:
    r"""Soft actor-critic (Haarnoja et al., "Soft Actor-Critic Algorithms and Applications",
    arXiv 1812.05905), as in IGB v2's official ``SAC_Agent``, on the CPU in float32.

    With :math:`\alpha = e^{\log\alpha}`, target entropy :math:`\bar{\mathcal H} = -K`, twin
    critics :math:`Q_{1,2}`, their Polyak targets :math:`\bar Q_{1,2}` and a minibatch
    :math:`(s, a, r, s')` from the buffer, one :meth:`update` takes an Adam step on each of

    .. math::
        y &= r + \gamma \big(\min_j \bar Q_j(s', a') - \alpha \log\pi(a'|s')\big),
            \quad a' \sim \pi(\cdot|s') \\
        \mathcal L_Q &= \operatorname{mean}(Q_1(s,a) - y)^2 + \operatorname{mean}(Q_2(s,a) - y)^2 \\
        \mathcal L_\pi &= \operatorname{mean}\big(\alpha \log\pi(\tilde a|s)
            - \min_j Q_j(s, \tilde a)\big), \quad \tilde a \sim \pi(\cdot|s) \\
        \mathcal L_\alpha &= -\operatorname{mean}\big(\log\alpha \cdot
            (\log\pi(\tilde a|s) + \bar{\mathcal H})\big)

    (in this order; :math:`\alpha` is the value before this update's :math:`\mathcal L_\alpha`
    step), then :math:`\bar\theta \leftarrow \tau\theta + (1-\tau)\bar\theta`. There is no
    terminal flag. The action squash is IGB's :math:`a = K \operatorname{softmax}(u)`; see
    :meth:`log_prob` for the density.

    Every random draw (network init, actions, minibatches) comes from ``generator``: the
    networks are initialised from a generator seeded with one draw of it, so the global RNG is
    never touched.

    Args:
        dim: :math:`K`, the state and the action dimension.
        generator: the CPU generator of all draws (shared with the owner, which checkpoints it).
        capacity: the replay buffer's size.
        lr: Adam's learning rate for the actor, the critics and :math:`\log\alpha`.
        hidden: the hidden layer widths of every network.
        gamma: the discount :math:`\gamma`.
        tau: the Polyak rate :math:`\tau`.
        alpha: the initial entropy temperature.
        logprob: ``"tanh_correction"`` (official) or ``"gaussian"``, see :meth:`log_prob`.
    """

    def __init__(
        self,
        dim: int,
        generator: torch.Generator,
        *,
        capacity: int = 10_000,
        lr: float = 3e-4,
        hidden: tuple[int, ...] = (128, 128),
        gamma: float = 0.99,
        tau: float = 0.005,
        alpha: float = 0.2,
        logprob: LogProb = "tanh_correction",
    ) -> None:
        if logprob not in LOGPROBS:
            raise ValueError(f"logprob must be one of {LOGPROBS}, got {logprob!r}")
        self.dim, self.generator, self.logprob = dim, generator, logprob
        self.gamma, self.tau, self.target_entropy = gamma, tau, -float(dim)
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        init = torch.Generator().manual_seed(seed)
        self.actor = Actor(dim, hidden, init)
        self.critic = TwinCritic(dim, hidden, init)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(alpha), requires_grad=True)
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=lr)
        self.alpha_optim = torch.optim.Adam([self.log_alpha], lr=lr)
        self.buffer = ReplayBuffer(dim, capacity)

    def log_prob(self, u: Tensor, mu: Tensor, log_std: Tensor) -> Tensor:
        r"""``(n, 1)`` :math:`\log\pi`, the Gaussian log-density of the pre-squash :math:`u`
        summed over tasks, minus (``"tanh_correction"``) the tanh-squash correction

        .. math::
            \sum_i \log(1 - \tanh^2 u_i)
            = \sum_i 2\,\big(\log 2 - u_i - \operatorname{softplus}(-2u_i)\big).

        The official code subtracts this correction although its squash is
        :math:`K\operatorname{softmax}`, which is not a bijection (no exact density exists); kept
        for parity (see docs/methods/weightings.md, "IGB v2 (IGBRL)"). ``"gaussian"`` leaves it out.
        """
        z = (u - mu) * torch.exp(-log_std)
        logp = (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1, keepdim=True)
        if self.logprob == "tanh_correction":
            logp = logp - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1, keepdim=True)
        return logp

    def policy(self, state: Tensor) -> tuple[Tensor, Tensor]:
        r"""A reparameterised action :math:`a = K\operatorname{softmax}(u)` and its log-prob."""
        mu, log_std = self.actor(state)
        noise = torch.randn(mu.shape, generator=self.generator)
        u = mu + torch.exp(log_std) * noise
        return self.dim * torch.softmax(u, dim=-1), self.log_prob(u, mu, log_std)

    @torch.no_grad()
    def act(self, state: Tensor) -> Tensor:
        """A stochastic action (the task weights, ``(K,)``) for one state ``(K,)``."""
        return self.policy(state.unsqueeze(0))[0].squeeze(0)

    @torch.enable_grad()
    def update(self, batch_size: int) -> None:
        """One SAC step on a minibatch of ``batch_size`` transitions (see the class docstring)."""
        s, a, r, s_next = self.buffer.sample(batch_size, self.generator)
        alpha = self.log_alpha.detach().exp()
        with torch.no_grad():
            a_next, logp_next = self.policy(s_next)
            q_next = torch.min(*self.critic_target(s_next, a_next))
            y = r + self.gamma * (q_next - alpha * logp_next)
        q1, q2 = self.critic(s, a)
        self._step(self.critic_optim, F.mse_loss(q1, y) + F.mse_loss(q2, y))

        a_new, logp = self.policy(s)
        q_new = torch.min(*self.critic(s, a_new))
        self._step(self.actor_optim, (alpha * logp - q_new).mean())
        alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        self._step(self.alpha_optim, alpha_loss)

        with torch.no_grad():
            for target, p in zip(self.critic_target.parameters(), self.critic.parameters()):
                target.lerp_(p, self.tau)

    @staticmethod
    def _step(optim: torch.optim.Optimizer, loss: Tensor) -> None:
        # backward(inputs=...) fills only this optimizer's parameters' .grad (the official code
        # freezes the critics around the actor loss instead).
        optim.zero_grad()
        params = [p for group in optim.param_groups for p in group["params"]]
        loss.backward(inputs=params)
        optim.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "actor": copy.deepcopy(self.actor.state_dict()),
            "critic": copy.deepcopy(self.critic.state_dict()),
            "critic_target": copy.deepcopy(self.critic_target.state_dict()),
            "log_alpha": self.log_alpha.detach().clone(),
            "actor_optim": copy.deepcopy(self.actor_optim.state_dict()),
            "critic_optim": copy.deepcopy(self.critic_optim.state_dict()),
            "alpha_optim": copy.deepcopy(self.alpha_optim.state_dict()),
            "buffer": self.buffer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["dim"]) != self.dim:
            raise ValueError(f"the saved agent has {state['dim']} tasks, this one {self.dim}")
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_optim.load_state_dict(state["actor_optim"])
        self.critic_optim.load_state_dict(state["critic_optim"])
        self.alpha_optim.load_state_dict(state["alpha_optim"])
        self.buffer.load_state_dict(state["buffer"])
