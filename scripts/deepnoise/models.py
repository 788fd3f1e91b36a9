"""Backbones (timm, 6 input channels, Xception-Wide) and classification heads (ArcFace, softmax).

``build_model(model_config)`` returns a :class:`DeepNoiseNet` whose ``forward(x)`` gives the logits
used for probabilities (``s * cos`` for ArcFace, the linear logits for softmax); the ArcFace angular
margin is applied to the target class by ``net.head.margin_logits(logits, labels)`` in training only.
``model_config`` is a JSON-able dict stored in the weights file, so prediction rebuilds the same net.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models._manipulate import adapt_input_conv
from timm.models.xception import Block, SeparableConv2d, Xception

from deepnoise.errors import InputError
from deepnoise.layout import N_CHANNELS

WIDE_XCEPTION = "xception_wide"


class XceptionWide(Xception):
    """Xception with wider layers (DeepNoise's "wide Xception"), from timm's Xception blocks.

    Stem 64/128, entry blocks 256/384/1024, 8 middle blocks of 1024, exit block 1024 -> 1024, then
    separable convs 1536 and 2048 (~36M parameters vs ~21M for ``legacy_xception``). The forward
    pass, pooling and classifier are timm's ``Xception`` ones.
    """

    def __init__(
        self,
        num_classes: int = 0,
        in_chans: int = N_CHANNELS,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        stem: tuple[int, int] = (64, 128),
        entry: tuple[int, int, int] = (256, 384, 1024),
        middle: int = 1024,
        n_middle: int = 8,
        exit_widths: tuple[int, int, int] = (1024, 1536, 2048),
    ):
        nn.Module.__init__(self)
        self.drop_rate = drop_rate
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = exit_widths[2]
        self.conv1 = nn.Conv2d(in_chans, stem[0], 3, 2, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(stem[0])
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(stem[0], stem[1], 3, bias=False)
        self.bn2 = nn.BatchNorm2d(stem[1])
        self.act2 = nn.ReLU(inplace=True)
        self.block1 = Block(stem[1], entry[0], 2, 2, start_with_relu=False)
        self.block2 = Block(entry[0], entry[1], 2, 2)
        self.block3 = Block(entry[1], entry[2], 2, 2)
        widths = entry[2]
        for i in range(n_middle):
            setattr(self, f"block{4 + i}", Block(widths if i == 0 else middle, middle, 3, 1))
        last = 4 + n_middle
        setattr(self, f"block{last}", Block(middle, exit_widths[0], 2, 2, grow_first=False))
        self.conv3 = SeparableConv2d(exit_widths[0], exit_widths[1], 3, 1, 1)
        self.bn3 = nn.BatchNorm2d(exit_widths[1])
        self.act3 = nn.ReLU(inplace=True)
        self.conv4 = SeparableConv2d(exit_widths[1], self.num_features, 3, 1, 1)
        self.bn4 = nn.BatchNorm2d(self.num_features)
        self.act4 = nn.ReLU(inplace=True)
        self.n_blocks = last
        self.feature_info = [
            dict(num_chs=stem[1], reduction=2, module="act2"),
            dict(num_chs=entry[0], reduction=4, module="block2.rep.0"),
            dict(num_chs=entry[1], reduction=8, module="block3.rep.0"),
            dict(num_chs=middle, reduction=16, module=f"block{last}.rep.0"),
            dict(num_chs=self.num_features, reduction=32, module="act4"),
        ]
        self.feature_ends = [0, 1, 2, last - 1, last]
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def forward_features(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        for i in range(1, self.n_blocks + 1):
            x = getattr(self, f"block{i}")(x)
        x = self.act3(self.bn3(self.conv3(x)))
        return self.act4(self.bn4(self.conv4(x)))


def _load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"pretrained weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input error
        raise InputError(f"cannot read pretrained weights {path}: {exc}") from exc
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise InputError(f"pretrained weights {path}: not a state dict")
    return state


def load_pretrained(backbone: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load an (ImageNet) state dict into a 6-channel backbone.

    Input convolutions with 3 input channels are adapted with timm's ``adapt_input_conv`` (channels
    repeated and scaled by 3/6, so a constant image gives the same activation); classifier weights
    and other tensors whose shape does not match are skipped. Raises ``InputError`` when nothing of
    the backbone matched.
    """
    own = backbone.state_dict()
    adapted, skipped = {}, []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key not in own:
            skipped.append(key)
            continue
        target = own[key]
        if value.shape != target.shape and value.ndim == 4 and value.shape[1] != target.shape[1]:
            if value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]:
                value = adapt_input_conv(target.shape[1], value.float(), base_chans=value.shape[1])
        if value.shape != target.shape:
            skipped.append(key)
            continue
        adapted[key] = value.to(target.dtype)
    if not adapted:
        raise InputError(f"pretrained weights {source}: no tensor matches the backbone")
    backbone.load_state_dict(adapted, strict=False)


def create_backbone(
    name: str, pretrained: bool | str | None = False, in_chans: int = N_CHANNELS
) -> nn.Module:
    """A timm backbone by name (or ``xception_wide``) without classifier (``num_classes=0``).

    ``pretrained``: ``False``/``None``: random init; ``True``: timm's download (needs a network);
    a path: a local ``.pth``/``.pt``/``.safetensors`` state dict adapted to ``in_chans`` channels.
    """
    if name == WIDE_XCEPTION:
        if pretrained is True:
            raise InputError(f"backbone {name}: no published pretrained weights; pass a file path")
        backbone = XceptionWide(num_classes=0, in_chans=in_chans)
    else:
        if not timm.is_model(name):
            raise InputError(f"backbone: unknown timm model name {name!r}")
        try:
            backbone = timm.create_model(
                name, pretrained=pretrained is True, in_chans=in_chans, num_classes=0
            )
        except Exception as exc:  # noqa: BLE001 - e.g. download failed, no network
            if pretrained is True:
                raise InputError(f"backbone {name}: cannot get pretrained weights: {exc}") from exc
            raise
    if isinstance(pretrained, str) and pretrained:
        load_pretrained(backbone, _load_state_file(pretrained), source=pretrained)
    return backbone


class ArcFaceHead(nn.Module):
    """ArcFace: logits ``s * cos(theta)`` between the L2-normalised embedding and class weights.

    ``margin_logits(logits, labels)`` replaces the target logit by ``s * cos(theta + m)`` for rows
    with a label >= 0 (training); the other logits and unlabelled rows keep ``s * cos(theta)``.
    For ``theta + m > pi`` the usual monotonic extension ``cos(theta) - m * sin(m)`` is used.
    """

    def __init__(self, in_features: int, n_classes: int, s: float = 30.0, m: float = 0.1):
        super().__init__()
        self.s, self.m = float(s), float(m)
        self.weight = nn.Parameter(torch.empty(n_classes, in_features))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(emb.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.s * self.cosine(emb)

    def margin_logits(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None or self.m == 0.0:
            return logits
        cos = (logits / self.s).clamp(-1.0, 1.0)
        sin = (1.0 - cos * cos).clamp_min(1e-12).sqrt()
        phi = cos * math.cos(self.m) - sin * math.sin(self.m)
        phi = torch.where(cos > math.cos(math.pi - self.m), phi, cos - self.m * math.sin(self.m))
        labelled = labels >= 0
        onehot = F.one_hot(labels.clamp_min(0), logits.shape[1]).bool() & labelled[:, None]
        return torch.where(onehot, self.s * phi, logits)


class SoftmaxHead(nn.Module):
    """Plain linear classifier; ``margin_logits`` is the identity."""

    def __init__(self, in_features: int, n_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, n_classes)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.fc(emb.float())

    def margin_logits(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return logits


class DeepNoiseNet(nn.Module):
    """Backbone + optional dropout + head. ``forward(x)`` returns float32 logits ``(B, n_classes)``;
    under autocast only the backbone runs in low precision."""

    def __init__(self, backbone: nn.Module, head: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.dropout(self.backbone(x))
        # the head (normalisation, cosine, scale s) runs in float32 even under bf16 autocast
        with torch.autocast(x.device.type, enabled=False):
            return self.head(emb.float())


def model_config(cfg, n_classes: int, n_treatments: int) -> dict:
    """The JSON-able model description stored in weights files (``cfg`` is a ``TrainConfig``)."""
    return {
        "backbone": cfg.backbone,
        "head": cfg.head,
        "arcface_s": float(cfg.arcface_s),
        "arcface_m": float(cfg.arcface_m),
        "dropout": float(cfg.dropout),
        "n_classes": int(n_classes),
        "n_treatments": int(n_treatments),
        "input_size": int(cfg.input_size),
        "normalization": cfg.normalization,
        "in_chans": N_CHANNELS,
    }


def build_model(mc: dict, pretrained: bool | str | None = False) -> DeepNoiseNet:
    """The net described by a ``model_config`` dict."""
    backbone = create_backbone(mc["backbone"], pretrained=pretrained, in_chans=int(mc.get("in_chans", 6)))
    n_features = backbone.num_features
    if mc["head"] == "arcface":
        head = ArcFaceHead(n_features, mc["n_classes"], mc["arcface_s"], mc["arcface_m"])
    elif mc["head"] == "softmax":
        head = SoftmaxHead(n_features, mc["n_classes"])
    else:
        raise InputError(f"head: expected 'arcface' or 'softmax', got {mc['head']!r}")
    return DeepNoiseNet(backbone, head, float(mc.get("dropout", 0.0)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
