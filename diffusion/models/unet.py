"""The ADM networks ("Diffusion Models Beat GANs"), state-dict compatible with openai/guided-diffusion: the UNet,
its super-resolution variant (SuperResModel) and the noisy-image classifier (EncoderUNetModel) built on the
UNet's down path.

Parameter names and shapes equal the reference exactly, so the released checkpoints load with
``load_state_dict(sd, strict=True)``. The constructor takes the reference's command-line flags
(``num_channels``, ``attention_resolutions`` in pixels, ``learn_sigma``, ``class_cond``), so a
guided-diffusion user carries a flag set over one to one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffusion.errors import ConfigError
from diffusion.models.protocol import Network

# The reference normalises with 32 groups everywhere; the released checkpoints depend on it.
NORM_GROUPS = 32

# channel_mult the reference's create_model picks from the image size (32 is our addition).
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """
    Sinusoidal timestep embedding, laid out [cos | sin] as in the reference.

    :param t: an [N] Tensor of timesteps, integer or fractional.
    :param dim: the embedding width; an odd width gets one trailing zero column.
    :param max_period: the longest period; the frequencies are max_period ** (-i / (dim // 2)).
    :return: an [N x dim] float32 Tensor.
    """
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    angles = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (fp16 statistics overflow), cast back after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # An explicit float32 input: CPU autocast would otherwise run group_norm in bfloat16.
        out = F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps)
        return out.to(x.dtype)


class Dropout(nn.Dropout):
    """
    nn.Dropout with the mask drawn by ``rand_like`` and thresholded and scaled in place on the CPU.

    F.dropout's CPU path draws its mask with ``bernoulli_`` on one thread, then divides and multiplies in
    separate passes; ``rand_like`` runs on every thread and the mask reuses its buffer, which makes forward +
    backward 2.4x faster at unet_32's sizes on 2 threads (+2% on its whole train step). Same distribution,
    another random stream; other devices keep their fused kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: a Tensor of any shape; returns the same shape."""
        if not self.training or x.device.type != "cpu" or not 0.0 < self.p < 1.0:
            return super().forward(x)
        keep_scaled = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))  # 0 or 1/(1-p)
        return x * keep_scaled


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(NORM_GROUPS, channels)


def _zeroed(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: each residual branch then starts as the identity, as in the reference."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def _downsample(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=2, stride=2)


def _plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V written out, the formula SDPA must reproduce; softmax in float32."""
    weights = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(q.shape[-1])
    weights = torch.softmax(weights.float(), dim=-1).to(q.dtype)
    return torch.einsum("bhts,bhsd->bhtd", weights, v)


class TimestepBlock(nn.Module):
    """Marker for blocks whose forward takes the [N x emb_dim] conditioning embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the embedding to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution (parameter name `op`, as in the reference)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: an [N x C x H x W] Tensor; returns [N x C x H/2 x W/2]."""
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution (nearest neighbour), then a 3x3 convolution (parameter name `conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: an [N x C x H x W] Tensor; returns [N x C x 2H x 2W]."""
        return self.conv(_upsample(x))


class ResBlock(TimestepBlock):
    """
    Residual block conditioned on the embedding, optionally changing channels or resolution.

    :param channels: input channels.
    :param emb_channels: width of the conditioning embedding.
    :param out_channels: output channels; a 1x1 convolution maps the skip path when they differ.
    :param dropout: dropout rate before the last convolution.
    :param use_scale_shift_norm: FiLM conditioning, norm(h) * (1 + scale) + shift, instead of adding emb.
    :param resample: None, or `_upsample` / `_downsample` applied to both paths (resblock_updown).
    :param use_checkpoint: recompute the block in the backward pass instead of storing activations.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        resample: Callable[[torch.Tensor], torch.Tensor] | None = None,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.resample = resample
        # Sequential indices are part of the checkpoint keys: in_layers.{0,2}, out_layers.{0,3}, emb_layers.1.
        self.in_layers = nn.Sequential(
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            _norm(out_channels),
            nn.SiLU(),
            Dropout(p=dropout),
            _zeroed(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """
        :param x: an [N x C x H x W] Tensor of features.
        :param emb: an [N x emb_channels] Tensor of conditioning embeddings.
        :return: an [N x out_channels x H' x W'] Tensor (H' = H, 2H or H/2 with resample).
        """
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm_in, act_in, conv_in = self.in_layers
        h = act_in(norm_in(x))
        if self.resample is not None:
            # Resample after the activation and before the convolution, on both paths, as the reference.
            h, x = self.resample(h), self.resample(x)
        h = conv_in(h)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        norm_out, act_out, drop_out, conv_out = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, norm_out(h), 1 + scale)  # one pass for norm(h) * (1 + scale) + shift
        else:
            h = norm_out(h + emb_out)
        h = conv_out(drop_out(act_out(h)))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """
    Multi-head self-attention over all spatial positions, with a residual connection.

    The qkv and proj_out weights keep the reference's Conv1d shapes ([3C x C x 1], [C x C x 1]) so
    checkpoints load; they are applied as 1x1 Conv2d so the activation keeps its memory format.

    :param channels: feature channels C.
    :param num_heads: number of heads, used when num_head_channels is -1.
    :param num_head_channels: a fixed width per head; overrides num_heads when not -1.
    :param use_new_attention_order: qkv channels laid out [3 x heads x d] (QKVAttention) instead of the
        legacy [heads x 3 x d] (QKVAttentionLegacy); of the released models only 64x64 uses the new one.
    :param use_checkpoint: recompute the block in the backward pass.
    :param use_sdpa: use F.scaled_dot_product_attention; False runs the plain formula (for testing).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
        use_checkpoint: bool = False,
        use_sdpa: bool = True,
    ):
        super().__init__()
        self.num_heads = _heads_for(channels, num_heads, num_head_channels)
        self.use_new_attention_order = use_new_attention_order
        self.use_checkpoint = use_checkpoint
        self.use_sdpa = use_sdpa
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: an [N x C x H x W] Tensor; returns a Tensor of the same shape."""
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.conv2d(self.norm(x), self.qkv.weight[..., None], self.qkv.bias)  # (N, 3C, H, W)
        q, k, v = self._split_heads(qkv)  # each (N, heads, HW, d)
        attend = F.scaled_dot_product_attention if self.use_sdpa else _plain_attention
        a = _merge_heads(attend(q, k, v), like=x)  # (N, C, H, W)
        return x + F.conv2d(a, self.proj_out.weight[..., None], self.proj_out.bias)

    def _split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        :param qkv: the [N x 3C x H x W] output of the qkv projection.
        :return: q, k, v, each [N x heads x HW x d] with the last dimension contiguous, which SDPA's fused
            kernels need (with a strided one, CPU and CUDA fall back to the O(HW^2)-memory math path).
        """
        n, three_c, _, _ = qkv.shape
        d = three_c // (3 * self.num_heads)
        # (N, HW, 3C): a free view of a channels_last tensor, one copy of a contiguous one. Its gradient comes
        # back in the same layout, so the projection's backward needs no further copy.
        tokens = qkv.flatten(2).transpose(1, 2).contiguous()
        if self.use_new_attention_order:
            q, k, v = tokens.view(n, -1, 3, self.num_heads, d).unbind(2)
        else:
            q, k, v = tokens.view(n, -1, self.num_heads, 3, d).unbind(3)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _merge_heads(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """
    :param a: an [N x heads x HW x d] Tensor.
    :param like: the [N x C x H x W] block input, whose memory format the result copies.
    :return: an [N x C x H x W] Tensor (one copy, in `like`'s memory format, so the next conv needs none).
    """
    n, _, h, w = like.shape
    if not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        return a.permute(0, 2, 1, 3).reshape(n, h, w, -1).permute(0, 3, 1, 2)
    return a.transpose(-1, -2).reshape(n, -1, h, w)


def _heads_for(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Number of heads of an attention block over `channels`, with the reference's precedence."""
    if num_head_channels != -1:
        if num_head_channels < 1 or channels % num_head_channels:
            raise ConfigError(
                f"num_head_channels={num_head_channels} must be -1 or a positive divisor of the "
                f"{channels} channels of an attention block"
            )
        return channels // num_head_channels
    if num_heads < 1 or channels % num_heads:
        raise ConfigError(
            f"num_heads={num_heads} (or num_heads_upsample) must be a positive divisor of the "
            f"{channels} channels of an attention block"
        )
    return num_heads


def _channel_mult_for(image_size: int, channel_mult: Sequence[float] | None) -> tuple[float, ...]:
    if channel_mult is None:
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ConfigError(
                f"channel_mult has no default for image_size={image_size}; give it explicitly "
                f"(defaults exist for {sorted(DEFAULT_CHANNEL_MULT)})"
            )
        return DEFAULT_CHANNEL_MULT[image_size]
    if isinstance(channel_mult, str) or len(channel_mult) == 0 or any(m <= 0 for m in channel_mult):
        raise ConfigError(f"channel_mult must be a non-empty list of positive numbers, got {channel_mult!r}")
    return tuple(channel_mult)


def _attention_rates(image_size: int, resolutions: Sequence[int], num_levels: int) -> frozenset[int]:
    """Convert attention resolutions in pixels to the downsample rates the block layout is keyed by."""
    if isinstance(resolutions, str):
        raise ConfigError(
            f"attention_resolutions must be a list of pixel sizes like [32, 16, 8], got {resolutions!r}"
        )
    reachable = {image_size // 2**level: 2**level for level in range(num_levels)}
    rates = set()
    for res in resolutions:
        if res not in reachable:
            raise ConfigError(
                f"attention_resolutions contains {res}, which this network never reaches; "
                f"its resolutions are {sorted(reachable, reverse=True)}"
            )
        rates.add(reachable[res])
    return frozenset(rates)


def batch_timesteps(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as one timestep per image: an [n] Tensor (a 0-dim one is broadcast)."""
    if t.dim() == 0:
        return t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"t must have shape [{n}] (one timestep per image), got {list(t.shape)}")
    return t


def _time_embed(num_channels: int) -> nn.Sequential:
    """The MLP that lifts the sinusoidal embedding to the 4 * num_channels blocks read (keys time_embed.{0,2})."""
    emb_dim = 4 * num_channels
    return nn.Sequential(nn.Linear(num_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


@dataclass(frozen=True)
class _BlockMaker:
    """The settings one network's residual and attention blocks share, and the two block constructors."""

    emb_dim: int
    dropout: float
    use_scale_shift_norm: bool
    num_heads: int
    num_head_channels: int
    use_new_attention_order: bool
    use_checkpoint: bool
    use_sdpa: bool

    def res_block(self, ch: int, out_ch: int, resample: Callable | None = None) -> ResBlock:
        return ResBlock(
            ch, self.emb_dim, out_ch, self.dropout, self.use_scale_shift_norm, resample, self.use_checkpoint
        )

    def attention(self, ch: int, heads: int | None = None) -> AttentionBlock:
        return AttentionBlock(
            ch,
            self.num_heads if heads is None else heads,
            self.num_head_channels,
            self.use_new_attention_order,
            self.use_checkpoint,
            self.use_sdpa,
        )


def _trunk_layout(
    image_size: int,
    in_channels: int,
    num_channels: int,
    num_res_blocks: int,
    channel_mult: Sequence[float] | None,
    attention_resolutions: Sequence[int],
    dropout: float,
) -> tuple[list[int], frozenset[int]]:
    """Check the arguments the down path shares; return its channels per level and its attention rates."""
    channel_mult = _channel_mult_for(image_size, channel_mult)
    _check_arguments(image_size, in_channels, num_channels, num_res_blocks, channel_mult, dropout)
    attention_rates = _attention_rates(image_size, attention_resolutions, len(channel_mult))
    return [int(m * num_channels) for m in channel_mult], attention_rates


def _encoder(
    blocks: _BlockMaker,
    conv_in_channels: int,
    widths: Sequence[int],
    num_res_blocks: int,
    attention_rates: frozenset[int],
    resblock_updown: bool,
) -> tuple[nn.ModuleList, TimestepEmbedSequential, list[int]]:
    """
    The down path and middle block that the UNet and the classifier share, with the reference's layout.

    :param conv_in_channels: channels the first convolution reads.
    :param widths: channels per resolution level (num_channels * channel_mult).
    :param attention_rates: the downsample rates (1, 2, 4...) whose levels get attention blocks.
    :return: (input_blocks, middle_block, out_widths): out_widths[i] is the channel count input_blocks[i]
        outputs (the decoder's skip widths); the middle block keeps out_widths[-1].
    """
    ch = widths[0]
    input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(conv_in_channels, ch, 3, padding=1))])
    out_widths = [ch]
    for level, width in enumerate(widths):
        for _ in range(num_res_blocks):
            layers: list[nn.Module] = [blocks.res_block(ch, width)]
            ch = width
            if 2**level in attention_rates:
                layers.append(blocks.attention(ch))
            input_blocks.append(TimestepEmbedSequential(*layers))
            out_widths.append(ch)
        if level != len(widths) - 1:
            down = blocks.res_block(ch, ch, _downsample) if resblock_updown else Downsample(ch)
            input_blocks.append(TimestepEmbedSequential(down))
            out_widths.append(ch)
    middle_block = TimestepEmbedSequential(
        blocks.res_block(ch, ch), blocks.attention(ch), blocks.res_block(ch, ch)
    )
    return input_blocks, middle_block, out_widths


class UNetModel(nn.Module, Network):
    """
    The ADM UNet with timestep (and optional class) conditioning.

    :param image_size: input height and width.
    :param in_channels: input image channels.
    :param num_channels: base channel count (the reference's model_channels).
    :param num_res_blocks: residual blocks per resolution on the way down (one more on the way up).
    :param channel_mult: channel multiplier per resolution level; None takes the reference's default.
    :param attention_resolutions: resolutions in pixels at which attention blocks are inserted.
    :param num_heads: attention heads, used when num_head_channels is -1.
    :param num_head_channels: fixed width per head; overrides num_heads and num_heads_upsample.
    :param num_heads_upsample: heads in the decoder's attention; -1 means num_heads.
    :param dropout: dropout rate inside residual blocks.
    :param use_scale_shift_norm: FiLM-style conditioning in residual blocks.
    :param resblock_updown: resample with residual blocks instead of (strided) convolutions.
    :param use_new_attention_order: qkv layout [3 x heads x d] instead of the legacy [heads x 3 x d].
    :param learn_sigma: output twice the input channels (mean and variance interpolation).
    :param class_cond: condition on a class label y.
    :param num_classes: number of classes when class_cond.
    :param label_dropout: probability, in train mode, of replacing a label by the null label `null_class`
        (classifier-free guidance); > 0 adds one row to the label embedding.
    :param use_checkpoint: gradient checkpointing for residual and attention blocks.
    :param use_fp16: accepted for flag compatibility; mixed precision comes from torch.autocast.
    :param use_sdpa: attention through F.scaled_dot_product_attention; False runs the plain formula.
    """

    role = "denoiser"
    guidance_styles = ("all",)
    label_dropout_key = "model.label_dropout"

    # Images of in_channels the first convolution reads: SuperResModel adds the upsampled low-resolution one.
    _input_images = 1

    def __init__(
        self,
        image_size: int,
        in_channels: int = 3,
        num_channels: int = 128,
        num_res_blocks: int = 2,
        channel_mult: Sequence[float] | None = None,
        attention_resolutions: Sequence[int] = (16, 8),
        num_heads: int = 4,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        learn_sigma: bool = False,
        class_cond: bool = False,
        num_classes: int = 1000,
        label_dropout: float = 0.0,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        use_sdpa: bool = True,
    ):
        super().__init__()
        widths, attention_rates = _trunk_layout(
            image_size,
            in_channels,
            num_channels,
            num_res_blocks,
            channel_mult,
            attention_resolutions,
            dropout,
        )
        _check_labels(class_cond, num_classes, label_dropout)

        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.num_channels = num_channels
        self.num_classes = num_classes if class_cond else None
        self.label_dropout = label_dropout
        self.null_class = num_classes if class_cond and label_dropout > 0 else None

        self.time_embed = _time_embed(num_channels)
        if class_cond:
            self.label_emb = nn.Embedding(num_classes + (self.null_class is not None), 4 * num_channels)

        blocks = _BlockMaker(
            4 * num_channels,
            dropout,
            use_scale_shift_norm,
            num_heads,
            num_head_channels,
            use_new_attention_order,
            use_checkpoint,
            use_sdpa,
        )
        self.input_blocks, self.middle_block, skip_widths = _encoder(
            blocks, in_channels * self._input_images, widths, num_res_blocks, attention_rates, resblock_updown
        )
        ch = skip_widths[-1]

        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for i in range(num_res_blocks + 1):
                layers = [blocks.res_block(ch + skip_widths.pop(), widths[level])]
                ch = widths[level]
                if 2**level in attention_rates:
                    layers.append(blocks.attention(ch, heads_up))
                if level and i == num_res_blocks:
                    layers.append(blocks.res_block(ch, ch, _upsample) if resblock_updown else Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            _norm(ch), nn.SiLU(), _zeroed(nn.Conv2d(ch, self.out_channels, 3, padding=1))
        )

    @classmethod
    def fit_to_data(cls, config: dict, data, learn_sigma: bool) -> dict:
        """
        The constructor config with the values only the run knows: the data's channels and classes and whether
        the diffusion learns its variance. Every network a task trains has this classmethod; a task calls it
        before building the network, so the checkpoint stores the complete config.

        :param config: the model group's config as a plain dict (with ``_target_``).
        :param data: a dataset with ``image_size``, ``channels`` and ``num_classes`` (0: unlabeled).
        :raises ConfigError: when the data cannot feed this network.
        """
        if config["image_size"] != data.image_size:
            raise ConfigError(
                f"model.image_size={config['image_size']} but data.image_size={data.image_size}: set both to "
                "the same value (data.image_size follows the model unless overridden)"
            )
        if config.get("class_cond") and data.num_classes < 1:
            raise ConfigError("model.class_cond=true but the data has no labels: set model.class_cond=false")
        config = {**config, "in_channels": data.channels, "learn_sigma": learn_sigma}
        if config.get("class_cond"):
            config["num_classes"] = data.num_classes
        return config

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """
        :param x: an [N x in_channels x H x W] Tensor of noisy images.
        :param t: an [N] Tensor of timesteps (integer or float); a 0-dim Tensor is broadcast to N.
        :param y: an [N] long Tensor of labels for a class-conditional model (may hold null_class), else None.
        :return: an [N x out_channels x H x W] Tensor.
        """
        emb = self.time_embed(timestep_embedding(batch_timesteps(t, x.shape[0]), self.num_channels))
        if self.num_classes is not None:
            emb = emb + self.label_emb(self._labels(y, x.shape[0]))
        elif y is not None:
            raise ValueError("y must be None for an unconditional model (class_cond=False)")

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

    def _labels(self, y: torch.Tensor | None, n: int) -> torch.Tensor:
        if y is None:
            raise ValueError(
                "y (class labels) is required: this model is class-conditional (class_cond=True)"
            )
        if y.shape != (n,):
            raise ValueError(f"y must have shape [{n}] (one label per image), got {list(y.shape)}")
        if self.training and self.null_class is not None:
            # Classifier-free guidance: train the unconditional branch on the same network.
            drop = torch.rand(n, device=y.device) < self.label_dropout
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        return y


class SuperResModel(UNetModel):
    """
    The ADM super-resolution UNet: a UNetModel that also sees a low-resolution image.

    ``low_res`` is upsampled bilinearly to the noisy image's size and concatenated after it on the channel
    dimension, so the first convolution reads 2 * in_channels channels; everything else is UNetModel's (its
    ``in_channels`` and ``out_channels`` stay those of the image, as the platform reads them).

    :param small_size: the low resolution this model upsamples from (the reference's ``small_size``); when
        given, forward rejects a ``low_res`` of another size. None accepts any size.
    Other arguments as :class:`UNetModel`; ``image_size`` is the high resolution (the reference's ``large_size``).
    """

    role = "upsampler"

    _input_images = 2

    def __init__(self, *args, small_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if small_size is not None and not 1 <= small_size <= self.image_size:
            raise ConfigError(
                f"small_size={small_size} must be between 1 and image_size={self.image_size}: "
                "it is the resolution the model upsamples from"
            )
        self.small_size = small_size

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        low_res: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        :param x: an [N x in_channels x H x W] Tensor of noisy high-resolution images.
        :param t: an [N] Tensor of timesteps.
        :param low_res: an [N x in_channels x h x w] Tensor of the low-resolution images to upsample.
        :param y: an [N] long Tensor of labels for a class-conditional model, else None.
        :return: an [N x out_channels x H x W] Tensor.
        """
        if low_res is None:
            raise ValueError("low_res is required: a SuperResModel upsamples a low-resolution image")
        expected = (x.shape[0], self.in_channels)
        if low_res.dim() != 4 or tuple(low_res.shape[:2]) != expected:
            raise ValueError(
                f"low_res must have shape [{expected[0]} x {expected[1]} x h x w] (one image per x), "
                f"got {list(low_res.shape)}"
            )
        if self.small_size is not None and tuple(low_res.shape[2:]) != (self.small_size, self.small_size):
            raise ValueError(
                f"low_res is {low_res.shape[2]}x{low_res.shape[3]}; this model upsamples from "
                f"{self.small_size}x{self.small_size} (small_size)"
            )
        upsampled = F.interpolate(low_res, size=x.shape[2:], mode="bilinear", align_corners=False)
        return super().forward(torch.cat([x, upsampled.to(x.dtype)], dim=1), t, y)


class AttentionPool2d(nn.Module):
    """
    CLIP-style attention pooling: the mean token, with learned positional embeddings, attends to every position.

    Parameter names and shapes are the reference's (``positional_embedding`` [C x HW+1], ``qkv_proj`` and
    ``c_proj`` as Conv1d weights); heads split q, k, v in the "new" order [3 x heads x d].

    :param spatial_size: the side of the square feature map it pools.
    :param channels: feature channels C.
    :param num_heads: attention heads (C must be divisible by it).
    :param out_channels: width of the output.
    :param use_sdpa: use F.scaled_dot_product_attention; False runs the plain formula.
    """

    def __init__(
        self, spatial_size: int, channels: int, num_heads: int, out_channels: int, use_sdpa: bool = True
    ):
        super().__init__()
        self.num_heads = num_heads
        self.use_sdpa = use_sdpa
        self.positional_embedding = nn.Parameter(torch.randn(channels, spatial_size**2 + 1) / channels**0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: an [N x C x S x S] Tensor; returns [N x out_channels]."""
        n, c = x.shape[:2]
        tokens = x.flatten(2)  # (N, C, HW)
        tokens = torch.cat([tokens.mean(dim=-1, keepdim=True), tokens], dim=-1)  # (N, C, 1 + HW)
        tokens = tokens + self.positional_embedding.to(x.dtype)
        qkv = self.qkv_proj(tokens)  # (N, 3C, T)
        q, k, v = qkv.view(n, 3, self.num_heads, c // self.num_heads, -1).transpose(-1, -2).unbind(1)
        # Only the mean token's output is read out, so only its query is needed: (N, heads, 1, d).
        attend = F.scaled_dot_product_attention if self.use_sdpa else _plain_attention
        pooled = attend(q[:, :, :1].contiguous(), k.contiguous(), v.contiguous())
        return self.c_proj(pooled.reshape(n, c, 1))[:, :, 0]


class EncoderUNetModel(nn.Module, Network):
    """
    ADM's noisy-image classifier: the UNet's down path and middle block, then a pooling head to logits.

    State-dict compatible with guided-diffusion's EncoderUNetModel, so the released classifiers load strictly.
    It is called as ``model(x, t)`` with the timesteps of the diffusion it classifies noisy images of.

    :param image_size: input height and width (the attention pool's positional embedding is sized for it).
    :param in_channels: input image channels.
    :param num_channels: base channel count (the reference's classifier_width / model_channels).
    :param num_res_blocks: residual blocks per resolution (the reference's classifier_depth).
    :param channel_mult: channel multiplier per resolution level; None takes the reference's default.
    :param attention_resolutions: resolutions in pixels at which attention blocks are inserted.
    :param num_heads: attention heads, used when num_head_channels is -1.
    :param num_head_channels: fixed width per head (the reference's classifiers use 64); also sets the heads of
        the attention pool, which takes num_heads when it is -1.
    :param use_scale_shift_norm: FiLM-style conditioning in residual blocks.
    :param resblock_updown: downsample with residual blocks instead of strided convolutions.
    :param use_new_attention_order: qkv layout [3 x heads x d] in the attention blocks (the pool always uses it).
    :param dropout: dropout rate inside residual blocks.
    :param num_classes: number of output logits.
    :param pool: the head: "attention" (attention pooling, the released classifiers'), "adaptive" (global
        average pool and a 1x1 convolution), "spatial" or "spatial_v2" (an MLP on the mean of every block's
        features).
    :param use_checkpoint: gradient checkpointing for residual and attention blocks.
    :param use_fp16: accepted for flag compatibility; mixed precision comes from torch.autocast.
    :param use_sdpa: attention through F.scaled_dot_product_attention; False runs the plain formula.
    """

    role = "classifier"
    guidance_styles = ()
    label_dropout_key = ""

    POOLS = ("attention", "adaptive", "spatial", "spatial_v2")

    def __init__(
        self,
        image_size: int,
        in_channels: int = 3,
        num_channels: int = 128,
        num_res_blocks: int = 2,
        channel_mult: Sequence[float] | None = None,
        attention_resolutions: Sequence[int] = (32, 16, 8),
        num_heads: int = 1,
        num_head_channels: int = 64,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = True,
        use_new_attention_order: bool = False,
        dropout: float = 0.0,
        num_classes: int = 1000,
        pool: str = "attention",
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        use_sdpa: bool = True,
    ):
        super().__init__()
        if pool not in self.POOLS:
            raise ConfigError(f"pool must be one of {list(self.POOLS)}, got {pool!r}")
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        widths, attention_rates = _trunk_layout(
            image_size,
            in_channels,
            num_channels,
            num_res_blocks,
            channel_mult,
            attention_resolutions,
            dropout,
        )

        self.image_size = image_size
        self.in_channels = in_channels
        self.num_channels = num_channels
        self.num_classes = num_classes
        self.out_channels = num_classes
        self.null_class = None
        self.pool = pool

        self.time_embed = _time_embed(num_channels)
        blocks = _BlockMaker(
            4 * num_channels,
            dropout,
            use_scale_shift_norm,
            num_heads,
            num_head_channels,
            use_new_attention_order,
            use_checkpoint,
            use_sdpa,
        )
        self.input_blocks, self.middle_block, block_widths = _encoder(
            blocks, in_channels, widths, num_res_blocks, attention_rates, resblock_updown
        )
        ch = block_widths[-1]
        if pool == "attention":
            final_size = image_size // 2 ** (len(widths) - 1)
            heads = _heads_for(ch, num_heads, num_head_channels)
            self.out = nn.Sequential(
                _norm(ch), nn.SiLU(), AttentionPool2d(final_size, ch, heads, num_classes, use_sdpa)
            )
        elif pool == "adaptive":
            self.out = nn.Sequential(
                _norm(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                _zeroed(nn.Conv2d(ch, num_classes, 1)),
                nn.Flatten(),
            )
        else:
            # The spatial heads read the spatial mean of every input block's output and of the middle block's.
            features = sum(block_widths) + ch
            hidden = [nn.ReLU()] if pool == "spatial" else [_norm(2048), nn.SiLU()]
            self.out = nn.Sequential(nn.Linear(features, 2048), *hidden, nn.Linear(2048, num_classes))

    @classmethod
    def fit_to_data(cls, config: dict, data, **runtime) -> dict:
        """
        The constructor config with the data's channels and number of classes (see UNetModel.fit_to_data).

        :param config: the model group's config as a plain dict (with ``_target_``).
        :param data: a labelled dataset with ``image_size``, ``channels`` and ``num_classes``.
        :raises ConfigError: when the data cannot train this classifier, or a diffusion task asks for it
            (a diffusion task passes ``learn_sigma``).
        """
        if runtime:
            raise ConfigError(
                f"model._target_={config['_target_']} is a noisy-image classifier: train it with task=classifier "
                "(e.g. experiment=digits_classifier), or pick a diffusion model (model=unet_digits...)"
            )
        if config["image_size"] != data.image_size:
            raise ConfigError(
                f"model.image_size={config['image_size']} but data.image_size={data.image_size}: set both to "
                "the same value (data.image_size follows the model unless overridden)"
            )
        if data.num_classes < 2:
            raise ConfigError(
                f"a classifier needs labelled data with at least 2 classes; the data has {data.num_classes}: "
                "use class sub-folders or file-name prefixes (data.labels)"
            )
        return {**config, "in_channels": data.channels, "num_classes": data.num_classes}

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """
        :param x: an [N x in_channels x image_size x image_size] Tensor of (noisy) images.
        :param t: an [N] Tensor of timesteps (integer or float); a 0-dim Tensor is broadcast to N.
        :return: an [N x num_classes] Tensor of logits.
        """
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"the classifier takes [N x {expected[0]} x {expected[1]} x {expected[2]}] images "
                f"(in_channels={expected[0]}, image_size={expected[1]}), got {list(x.shape)}; "
                "use a classifier trained at the images' size and channels"
            )
        emb = self.time_embed(timestep_embedding(batch_timesteps(t, x.shape[0]), self.num_channels))
        spatial = self.pool != "attention" and self.pool != "adaptive"
        means = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            if spatial:
                means.append(h.float().mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.float().mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        return self.out(h)


def _check_arguments(
    image_size: int,
    in_channels: int,
    num_channels: int,
    num_res_blocks: int,
    channel_mult: tuple[float, ...],
    dropout: float,
) -> None:
    if in_channels < 1:
        raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
    if num_res_blocks < 1:
        raise ConfigError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    levels = len(channel_mult)
    if image_size < 1 or image_size % 2 ** (levels - 1):
        raise ConfigError(
            f"image_size={image_size} must be divisible by 2**{levels - 1}, "
            f"the downsampling of {levels} channel_mult levels"
        )
    for mult in channel_mult:
        width = int(mult * num_channels)
        if width < NORM_GROUPS or width % NORM_GROUPS:
            raise ConfigError(
                f"num_channels * channel_mult = {num_channels} * {mult} = {width} channels, which the "
                f"{NORM_GROUPS} normalisation groups do not divide; use multiples of {NORM_GROUPS}"
            )


def _check_labels(class_cond: bool, num_classes: int, label_dropout: float) -> None:
    if class_cond and num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1 when class_cond=True, got {num_classes}")
    if not 0.0 <= label_dropout < 1.0:
        raise ConfigError(f"label_dropout must be in [0, 1), got {label_dropout}")
    if label_dropout > 0 and not class_cond:
        raise ConfigError(
            "label_dropout > 0 needs class_cond=True: there are no labels to drop; set model.label_dropout=0"
        )
