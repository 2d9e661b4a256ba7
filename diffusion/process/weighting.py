"""Min-SNR-gamma loss weights (Hang et al. 2023) for the ADM discrete process.

With snr_t = alphas_cumprod[t] / (1 - alphas_cumprod[t]), the weight that turns the per-example MSE of each target
into the same min(snr, gamma)-weighted loss on x0 is, as the authors' code computes it:

    target "eps": min(snr, gamma) / snr       (their mse_loss_weight_type "min_snr_<gamma>")
    target "x0":  min(snr, gamma)             ("min_snr_<gamma>" with predict_xstart)
    target "v":   min(snr, gamma) / (snr + 1) ("vmin_snr_<gamma>", the option their v-prediction config uses)

and where snr == 0 (a zero-terminal-SNR schedule) the weight is 1, as theirs, instead of nan or 0.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from diffusion.process._common import check_choice, check_float

TARGETS = ("eps", "x0", "v")


def min_snr_weights(
    alphas_cumprod: np.ndarray | Tensor, t: Tensor, target: str = "eps", gamma: float = 5.0
) -> Tensor:
    """Per-example Min-SNR-gamma weights.

    Args:
        alphas_cumprod: [T] cumulative products of (1 - beta), e.g. GaussianDiffusion.alphas_cumprod (float64).
        t: [N] integer timestep indices into alphas_cumprod.
        target: what the network predicts: "eps", "x0" or "v".
        gamma: the clamp (5 in the paper).
    Returns:
        [N] float32 weights on t's device, to multiply the per-example MSE with.
    """
    target = check_choice("min_snr_target", target, TARGETS)
    gamma = check_float("min_snr_gamma", gamma, positive=True)
    ac = torch.as_tensor(
        np.asarray(alphas_cumprod, dtype=np.float64)
        if not torch.is_tensor(alphas_cumprod)
        else alphas_cumprod.double().cpu()
    )
    # The reference casts sqrt(alphas_cumprod) and sqrt(1 - alphas_cumprod) to float32 before forming the SNR;
    # doing the same keeps the weights bitwise equal to the authors'.
    alpha = ac.sqrt()[t.cpu().long()].float()
    sigma = (1.0 - ac).sqrt()[t.cpu().long()].float()
    snr = (alpha / sigma) ** 2
    clamped = torch.minimum(snr, torch.full_like(snr, gamma))
    if target == "eps":
        w = clamped / snr
    elif target == "x0":
        w = clamped
    else:
        w = clamped / (snr + 1)
    w = torch.where(snr == 0, torch.ones_like(w), w)
    return w.to(t.device)
