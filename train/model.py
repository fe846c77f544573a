"""AFNet-M: two ResNet streams (2D texture, 3D geometry) with mask attention (MA) and
importance-weight fusion (IWC).

The paper (Sui et al., arXiv 2205.11785) states the modules but its full text is not available
to us; the concrete design below is ours (see the design notes, ``../shared/design/paper.md``) and every choice
is an :class:`AFNetConfig` field.

Data flow for ``mode="full"`` (stages numbered from 1)::

    texture (B,3,S,S) -> normalise -> stem -> stage 1 -> [MA] -> stage 2 -> [MA] -> ...
    geometry (B,4,S,S) -> first in_geometry channels -> stem -> stage 1 -> [MA] -> ...
    at every fuse stage s:  w_s = softmax(MLP([GAP(F2d), GAP(F3d)]))          # (B, 2)
                            F_f = w_s[0] * F2d + w_s[1] * F3d
                            s < last: F2d += F_f; F3d += F_f (both streams see the other modality)
                            s = last: GAP(F_f) -> dropout -> FC -> logits

Every mode returns ``(logits (B, num_classes), modality_weights (B, len(fuse_stages), 2))`` so
that every ablation exports to the same ONNX interface; modes without IWC return constant
weights ([1, 0] for "2d", [0, 1] for "3d", [0.5, 0.5] for the concatenation modes).

File order (timm): blocks -> model -> factory -> registered variants.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from realtime.spec import EXPRESSIONS, GEOMETRY_CHANNELS, MASK_NAMES, SPEC

MODES = ("2d", "3d", "late_concat", "iwc", "ma", "full")
"""Ablations: single streams, the paper's late-concatenation baseline, +IWC, +MA, both (AFNet-M)."""

MASK_COMBINES = ("union", "learned")


@dataclass(frozen=True)
class AFNetConfig:
    """Everything that defines an AFNet-M network (saved in checkpoints and ONNX metadata).

    Attributes:
        name: Variant name, for reports and the exported model version.
        mode: One of :data:`MODES`.
        class_names: Output classes in logit order.
        input_size: Side of the square input maps in pixels (the canonical spec's size).
        in_geometry: How many of the geometry channels (in ``GEOMETRY_CHANNELS`` order: depth
            first) the 3D stream reads; 1 = depth only. The model always accepts all of them.
        num_masks: Region masks per sample (``MASK_NAMES``).
        width: Channel multiplier of both streams (1.0 = ResNet-18's 64..512).
        base_channels: Channels of stage 1 at width 1.0.
        blocks: BasicBlocks per stage; its length is the number of stages.
        ma_stages: Stages (1-based) after which MA modulates each stream ("ma" and "full").
        fuse_stages: Stages whose features are fused by IWC ("iwc" and "full"); the last one must
            be the last stage. Also sets F in ``modality_weights`` (B, F, 2) for every mode.
        mask_combine: How the K region masks become the one map M that MA uses ("union" or
            "learned"; see :class:`MaskAttention`).
        ma_reduction: Channel reduction of the MA MLPs' hidden layer.
        iwc_reduction: Channel reduction of the IWC MLP's hidden layer (on 2C inputs).
        dropout: Dropout before the classifier.
        texture_mean: Subtracted from the [0, 1] RGB texture inside the model.
        texture_std: The texture is divided by this after the mean is removed.
    """

    name: str = "afnet_m"
    mode: str = "full"
    class_names: tuple[str, ...] = EXPRESSIONS
    input_size: int = SPEC.size
    in_geometry: int = len(GEOMETRY_CHANNELS)
    num_masks: int = len(MASK_NAMES)
    width: float = 1.0
    base_channels: int = 64
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    ma_stages: tuple[int, ...] = (1, 2, 3)
    fuse_stages: tuple[int, ...] = (2, 3, 4)
    mask_combine: str = "learned"
    ma_reduction: int = 8
    iwc_reduction: int = 8
    dropout: float = 0.2
    texture_mean: float = 0.5
    texture_std: float = 0.25

    def __post_init__(self) -> None:
        # Lists (from JSON/YAML) become tuples so configs stay hashable and compare equal.
        for key in ("class_names", "blocks", "ma_stages", "fuse_stages"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        self._validate()

    def _validate(self) -> None:
        def fail(reason: str) -> None:
            raise ValueError(f"AFNetConfig {self.name!r}: {reason}")

        if self.mode not in MODES:
            fail(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mask_combine not in MASK_COMBINES:
            fail(f"mask_combine {self.mask_combine!r} is not one of {', '.join(MASK_COMBINES)}")
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            fail(f"class_names must be at least two distinct names, got {list(self.class_names)}")
        if not 1 <= self.in_geometry <= len(GEOMETRY_CHANNELS):
            fail(f"in_geometry must be 1..{len(GEOMETRY_CHANNELS)}, got {self.in_geometry}")
        if self.width <= 0 or self.base_channels < 1 or not self.blocks or min(self.blocks) < 1:
            fail(f"width {self.width}, base_channels {self.base_channels}, blocks {self.blocks} must be positive")
        num_stages = len(self.blocks)
        for key in ("ma_stages", "fuse_stages"):
            stages = getattr(self, key)
            if list(stages) != sorted(set(stages)) or any(not 1 <= s <= num_stages for s in stages):
                fail(f"{key} {stages} must be increasing stage numbers in 1..{num_stages}")
        if not self.fuse_stages:
            fail("fuse_stages must name at least one stage (it sizes modality_weights)")
        if self.fuse_stages[-1] != num_stages:
            fail(f"the last fuse stage must be the last stage ({num_stages}): its fused map feeds the classifier")
        if self.uses_ma:
            for stage in self.ma_stages:
                size = self.feature_size(stage)
                if self.input_size % size:
                    fail(f"input_size {self.input_size} is not a multiple of stage {stage}'s feature size {size}"
                         " (MA average-pools the masks by an integer factor)")
        if not 0.0 <= self.dropout < 1.0 or self.texture_std <= 0:
            fail(f"dropout {self.dropout} must be in [0, 1) and texture_std {self.texture_std} > 0")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def uses_2d(self) -> bool:
        return self.mode != "3d"

    @property
    def uses_3d(self) -> bool:
        return self.mode != "2d"

    @property
    def uses_ma(self) -> bool:
        return self.mode in ("ma", "full")

    @property
    def uses_iwc(self) -> bool:
        return self.mode in ("iwc", "full")

    def stage_channels(self) -> list[int]:
        """Output channels of every stage (multiples of 8, as width-scaled networks do)."""
        return [max(8, int(round(self.base_channels * self.width * 2**i / 8)) * 8) for i in range(len(self.blocks))]

    def feature_size(self, stage: int) -> int:
        """Spatial side of a stage's output (stem: stride 4; later stages: stride 2 each)."""
        size = self.input_size
        for _ in range(stage + 1):  # the stem halves twice, every stage after the first once
            size = math.ceil(size / 2)
        return size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists for tuples); :meth:`from_dict` reads it back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AFNetConfig":
        """Build from a dict; unknown keys are an error (a typo must not silently use a default)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"AFNetConfig: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)


# ----------------------------------------------------------------------------------------------
# Blocks


class BasicBlock(nn.Module):
    """ResNet BasicBlock: two 3x3 convolutions with batch norm and an identity/projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x), inplace=True)


class ResNetStream(nn.Module):
    """One modality's trunk: ResNet stem (7x7/2 conv, 3x3/2 max-pool) and stages of BasicBlocks.

    The stages are exposed separately because MA and IWC act between them.
    """

    def __init__(self, in_channels: int, channels: list[int], blocks: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 7, 2, 3, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages = []
        prev = channels[0]
        for i, (out, depth) in enumerate(zip(channels, blocks)):
            layers = [BasicBlock(prev, out, stride=1 if i == 0 else 2)]
            layers += [BasicBlock(out, out) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*layers))
            prev = out
        self.stages = nn.ModuleList(stages)


def _mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features))


class MaskAttention(nn.Module):
    """MA: scale a feature map by two learned vectors, one for salient regions and one for the rest.

    ``g_in = sigmoid(MLP_in(pool(F, M)))``, ``g_out = sigmoid(MLP_out(pool(F, 1 - M)))`` with
    ``pool`` a masked average over the map, then ``F + F * (g_in * M + g_out * (1 - M))``.
    The residual form keeps an identity path, so a stage still trains when the masks are empty.

    How the K region masks become M (``combine``):
        - "learned" (default): ``M = min(1, sum_k sigmoid(a_k) * M_k)`` with one learned logit per
          region and per MA module. The regions barely overlap, so this is a weighted union; it
          starts near the plain union (a_k = 3, weight 0.95) and lets every stage and stream learn
          how much, say, the brows matter compared with the mouth, which a fixed union cannot.
          Where overlapping regions reach 1 the clamp holds M at 1, as a union would.
        - "union": ``M = max_k M_k`` (no parameters), the ablation.
    """

    def __init__(self, channels: int, num_masks: int, reduction: int, combine: str) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.mlp_in = _mlp(channels, hidden, channels)
        self.mlp_out = _mlp(channels, hidden, channels)
        self.combine = combine
        if combine == "learned":
            self.region_logits = nn.Parameter(torch.full((num_masks,), 3.0))

    def combined_mask(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) region masks at the feature size -> (B, 1, h, w) map M in [0, 1]."""
        if self.combine == "union":
            return masks.amax(dim=1, keepdim=True)
        weights = torch.sigmoid(self.region_logits).view(1, -1, 1, 1)  # (1, K, 1, 1)
        return (masks * weights).sum(dim=1, keepdim=True).clamp(max=1.0)

    def forward(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        m = self.combined_mask(masks)  # (B, 1, h, w)
        inv = 1.0 - m
        pooled_in = (x * m).sum(dim=(2, 3)) / (m.sum(dim=(2, 3)) + 1e-6)  # (B, C)
        pooled_out = (x * inv).sum(dim=(2, 3)) / (inv.sum(dim=(2, 3)) + 1e-6)  # (B, C)
        g_in = torch.sigmoid(self.mlp_in(pooled_in))[:, :, None, None]  # (B, C, 1, 1)
        g_out = torch.sigmoid(self.mlp_out(pooled_out))[:, :, None, None]
        return x + x * (g_in * m + g_out * inv)


class ImportanceWeights(nn.Module):
    """IWC: per-sample modality weights ``softmax(MLP([GAP(F_2d), GAP(F_3d)]))`` and the fused map."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.mlp = _mlp(2 * channels, max(16, 2 * channels // reduction), 2)

    def forward(self, f2d: torch.Tensor, f3d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (fused map (B, C, h, w), weights (B, 2) with columns (2D, 3D))."""
        pooled = torch.cat([f2d.mean(dim=(2, 3)), f3d.mean(dim=(2, 3))], dim=1)  # (B, 2C)
        w = torch.softmax(self.mlp(pooled), dim=1)  # (B, 2)
        fused = w[:, 0, None, None, None] * f2d + w[:, 1, None, None, None] * f3d
        return fused, w


# ----------------------------------------------------------------------------------------------
# Model


class AFNet(nn.Module):
    """AFNet-M and its ablations (see the module docstring and :class:`AFNetConfig`).

    Inputs follow the model I/O contract: texture (B, 3, S, S) RGB in [0, 1]; geometry
    (B, >=in_geometry, S, S) (depth/50 then unit normals); masks (B, K, S, S) in [0, 1].
    """

    def __init__(self, config: AFNetConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.stage_channels()
        self.stream_2d = ResNetStream(3, channels, config.blocks) if config.uses_2d else None
        self.stream_3d = ResNetStream(config.in_geometry, channels, config.blocks) if config.uses_3d else None

        ma_stages = config.ma_stages if config.uses_ma else ()
        self.ma_2d = nn.ModuleDict()
        self.ma_3d = nn.ModuleDict()
        self._mask_pool: dict[int, int] = {}  # stage -> integer average-pool factor for the masks
        for stage in ma_stages:
            c = channels[stage - 1]
            self.ma_2d[str(stage)] = MaskAttention(c, config.num_masks, config.ma_reduction, config.mask_combine)
            self.ma_3d[str(stage)] = MaskAttention(c, config.num_masks, config.ma_reduction, config.mask_combine)
            self._mask_pool[stage] = config.input_size // config.feature_size(stage)

        self.iwc = nn.ModuleDict()
        if config.uses_iwc:
            for stage in config.fuse_stages:
                self.iwc[str(stage)] = ImportanceWeights(channels[stage - 1], config.iwc_reduction)

        concat = config.mode in ("late_concat", "ma")
        self.num_features = channels[-1] * (2 if concat else 1)
        self.head_drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(self.num_features, config.num_classes)

        fixed = {"2d": (1.0, 0.0), "3d": (0.0, 1.0)}.get(config.mode, (0.5, 0.5))
        self.register_buffer("fixed_weights", torch.tensor(fixed), persistent=False)
        self.register_buffer("texture_mean", torch.tensor(config.texture_mean), persistent=False)
        self.register_buffer("texture_std", torch.tensor(config.texture_std), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _check_inputs(self, texture: torch.Tensor, geometry: torch.Tensor, masks: torch.Tensor) -> None:
        cfg = self.config
        size = cfg.input_size
        expected = {"texture": (3, 3), "geometry": (cfg.in_geometry, None), "masks": (cfg.num_masks, cfg.num_masks)}
        batch = texture.shape[0] if texture.dim() == 4 else None
        for name, tensor in (("texture", texture), ("geometry", geometry), ("masks", masks)):
            low, high = expected[name]
            if (tensor.dim() != 4 or tuple(tensor.shape[2:]) != (size, size) or tensor.shape[0] != batch
                    or tensor.shape[1] < low or (high is not None and tensor.shape[1] > high)):
                want = f"[B, {low if high == low else str(low) + '+'}, {size}, {size}]"
                raise ValueError(f"AFNet {cfg.name}: input {name} has shape {list(tensor.shape)}, expected {want}"
                                 " with one batch size for all inputs")

    def forward_features(
        self, texture: torch.Tensor, geometry: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (pooled features (B, num_features), modality weights (B, F, 2))."""
        if not torch.jit.is_tracing():
            self._check_inputs(texture, geometry, masks)
        cfg = self.config
        f2d = f3d = None
        if self.stream_2d is not None:
            f2d = self.stream_2d.stem((texture - self.texture_mean) / self.texture_std)  # (B, C1, S/4, S/4)
        if self.stream_3d is not None:
            f3d = self.stream_3d.stem(geometry[:, : cfg.in_geometry])
        weights: list[torch.Tensor] = []  # IWC weights per fuse stage, each (B, 2)
        fused = None
        for index in range(len(cfg.blocks)):
            stage = index + 1
            if f2d is not None:
                f2d = self.stream_2d.stages[index](f2d)
            if f3d is not None:
                f3d = self.stream_3d.stages[index](f3d)
            if stage in self._mask_pool:
                factor = self._mask_pool[stage]
                m = F.avg_pool2d(masks, factor) if factor > 1 else masks  # (B, K, h, w)
                f2d = self.ma_2d[str(stage)](f2d, m)
                f3d = self.ma_3d[str(stage)](f3d, m)
            if str(stage) in self.iwc:
                fused, w = self.iwc[str(stage)](f2d, f3d)
                weights.append(w)
                if stage != cfg.fuse_stages[-1]:
                    # Hand the fused map to both streams so the next stage of each sees both modalities.
                    f2d = f2d + fused
                    f3d = f3d + fused

        if fused is not None:
            features = fused.mean(dim=(2, 3))  # (B, C)
        elif f2d is not None and f3d is not None:
            features = torch.cat([f2d.mean(dim=(2, 3)), f3d.mean(dim=(2, 3))], dim=1)  # (B, 2C)
        else:
            features = (f2d if f2d is not None else f3d).mean(dim=(2, 3))  # (B, C)

        if weights:
            modality_weights = torch.stack(weights, dim=1)  # (B, F, 2)
        else:
            modality_weights = self.fixed_weights.expand(features.shape[0], len(cfg.fuse_stages), 2)
        return features, modality_weights

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, num_features) -> logits (B, num_classes)."""
        return self.head(self.head_drop(features))

    def forward(
        self, texture: torch.Tensor, geometry: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits (B, num_classes), modality_weights (B, F, 2))."""
        features, modality_weights = self.forward_features(texture, geometry, masks)
        return self.forward_head(features), modality_weights


# ----------------------------------------------------------------------------------------------
# Factory


_VARIANTS: dict[str, Callable[[], AFNetConfig]] = {}


def register_variant(fn: Callable[[], AFNetConfig]) -> Callable[[], AFNetConfig]:
    """Register a function returning a named variant's config under the function's name."""
    _VARIANTS[fn.__name__] = fn
    return fn


def list_variants() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_VARIANTS)


def resolve_config(name_or_config: str | AFNetConfig | dict[str, Any], **overrides: Any) -> AFNetConfig:
    """A variant name, a config or a config dict, with field overrides (unknown fields are errors)."""
    if isinstance(name_or_config, AFNetConfig):
        config = name_or_config
    elif isinstance(name_or_config, dict):
        config = AFNetConfig.from_dict(name_or_config)
    elif name_or_config in _VARIANTS:
        config = _VARIANTS[name_or_config]()
    else:
        raise ValueError(f"unknown AFNet variant {name_or_config!r}; known: {', '.join(list_variants())}")
    if overrides:
        config = AFNetConfig.from_dict({**config.to_dict(), **overrides})
    return config


def build_model(name_or_config: str | AFNetConfig | dict[str, Any], **overrides: Any) -> AFNet:
    """Build an AFNet, e.g. ``build_model("afnet_m_rt")`` or ``build_model("afnet_m", mode="2d")``."""
    return AFNet(resolve_config(name_or_config, **overrides))


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------------------------
# Registered variants


@register_variant
def afnet_m() -> AFNetConfig:
    """Paper-sized: two ResNet-18 trunks at full width, 22.6 M parameters, 90 MB as ONNX."""
    return AFNetConfig(name="afnet_m")


@register_variant
def afnet_m_rt() -> AFNetConfig:
    """Real-time default: half width, one block in the last stage; 3.3 M parameters, 13 MB as ONNX.

    Chosen with ``bench/bench_model.py --sweep`` (ONNX Runtime 1.32 CPU, 2 threads, batch 1,
    112 px, on the shared 2-core dev machine): median 2.5 ms, 0.60x one plain ResNet-18 trunk
    timed in the same run (4.1 ms there), inside the 6 ms budget with room for a loaded machine.
    Against (2, 2, 2, 2) it drops one block of the 256-channel last stage: 0.1 ms faster and
    2.4 M parameters (10 MB) smaller; the high-resolution stages keep both blocks.
    """
    return AFNetConfig(name="afnet_m_rt", width=0.5, blocks=(2, 2, 2, 1))
