"""The landmark-to-face GAN: networks, the generator file contract, training behaviour."""

from __future__ import annotations

import json

import pytest
import torch

from facecal.gan import models
from facecal.gan.models import (GeneratorError, build_discriminators, build_generator,
                                count_parameters, generator_config, load_generator,
                                save_generator)


def test_pldt_matches_the_original_size():
    # 4 convs 3→96→192→384→768 and 4 transposed convs back, no bias: 12.40 M weights + BN.
    G = build_generator("pldt", 64, 3)
    assert 12.3e6 < count_parameters(G) < 12.5e6
    convs = [m for m in G.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert [m.out_channels for m in convs] == [96, 192, 384, 768, 384, 192, 96, 3]
    assert all(m.bias is None for m in convs)


@pytest.mark.parametrize("arch,kw", [("pldt", {"width": 8}), ("pix2pix", {"ngf": 8})])
@pytest.mark.parametrize("identity", [False, True])
def test_shapes_and_range(arch, kw, identity):
    cin = 6 if identity else 3
    G = build_generator(arch, 64, cin, **kw).eval()
    x = torch.rand(2, cin, 64, 64) * 2 - 1
    y = G(x)
    assert y.shape == (2, 3, 64, 64)
    assert y.min() >= -1 and y.max() <= 1
    Ds = build_discriminators(arch, 64, cin, **({"width": 8} if arch == "pldt" else {"ndf": 8}))
    assert set(Ds) == ({"D", "DA"} if arch == "pldt" else {"D"})
    for name, D in Ds.items():
        inp = y if (arch == "pldt" and name == "D") else torch.cat([x, y], 1)
        assert D(inp).shape[:2] == (2, 1)


@pytest.mark.parametrize("size", [128, 256])
def test_pix2pix_sizes(size):
    G = build_generator("pix2pix", size, 3, ngf=4).eval()
    assert G(torch.zeros(1, 3, size, size)).shape == (1, 3, size, size)


def test_bad_options_are_named():
    with pytest.raises(GeneratorError, match="arch"):
        build_generator("vae", 64, 3)
    with pytest.raises(GeneratorError, match="widht"):
        build_generator("pldt", 64, 3, widht=8)
    with pytest.raises(GeneratorError, match="power of two"):
        build_generator("pldt", 60, 3)


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    G = build_generator("pix2pix", 64, 6, ngf=8)
    cfg = generator_config("pix2pix", 64, "edges", True, {"ngf": 8})
    save_generator(G, cfg, tmp_path)
    assert json.loads((tmp_path / "generator.json").read_text()) == cfg
    # weights_only loading: the file holds nothing but tensors
    assert set(torch.load(tmp_path / "generator.pt", weights_only=True)) == set(G.state_dict())
    G2, cfg2 = load_generator(tmp_path)
    assert cfg2 == cfg and not G2.training
    x = torch.rand(2, 6, 64, 64) * 2 - 1
    G.eval()
    assert torch.equal(G(x), G2(x))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(GeneratorError, match="generator.json"):
        load_generator(tmp_path)
    cfg = generator_config("pldt", 64, "dots", False, {"width": 8})
    save_generator(build_generator("pldt", 64, 3, width=8), cfg, tmp_path)
    (tmp_path / "generator.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(GeneratorError, match="generator.pt"):
        load_generator(tmp_path)
    save_generator(build_generator("pldt", 64, 3, width=16), cfg, tmp_path)  # width mismatch
    with pytest.raises(GeneratorError, match="do not fit"):
        load_generator(tmp_path)
    bad = dict(cfg, in_channels=6)
    (tmp_path / "generator.json").write_text(json.dumps(bad))
    with pytest.raises(GeneratorError, match="in_channels"):
        load_generator(tmp_path)


def test_save_unwraps_ddp_like_wrappers(tmp_path):
    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m
    G = build_generator("pldt", 64, 3, width=8)
    save_generator(Wrapper(G), generator_config("pldt", 64, "dots", False, {"width": 8}), tmp_path)
    G2, _ = load_generator(tmp_path)
    assert set(G2.state_dict()) == set(G.state_dict())
    assert models.GENERATOR_WEIGHTS == "generator.pt"
