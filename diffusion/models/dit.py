"""DiT ("Scalable Diffusion Models with Transformers", Peebles & Xie), state-dict compatible with
facebookresearch/DiT.

The constructor takes DiT's argument names and defaults, and the parameter names and shapes equal DiT's key for
key, so the released ``DiT-XL-2-256x256.pt`` and ``DiT-XL-2-512x512.pt`` load with ``strict=True``. Everything
timm supplied to DiT (patch embedding, attention, MLP) is written here; attention runs through
``F.scaled_dot_product_attention``.

The model works in pixel space (``in_channels`` 1 or 3, ``input_size`` = image side) or on the latents of a VAE
(``in_channels`` 4, ``input_size`` = image side / 8); it does not know which. ``image_size`` is ``input_size``
under the name the platform's engine and solvers read.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffusion.errors import ConfigError
from diffusion.models.protocol import Network
from diffusion.models.unet import batch_timesteps, timestep_embedding

# Width of the fixed sinusoidal timestep features fed to the timestep MLP (not a constructor argument in DiT).
FREQUENCY_EMBEDDING_SIZE = 256
LAYER_NORM_EPS = 1e-6
# DiT's forward_with_cfg guides only the first three eps channels "for exact reproducibility reasons".
DIT_GUIDED_CHANNELS = 3

# The 12 configurations of DiT's DiT_models: (depth, hidden_size, patch_size, num_heads) by preset name.
DIT_CONFIGS: dict[str, dict[str, int]] = {
    f"dit_{size}_{patch}": dict(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads)
    for size, (depth, hidden, heads) in {
        "xl": (28, 1152, 16),
        "l": (24, 1024, 16),
        "b": (12, 768, 12),
        "s": (12, 384, 6),
    }.items()
    for patch in (2, 4, 8)
}


def sincos_pos_embed_2d(dim: int, grid_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """
    DiT's fixed 2-D sin-cos position table (MAE's), computed in float64 and returned as float32.

    Token k sits at row k // grid_size, column k % grid_size (the patch embedding's row-major order). With
    q = dim / 4 and omega_i = 10000 ** (-i / q): dims [0, q) are sin(col * omega), [q, 2q) cos(col * omega),
    [2q, 3q) sin(row * omega), [3q, 4q) cos(row * omega) -- the first half encodes the column.

    :param dim: the embedding width; must be divisible by 4.
    :param grid_size: tokens per side.
    :return: a [grid_size ** 2 x dim] float32 Tensor.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position table needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    k = torch.arange(grid_size * grid_size, dtype=torch.int64, device=device)
    col = (k % grid_size).to(torch.float64)[:, None] * omega[None, :]  # (T, q)
    row = (k // grid_size).to(torch.float64)[:, None] * omega[None, :]  # (T, q)
    return torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with one (shift, scale) per image.

    :param x: an [N x T x D] Tensor; shift and scale are [N x D].
    """
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class PatchEmbed(nn.Module):
    """Cut an image into p x p patches and project each to D dims (a Conv2d with kernel = stride = p)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: an [N x C x H x W] Tensor; returns [N x T x D], token k = row * (W / p) + col."""
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Timesteps to D-dim vectors: fixed [cos | sin] features, then Linear, SiLU, Linear (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """:param t: an [N] Tensor of timesteps, integer or fractional; returns [N x D]."""
        # The UNet's embedding is DiT's too: [cos | sin], frequencies exp(-ln(10000) * i / half), t cast to float.
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """
    Class labels to D-dim vectors, with DiT's label dropout for classifier-free guidance.

    With ``dropout_prob > 0`` the table has one extra last row, index ``num_classes``: the null label. In train
    mode each label is replaced by it with probability ``dropout_prob``; in eval mode labels are used as given.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """:param y: an [N] long Tensor of labels in [0, num_classes]; returns [N x D]."""
        if self.training and self.dropout_prob > 0:
            # Trains the unconditional branch on the same network.
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's layout: keys ``qkv`` and ``proj``)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: an [N x T x D] Tensor; returns [N x T x D]."""
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, T, D / heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """fc1, tanh-approximated GELU, fc2 (timm's Mlp as DiT configures it)."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: an [N x T x D] Tensor; returns [N x T x D]."""
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """A transformer block conditioned by adaLN-Zero: c gives a shift, scale and gate for each of its two branches."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """:param x: an [N x T x D] Tensor of tokens; c an [N x D] conditioning; returns [N x T x D]."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        x = x + gate_msa[:, None, :] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None, :] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift first, then scale) and a linear map of each token to its p x p x C_out patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """:param x: an [N x T x D] Tensor; c an [N x D] conditioning; returns [N x T x p*p*C_out]."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module, Network):
    """
    The diffusion transformer: patchify, transformer blocks conditioned on (timestep + label) by adaLN-Zero,
    unpatchify.

    :param input_size: the input's height and width (a latent's side: image side / 8 for Stable Diffusion's VAE).
    :param patch_size: side of the square patches that become tokens; must divide input_size.
    :param in_channels: input channels (4 for SD latents, 1 or 3 for pixels).
    :param hidden_size: token width D; divisible by num_heads and by 4 (the 2-D position table).
    :param depth: number of transformer blocks.
    :param num_heads: attention heads.
    :param mlp_ratio: MLP width as a multiple of hidden_size (int(hidden_size * mlp_ratio)).
    :param class_dropout_prob: probability, in train mode, of replacing a label by the null label
        ``num_classes`` (classifier-free guidance); > 0 adds that label's row to the table.
    :param num_classes: number of classes; 0 or None builds an unconditional DiT (no label table, y must be None),
        an extension of DiT that does not change the class-conditional layout.
    :param learn_sigma: also output the learned-range variance values (out_channels = 2 * in_channels).
    :param use_checkpoint: recompute each block's activations in the backward pass (saves memory; not in DiT,
        changes no parameter).
    """

    role = "denoiser"
    guidance_styles = ("all", "dit")
    label_dropout_key = "model.class_dropout_prob"

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int | None = 1000,
        learn_sigma: bool = True,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        _check_arguments(
            input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio, class_dropout_prob,
            num_classes,
        )  # fmt: skip
        self.input_size = input_size
        self.image_size = input_size  # the name the engine and the solvers read
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.class_dropout_prob = class_dropout_prob
        self.num_classes = num_classes or None
        self.null_class = num_classes if self.num_classes and class_dropout_prob > 0 else None
        self.use_checkpoint = use_checkpoint
        self.grid_size = input_size // patch_size
        self.num_tokens = self.grid_size**2

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if self.num_classes:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # A frozen Parameter, not a buffer: DiT's checkpoints hold it, and its parameter counts include it.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @classmethod
    def fit_to_data(cls, config: dict, data, learn_sigma: bool) -> dict:
        """
        The constructor config with the values only the run knows (see UNetModel.fit_to_data): ``in_channels``
        from the data (a latent data set's are the VAE's latent channels), ``num_classes`` from its labels, and
        whether the diffusion learns its variance. ``num_classes`` 0 (or null) keeps the DiT unconditional.

        :param config: the model group's config as a plain dict (with ``_target_``).
        :param data: a dataset with ``image_size`` (a latent data set's is the latent side, with
            ``pixel_image_size`` and ``downsample``), ``channels`` and ``num_classes``.
        :raises ConfigError: when the data cannot feed this network; the message names the keys to change.
        """
        side = config["input_size"]
        if side != data.image_size:
            if hasattr(data, "pixel_image_size"):
                factor = data.downsample
                raise ConfigError(
                    f"model.input_size={side} but the VAE turns data.image_size={data.pixel_image_size} images "
                    f"into {data.image_size}x{data.image_size} latents ({factor}x smaller): set "
                    f"data.image_size={side * factor} or model.input_size={data.image_size} (data.image_size "
                    "follows the model unless overridden)"
                )
            raise ConfigError(
                f"model.input_size={side} but data.image_size={data.image_size}: set both to the same value "
                "(data.image_size follows the model unless overridden)"
            )
        config = {**config, "in_channels": data.channels, "learn_sigma": learn_sigma}
        if config.get("num_classes"):
            if data.num_classes < 1:
                raise ConfigError(
                    f"model.num_classes={config['num_classes']} but the data has no labels: set "
                    "model.num_classes=0 model.class_dropout_prob=0 for an unconditional DiT"
                )
            config["num_classes"] = data.num_classes
        return config

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier-uniform Linear weights and zero biases, N(0, 0.02) label table and
        timestep MLP weights, the sin-cos position table, and adaLN-Zero (every modulation Linear and the final
        linear zero), so that a fresh model outputs exactly 0 and each block starts as the identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pos_embed.copy_(
            sincos_pos_embed_2d(self.hidden_size, self.grid_size, self.pos_embed.device)[None]
        )
        # Xavier over the [D, C*p*p] view: a Linear's fans, not a Conv2d's (whose fan_out counts p*p too).
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.view(self.hidden_size, -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.num_classes:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """
        :param x: an [N x T x p*p*C_out] Tensor; within a token's vector the channel index varies fastest.
        :return: an [N x C_out x H x W] Tensor.
        """
        p, g, c = self.patch_size, self.grid_size, self.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """
        :param x: an [N x in_channels x input_size x input_size] Tensor (images or latents).
        :param t: an [N] Tensor of timesteps, integer or fractional; a 0-dim Tensor is broadcast to N.
        :param y: an [N] long Tensor of labels (may hold null_class) for a class-conditional model, else None.
        :return: an [N x out_channels x input_size x input_size] Tensor: eps in channels [0, in_channels), the
            learned-range variance values in [in_channels, 2 * in_channels) when learn_sigma.
        """
        n = self._check_input(x)
        c = self.t_embedder(batch_timesteps(t, n))
        if self.num_classes:
            c = c + self.y_embedder(self._labels(y, n))
        elif y is not None:
            raise ValueError("y must be None for an unconditional DiT (num_classes=0)")
        h = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                h = checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guide_all_eps: bool = False,
    ) -> torch.Tensor:
        """
        DiT's classifier-free guidance, reproduced exactly for DiT's published numbers.

        The batch is laid out as DiT's sample.py builds it: images twice (``cat([z, z])``), labels then the null
        label. Only the first half of ``x`` is read; the forward runs on ``cat([half, half])`` with the given t
        and y. Channels 0-2 become ``uncond + cfg_scale * (cond - uncond)`` in both halves (DiT's choice, kept
        for reproducibility); every other channel (eps channel 3 and the variance channels) is the plain output
        of its own row. The platform's own guidance (``diffusion.sampling.solvers.guided``) guides all eps channels.

        :param x: a [2M x in_channels x H x W] Tensor.
        :param t: a [2M] Tensor of timesteps.
        :param y: a [2M] long Tensor: M labels, then M null labels.
        :param cfg_scale: the guidance weight; 1 returns the conditional prediction.
        :param guide_all_eps: guide all in_channels eps channels (the alternative DiT leaves commented out).
        :return: a [2M x out_channels x H x W] Tensor.
        """
        if x.shape[0] % 2:
            raise ValueError(
                f"forward_with_cfg needs an even batch (conditional rows, then the same rows with the null "
                f"label), got {x.shape[0]} rows"
            )
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half]), t, y=y)
        guided = self.in_channels if guide_all_eps else min(DIT_GUIDED_CHANNELS, self.in_channels)
        eps, rest = out[:, :guided], out[:, guided:]
        cond, uncond = eps.chunk(2)
        mixed = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([mixed, mixed]), rest], dim=1)

    def _check_input(self, x: torch.Tensor) -> int:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"x must have shape [N, {', '.join(map(str, expected))}] (in_channels, input_size, input_size), "
                f"got {list(x.shape)}"
            )
        return x.shape[0]

    def _labels(self, y: torch.Tensor | None, n: int) -> torch.Tensor:
        if y is None:
            raise ValueError(
                f"y (class labels) is required: this DiT is class-conditional (num_classes={self.num_classes})"
            )
        if y.shape != (n,):
            raise ValueError(f"y must have shape [{n}] (one label per image), got {list(y.shape)}")
        return y


def _check_arguments(
    input_size: int,
    patch_size: int,
    in_channels: int,
    hidden_size: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    class_dropout_prob: float,
    num_classes: int | None,
) -> None:
    for name, value in dict(
        input_size=input_size,
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads,
    ).items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    if input_size % patch_size:
        raise ConfigError(
            f"input_size={input_size} is not divisible by patch_size={patch_size}: choose a patch size that "
            "divides the input side"
        )
    if hidden_size % num_heads:
        raise ConfigError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if hidden_size % 4:
        raise ConfigError(
            f"hidden_size={hidden_size} must be divisible by 4 (the 2-D sin-cos position table's four parts)"
        )
    if not (
        isinstance(mlp_ratio, int | float) and math.isfinite(mlp_ratio) and int(hidden_size * mlp_ratio) >= 1
    ):
        raise ConfigError(
            f"mlp_ratio must be positive (MLP width int(hidden_size * mlp_ratio) >= 1), got {mlp_ratio!r}"
        )
    if not 0.0 <= class_dropout_prob < 1.0:
        raise ConfigError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 0):
        raise ConfigError(f"num_classes must be an int >= 0 (0 or None: unconditional), got {num_classes!r}")
    if not num_classes and class_dropout_prob > 0:
        raise ConfigError(
            f"class_dropout_prob={class_dropout_prob} needs labels, but num_classes={num_classes} makes the DiT "
            "unconditional: set class_dropout_prob=0 (or give num_classes)"
        )
