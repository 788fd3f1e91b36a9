import math

import pytest
import torch

from deepnoise import models
from deepnoise.errors import InputError


def _meta_params(name):
    with torch.device("meta"):
        return models.count_parameters(models.create_backbone(name))


def test_parameter_counts_xception_and_wide():
    narrow, wide = _meta_params("legacy_xception"), _meta_params(models.WIDE_XCEPTION)
    assert 20e6 < narrow < 22e6
    assert 34e6 < wide < 38e6


def test_wide_xception_shapes():
    net = models.XceptionWide()
    assert net.conv1.in_channels == 6 and net.conv1.out_channels == 64 and net.conv2.out_channels == 128
    widths = [getattr(net, f"block{i}").skip.out_channels for i in (1, 2, 3)]
    assert widths == [256, 384, 1024]
    assert net.block12.skip.out_channels == 1024 and net.n_blocks == 12
    assert net.conv3.pointwise.out_channels == 1536 and net.conv4.pointwise.out_channels == 2048
    net.eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 6, 64, 64))
    assert out.shape == (1, 2048)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_three_channel_stem_is_adapted(tmp_path, suffix):
    torch.manual_seed(0)
    rgb = models.timm.create_model("resnet10t", in_chans=3, num_classes=5).eval()
    state = rgb.state_dict()
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    six = models.create_backbone("resnet10t", pretrained=str(path)).eval()
    w3, w6 = state["conv1.0.weight"], six.state_dict()["conv1.0.weight"]
    assert w6.shape[1] == 6
    torch.testing.assert_close(w6, torch.cat([w3, w3], dim=1) * 0.5)
    # a grey image gives the same features with 3 or 6 equal channels
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        f3 = rgb.forward_head(rgb.forward_features(x.expand(-1, 3, -1, -1)), pre_logits=True)
        f6 = six(x.expand(-1, 6, -1, -1))
    torch.testing.assert_close(f3, f6, rtol=1e-4, atol=1e-4)


def test_pretrained_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        models.create_backbone("resnet10t", pretrained=str(tmp_path / "missing.pth"))
    torch.save({"unrelated": torch.zeros(3)}, tmp_path / "x.pth")
    with pytest.raises(InputError, match="no tensor matches"):
        models.create_backbone("resnet10t", pretrained=str(tmp_path / "x.pth"))
    with pytest.raises(InputError, match="unknown timm model"):
        models.create_backbone("no_such_net")


def test_arcface_margin_arithmetic():
    torch.manual_seed(0)
    s, m = 30.0, 0.1
    head = models.ArcFaceHead(8, 5, s=s, m=m)
    emb = torch.randn(4, 8)
    logits = head(emb)
    cos = torch.nn.functional.normalize(emb) @ torch.nn.functional.normalize(head.weight).T
    torch.testing.assert_close(logits, s * cos)
    labels = torch.tensor([0, 3, -1, 4])
    out = head.margin_logits(logits, labels)
    for i, y in enumerate(labels.tolist()):
        for j in range(5):
            c = cos[i, j].item()
            expect = s * math.cos(math.acos(c) + m) if j == y else s * c
            assert out[i, j].item() == pytest.approx(expect, abs=1e-4)
    torch.testing.assert_close(head.margin_logits(logits, None), logits)


def test_build_model_heads():
    mc = {"backbone": "resnet10t", "head": "softmax", "arcface_s": 30.0, "arcface_m": 0.1, "n_classes": 7}
    net = models.build_model(mc).eval()
    assert net(torch.zeros(2, 6, 32, 32)).shape == (2, 7)
    with pytest.raises(InputError, match="head"):
        models.build_model({**mc, "head": "cosface"})
