"""mtl_optim inside PyTorch Lightning, with manual optimization.

Lightning's automatic optimization calls ``loss.backward()`` on one scalar, which is exactly
what a multi-task gradient method must replace. With ``automatic_optimization = False`` the
``training_step`` calls ``opt.backward(losses)`` and ``opt.step()`` itself::

    python examples/lightning_manual_optimization.py      # 3 epochs on random data, CPU

``self.optimizers()`` returns Lightning's wrapper around our optimizer; ``.optimizer`` is the
``MTLOptimizer`` itself, whose ``backward`` takes the K losses. The optimizer averages
gradients across processes itself (``tests/test_distributed.py`` checks this with a plain
``DistributedDataParallel`` model under ``no_sync()``); with Lightning's ``strategy="ddp"`` the
forward and ``opt.backward`` would go inside ``self.trainer.strategy.model.no_sync()`` — that
combination is not exercised by our tests, which run this example on one CPU process.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mtl_optim
from mtl_optim import aggregators


class TwoTaskModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(32, 1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [head(z).squeeze(-1) for head in self.heads]

    def training_step(self, batch, batch_idx):
        x, y1, y2 = batch
        losses = [nn.functional.mse_loss(out, y) for out, y in zip(self(x), (y1, y2))]
        opt = self.optimizers().optimizer  # the MTLOptimizer
        opt.zero_grad()
        opt.backward(losses)
        opt.step()
        self.log_dict({"loss_0": losses[0], "loss_1": losses[1]}, prog_bar=True)
        for i, w in enumerate(opt.last_weights.tolist()):
            self.log(f"weight_{i}", w)

    def on_train_epoch_end(self) -> None:
        self.optimizers().optimizer.end_epoch()

    def configure_optimizers(self):
        return mtl_optim.MTLOptimizer(
            self.parameters(), base=torch.optim.Adam, aggregator=aggregators.NashMTL(), lr=1e-3
        )


def main(max_epochs: int = 3) -> TwoTaskModule:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y1 = x @ torch.randn(8, generator=g)
    y2 = 10 * torch.tanh(x @ torch.randn(8, generator=g))  # a larger-scale second task
    loader = DataLoader(TensorDataset(x, y1, y2), batch_size=64, shuffle=True, generator=g)
    module = TwoTaskModule()
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return module


if __name__ == "__main__":
    main()
