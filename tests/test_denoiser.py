"""The denoiser seam (diffusion/process/denoiser.py): a sampler written against D(x, sigma, **extra_args) alone
samples a project checkpoint with classifier-free guidance and classifier guidance, without touching
GaussianDiffusion; the ADM denoiser's continuous face and its discrete face agree at the trained levels."""

import pytest
import torch
from hydra.utils import instantiate
from pinned_samples import CHECKPOINT, tiny_classifier

from diffusion.process.denoiser import Denoiser
from diffusion.process.gaussian import GaussianDiffusion
from diffusion.sample import load_model
from diffusion.sampling.guidance import classifier_cond_fn, guided_denoiser
from diffusion.sampling.noise import PerImageNoise
from diffusion.sampling.solvers import DDIM

from conftest import compose_cfg


def euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, **extra_args) -> torch.Tensor:
    """Plain Euler in sigma, written against the seam alone: dx/dsigma = (x - D(x, sigma)) / sigma."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoiser(x, sigma.expand(len(x)), **extra_args)) / sigma
        x = x + d * (sigma_next - sigma)
    return x


@pytest.fixture(scope="module")
def checkpoint():
    cfg = compose_cfg(["hardware=cpu", f"checkpoint={CHECKPOINT}"], config_name="sample")
    model, process, _ = load_model(cfg)
    return model, process


def ddim_sigmas(process: GaussianDiffusion, steps: int) -> torch.Tensor:
    """The noise levels of DDIM's kept timesteps, noisiest first, then 0."""
    kept = DDIM(steps).timesteps(process)
    ac = torch.as_tensor(process.alphas_cumprod[kept], dtype=torch.float32)
    return torch.cat([((1 - ac) / ac).sqrt().flip(0), torch.zeros(1)])


@pytest.mark.parametrize("guidance", ["cfg", "cfg+classifier"])
def test_a_sampler_written_against_the_seam_samples_a_project_checkpoint(checkpoint, guidance):
    """Euler on DDIM's levels is DDIM (eta 0) in the variance-exploding variables: the same images to float
    rounding, with the guidance the seam's wrappers add."""
    model, process = checkpoint
    classes = torch.tensor([0, 3, 5, 9])
    cond_fn = classifier_cond_fn(tiny_classifier(), classes, scale=4.0) if "classifier" in guidance else None
    noise = PerImageNoise(7, range(4), (1, 8, 8), torch.device("cpu"))
    x_T = noise.draw()
    common = dict(guidance_scale=2.0, cond_fn=cond_fn, clip_denoised=False)
    with torch.no_grad():
        ddim = DDIM(5, clip_denoised=False)
        reference = ddim(guided_denoiser(model, process, **common), x_T, extra_args={"y": classes})
        sigmas = ddim_sigmas(process, 5)
        ours = euler(
            guided_denoiser(model, process, **common), x_T * (1 + sigmas[0] ** 2).sqrt(), sigmas, y=classes
        )
        unguided = euler(
            guided_denoiser(model, process, clip_denoised=False),
            x_T * (1 + sigmas[0] ** 2).sqrt(),
            sigmas,
            y=classes,
        )
    # float32 rounding: x is scaled by sqrt(1 + sigma_max^2) ~ 160 on the way in
    torch.testing.assert_close(ours, reference, rtol=0, atol=3e-4)
    assert (ours - unguided).abs().max() > 1e-2  # the guidance is really there


@pytest.mark.parametrize("mean_type", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("classifier", [False, True])
def test_continuous_and_discrete_faces_agree_at_trained_levels(mean_type, classifier):
    process = GaussianDiffusion(100, "cosine", mean_type, "learned_range")
    torch.manual_seed(0)
    cfg = compose_cfg(["model=unet_digits", "model.image_size=8", "model.num_channels=32", "model.channel_mult=[1]",
                       "model.attention_resolutions=[]", "model.num_res_blocks=1"])  # fmt: skip
    net = instantiate(cfg.model, in_channels=1, num_classes=10, learn_sigma=True).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cond_fn = (
        classifier_cond_fn(tiny_classifier(), torch.tensor([1, 2, 3]), scale=2.0) if classifier else None
    )
    denoiser = guided_denoiser(net, process, cond_fn=cond_fn)
    t = torch.tensor([5, 40, 90])
    x_t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ac = torch.as_tensor(process.alphas_cumprod[t.numpy()], dtype=torch.float32)
    sigma = ((1 - ac) / ac).sqrt()
    y = torch.tensor([1, 2, 3])
    with torch.no_grad():
        discrete = denoiser.predict(x_t, t, y=y).denoised
    continuous = denoiser(x_t / ac.sqrt().view(-1, 1, 1, 1), sigma, y=y)
    torch.testing.assert_close(continuous, discrete, rtol=1e-5, atol=1e-5)


def test_the_seam_reports_the_trained_noise_range():
    process = GaussianDiffusion(1000, "linear", "epsilon", "fixed_small")
    denoiser = process.denoiser(lambda x, t, **_: torch.zeros_like(x))
    ac = process.alphas_cumprod
    assert denoiser.sigma_min == pytest.approx(((1 - ac[0]) / ac[0]) ** 0.5)
    assert denoiser.sigma_max == pytest.approx(((1 - ac[-1]) / ac[-1]) ** 0.5)
    # a zero eps-network denoises x to x itself at any level, on the continuous face too
    x = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(denoiser(x, torch.tensor([0.5, 3.0])), x)
