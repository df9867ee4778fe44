"""Sample-level DP-SGD inside the one local training loop, through Opacus' PrivacyEngine.

Opacus does what it is trusted for: per-example gradients (GradSampleModule), flat clipping to C
and Gaussian noise σC on the sum (DPOptimizer), and Poisson sampling of each batch with rate
1/(batches per epoch) (DPDataLoader). medfed's loop only feeds it: the loader samples *indices*
into the site's tensors, which may already live on the GPU, and the step is the same code as
non-private training. After the round the hooks are removed and the plain module's weights are
what leaves the site.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medfed.client.augment import Augment
from medfed.client.train import SampleDP, TrainOptions
from medfed.privacy.transforms import noise_generator

# Opacus' hooks fire on the first layer, whose input needs no gradient: expected, not a problem.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


class PrivateTraining:
    """One site's DP-SGD round: the wrapped module and optimizer, and the Poisson batches."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        n: int,
        opts: TrainOptions,
        dp: SampleDP,
        *,
        generator: torch.Generator,
    ) -> None:
        from opacus import PrivacyEngine

        per_epoch = math.ceil(n / opts.batch_size)
        total = max(1, math.ceil(opts.epochs * per_epoch))
        self.total_steps = min(total, opts.max_steps) if opts.max_steps is not None else total
        self.steps = 0
        self.opts = opts
        sampler_gen = noise_generator(generator, secure=False)  # which examples: reproducible
        noise_gen = noise_generator(generator, secure=dp.secure_rng)
        self._flip_gen = generator
        index = DataLoader(
            TensorDataset(torch.arange(n)), batch_size=opts.batch_size, generator=sampler_gen
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Secure RNG turned off": see secure_rng
            self.engine = PrivacyEngine(accountant="rdp")
            # Opacus warns that it cannot check the optimizer's/model's secure mode; we know.
            warnings.simplefilter("ignore", UserWarning)
            module, dp_opt, loader = self.engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=index,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                poisson_sampling=True,
                noise_generator=noise_gen,
            )
        self.module: nn.Module = module
        self.optimizer: torch.optim.Optimizer = dp_opt
        self.loader = loader

    def batches(self, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Poisson batches of indices until the round's steps are done (epochs are redrawn)."""
        while self.steps < self.total_steps:
            for (idx,) in self.loader:
                if self.steps >= self.total_steps:
                    return
                self.steps += 1
                if len(idx) == 0:
                    continue  # probability (1-q)^n: skipped, still counted by the accountant
                flips = (
                    (torch.rand(len(idx), generator=self._flip_gen) < 0.5).to(device)
                    if self.opts.augment is not Augment.NONE
                    else None
                )
                yield idx.to(device), flips

    def close(self) -> None:
        """Remove Opacus' hooks and per-example buffers from the (reused) worker model."""
        remove = getattr(self.module, "_close", None)
        if remove is not None:
            remove()
