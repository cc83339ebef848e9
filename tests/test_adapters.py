"""Adapters: every family's head reproduces the model's own embedding, and leaves it untouched."""

from __future__ import annotations

import copy
from typing import Any, Callable, NamedTuple

import open_clip
import pytest
import torch
from conftest import TINY_TEXT, TINY_VISION, tiny_clip
from timm.models import register_model
from timm.models.vision_transformer import _create_vision_transformer
from torch import nn

from laplace_vlm.adapters import (
    DualEncoderAdapter,
    Features,
    LinearHead,
    get_adapter,
    register_adapter,
)
from laplace_vlm.adapters import registry as adapters_base
from laplace_vlm.adapters.base import Tower
from laplace_vlm.adapters.capture import HookCapture

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


@register_model
def lvlm_test_vit_token(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A 32 px ViT with a class token: timm's classifier ``head`` is the projection."""
    return _create_vision_transformer("lvlm_test_vit_token", pretrained, **{**TINY_VIT, **kwargs})


@register_model
def lvlm_test_vit_map(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """SigLIP's layout: no class token, attention-pool (MAP) head."""
    cfg = dict(TINY_VIT, class_token=False, global_pool="map")
    return _create_vision_transformer("lvlm_test_vit_map", pretrained, **{**cfg, **kwargs})


def _clip(**text: Any) -> nn.Module:
    torch.manual_seed(0)
    return open_clip.model.CLIP(
        embed_dim=32, vision_cfg=TINY_VISION, text_cfg={**TINY_TEXT, **text}
    )


def _clipa() -> nn.Module:
    torch.manual_seed(0)
    vision = dict(TINY_VISION, final_ln_after_pool=True, pool_type="avg")
    text = dict(TINY_TEXT, pool_type="last", no_causal_mask=True)
    return open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    vision = dict(image_size=64, layers=[1, 1, 1, 1], width=16, head_width=64)
    return open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=TINY_TEXT)


def _custom_text(vision: dict, embed_dim: int = 32, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    text = kwargs.pop("text_cfg", TINY_TEXT)
    return open_clip.CustomTextCLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text, **kwargs)


def _timm(name: str, pool: str, proj: str | None) -> nn.Module:
    vision = dict(timm_model_name=name, timm_pool=pool, timm_proj=proj, image_size=32)
    return _custom_text(vision)


def _siglip() -> nn.Module:
    vision = dict(
        timm_model_name="lvlm_test_vit_map", timm_pool="map", timm_proj="none", image_size=32
    )
    text = dict(TINY_TEXT, no_causal_mask=True, proj_bias=True, pool_type="last")
    return _custom_text(vision, embed_dim=64, text_cfg=text, init_logit_bias=-10.0)


def _coca() -> nn.Module:
    torch.manual_seed(0)
    vision = dict(TINY_VISION, attentional_pool=True, attn_pooler_heads=2, attn_pooler_queries=8)
    multimodal = dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=1)
    return open_clip.CoCa(
        embed_dim=32,
        vision_cfg=dict(vision, output_tokens=True),
        text_cfg=dict(TINY_TEXT, embed_cls=True, output_tokens=True),
        multimodal_cfg=dict(multimodal, attn_pooler_heads=2),
    )


def _hf_text(proj: str, tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    """open_clip's HFTextEncoder from a tiny local RoBERTa config (no hub download)."""
    transformers = pytest.importorskip("transformers")
    config_dir = tmp_path_factory.mktemp(f"roberta_{proj}")
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.RobertaConfig(
        vocab_size=100, max_position_embeddings=40, pad_token_id=1, **sizes
    )
    config.save_pretrained(config_dir)
    text = dict(
        hf_model_name=str(config_dir),
        hf_tokenizer_name=str(config_dir),
        hf_proj_type=proj,
        hf_pooler_type="mean_pooler",
        hf_model_pretrained=False,
    )
    return _custom_text(TINY_VISION, text_cfg=text)


class Family(NamedTuple):
    """How to build a tiny model of one family, and where its heads must be found."""

    build: Callable[[], nn.Module]
    image_path: str
    text_path: str = "text.text_projection"
    image_size: int = 32
    residual: bool = False


OPEN_CLIP_FAMILIES = {
    "CLIP/ViT": Family(tiny_clip, "visual.proj", "text_projection"),
    "CLIP/ViT text Linear": Family(lambda: _clip(proj_bias=True), "visual.proj", "text_projection"),
    "CLIP/ViT text eos": Family(
        lambda: _clip(pool_type="eos", eos_id=49407), "visual.proj", "text_projection"
    ),
    "CLIPA": Family(_clipa, "visual.proj", "text_projection"),
    "CLIP/ModifiedResNet": Family(_resnet, "visual.attnpool.c_proj", "text_projection", 64),
    "CustomTextCLIP/ViT": Family(lambda: _custom_text(TINY_VISION), "visual.proj"),
    "CoCa": Family(_coca, "visual.proj"),
    "timm trunk.head": Family(
        lambda: _timm("lvlm_test_vit_token", "token", None), "visual.trunk.head"
    ),
    "timm trunk.head.fc": Family(
        lambda: _timm("test_byobnet", "avg", None), "visual.trunk.head.fc"
    ),
    "timm head.proj": Family(lambda: _timm("test_byobnet", "avg", "linear"), "visual.head.proj"),
    "timm head.mlp.fc2": Family(
        lambda: _timm("test_convnext", "avg", "mlp"), "visual.head.mlp.fc2"
    ),
    "SigLIP": Family(_siglip, "visual.trunk.attn_pool.mlp.fc2", residual=True),
}


HF_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def _hf_vision() -> dict:
    return dict(HF_SIZES, image_size=32, patch_size=8)


def _hf_text_cfg() -> dict:
    tokens = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return dict(HF_SIZES, vocab_size=100, max_position_embeddings=16, **tokens)


def _hf_model(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "CLIPModel":
        cfg = transformers.CLIPConfig(
            text_config=_hf_text_cfg(), vision_config=_hf_vision(), projection_dim=16
        )
        return transformers.CLIPModel(cfg).eval()
    if name == "SiglipModel":
        cfg = transformers.SiglipConfig(text_config=_hf_text_cfg(), vision_config=_hf_vision())
        return transformers.SiglipModel(cfg).eval()
    vision = dict(_hf_vision(), num_patches=16)
    cfg = transformers.Siglip2Config(text_config=_hf_text_cfg(), vision_config=vision)
    return transformers.Siglip2Model(cfg).eval()


HF_FAMILIES = {
    "CLIPModel": ("visual_projection", "text_projection", False),
    "SiglipModel": ("vision_model.head.mlp.fc2", "text_model.head", True),
    "Siglip2Model": ("vision_model.head.mlp.fc2", "text_model.head", True),
}


def _hf_inputs(name: str) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(1)
    tokens = {"input_ids": torch.randint(3, 100, (3, 8), generator=g)}
    if name == "Siglip2Model":  # pre-patchified pixels with a mask and the patch grid
        pixels = torch.randn(2, 16, 3 * 8 * 8, generator=g)
        mask = torch.ones(2, 16, dtype=torch.long)
        grid = torch.tensor([[4, 4], [4, 4]])
        inputs = {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": grid}
        return inputs, tokens
    return torch.randn(2, 3, 32, 32, generator=g), tokens


def _own_embedding(model: nn.Module, tower: str, inputs: Any) -> torch.Tensor:
    """The model's embedding through its public API, untouched by any adapter."""
    with torch.no_grad():
        if type(model).__module__.startswith("transformers."):
            fn = model.get_image_features if tower == "image" else model.get_text_features
            out = fn(**inputs) if isinstance(inputs, dict) else fn(pixel_values=inputs)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        fn = model.encode_image if tower == "image" else model.encode_text
        out = fn(inputs, normalize=False)
        return out[0] if isinstance(out, tuple) else out


def _head_param(model: nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own head in nn.Linear layout (bare open_clip Parameters transposed)."""
    try:
        module = model.get_submodule(path)
        return module.weight, module.bias
    except AttributeError:
        return model.get_parameter(path).T, None


class Case:
    """A built model with inputs and the expected head paths."""

    def __init__(self, model: nn.Module, images: Any, tokens: Any, paths: tuple, residual: bool):
        self.model, self.images, self.tokens = model, images, tokens
        self.image_path, self.text_path = paths
        self.residual = residual

    def inputs(self, tower: str) -> Any:
        return self.images if tower == "image" else self.tokens


HF_TEXT_ENCODERS = ["HFTextEncoder linear", "HFTextEncoder mlp"]
OPEN_CLIP_CASES = list(OPEN_CLIP_FAMILIES) + HF_TEXT_ENCODERS


def _build_case(name: str, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Case:
    if name in HF_FAMILIES:
        images, tokens = _hf_inputs(name)
        image_path, text_path, residual = HF_FAMILIES[name]
        return Case(_hf_model(name), images, tokens, (image_path, text_path), residual)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    if name in HF_TEXT_ENCODERS:
        proj = name.split()[-1]
        tokens = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(1))
        paths = ("visual.proj", "text.proj" if proj == "linear" else "text.proj.2")
        return Case(_hf_text(proj, tmp_path_factory).eval(), images, tokens, paths, False)
    family = OPEN_CLIP_FAMILIES[name]
    size = family.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    tokens = tokenizer(["a photo of a cat", "a dog", "an astronaut riding a horse on the moon"])
    paths = (family.image_path, family.text_path)
    return Case(family.build().eval(), images, tokens, paths, family.residual)


_BUILT: dict[str, Case] = {}


def _fresh_case(name: str, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Case:
    """A private copy of a model built once per session (building dominates the run time)."""
    if name not in _BUILT:
        _BUILT[name] = _build_case(name, tokenizer, tmp_path_factory)
    return copy.deepcopy(_BUILT[name])


@pytest.fixture(params=OPEN_CLIP_CASES + [f"transformers {name}" for name in HF_FAMILIES])
def case(request, tokenizer, tmp_path_factory) -> Case:
    return _fresh_case(request.param.removeprefix("transformers "), tokenizer, tmp_path_factory)


@pytest.fixture(params=OPEN_CLIP_CASES)
def open_clip_case(request, tokenizer, tmp_path_factory) -> Case:
    return _fresh_case(request.param, tokenizer, tmp_path_factory)


def _reconstruct(head: LinearHead, features: Features) -> torch.Tensor:
    recon = features.activations @ head.weight.T
    if head.bias is not None:
        recon = recon + head.bias
    return recon if features.residual is None else recon + features.residual


@pytest.mark.parametrize("tower", ["image", "text"])
def test_head_reproduces_the_models_own_embedding(case: Case, tower: str) -> None:
    adapter = get_adapter(case.model)
    head = getattr(adapter, f"{tower}_head")
    assert head.path == (case.image_path if tower == "image" else case.text_path)
    features = getattr(adapter, f"encode_{tower}")(case.inputs(tower))
    assert (features.residual is not None) == (case.residual and tower == "image")
    own = _own_embedding(case.model, tower, case.inputs(tower))
    atol = 1e-5 * own.abs().max().item()
    torch.testing.assert_close(_reconstruct(head, features), own, rtol=1e-5, atol=atol)
    torch.testing.assert_close(features.embeddings, own, rtol=1e-5, atol=atol)
    assert features.activations.shape == (own.shape[0], head.weight.shape[1])
    assert features.activations.dtype == torch.float32


def test_heads_are_copies_of_the_models_parameters(case: Case) -> None:
    adapter = get_adapter(case.model)
    for head in (adapter.image_head, adapter.text_head):
        weight, bias = _head_param(case.model, head.path)
        torch.testing.assert_close(head.weight, weight.detach(), rtol=0, atol=0)
        assert (head.bias is None) == (bias is None)
        if bias is not None:
            torch.testing.assert_close(head.bias, bias.detach(), rtol=0, atol=0)
        assert head.weight.data_ptr() != weight.data_ptr()
    torch.testing.assert_close(adapter.logit_scale, case.model.logit_scale.detach().reshape(()))
    assert adapter.logit_scale.shape == ()
    bias = getattr(case.model, "logit_bias", None)
    assert (adapter.logit_bias is None) == (bias is None)
    if bias is not None:
        assert adapter.logit_bias.shape == ()
        torch.testing.assert_close(adapter.logit_bias, bias.detach().reshape(()))


def _snapshot(model: nn.Module) -> dict:
    return {
        "params": dict(model.named_parameters()),
        "modules": dict(model.named_modules()),
        "state": copy.deepcopy(model.state_dict()),
        "training": {name: m.training for name, m in model.named_modules()},
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    assert dict(model.named_parameters()).keys() == before["params"].keys()
    for name, param in model.named_parameters():
        assert param is before["params"][name], name  # the bypass put the same object back
    for name, module in model.named_modules():
        assert module is before["modules"][name], name
        assert not module._forward_pre_hooks, f"hook left on {name}"
        assert module.training == before["training"][name], name
    state = model.state_dict()
    assert state.keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(state[key], value), key


def test_encoding_leaves_the_model_unchanged(case: Case) -> None:
    case.model.train()  # also restored: the adapter encodes in eval mode
    before = _snapshot(case.model)
    adapter = get_adapter(case.model)
    for _ in range(2):  # the first call also runs the check
        adapter.encode_image(case.images)
        adapter.encode_text(case.tokens)
    _assert_unchanged(case.model, before)


def test_a_failing_forward_restores_the_model(open_clip_case: Case) -> None:
    before = _snapshot(open_clip_case.model)
    adapter = get_adapter(open_clip_case.model)
    with pytest.raises(Exception):
        adapter.encode_image(torch.zeros(2, 5))
    with pytest.raises(Exception):
        adapter.encode_text(torch.zeros(2, 3, 4, dtype=torch.long))
    _assert_unchanged(open_clip_case.model, before)


@pytest.mark.parametrize("tower", ["image", "text"])
def test_a_tampered_head_fails_the_first_batch_check(case: Case, tower: str) -> None:
    adapter = get_adapter(case.model)
    head = getattr(adapter, f"{tower}_head")
    head.weight.add_(0.05 * torch.randn_like(head.weight))
    with pytest.raises(RuntimeError, match="does not reproduce") as info:
        getattr(adapter, f"encode_{tower}")(case.inputs(tower))
    assert adapter.family in str(info.value) and repr(head.path) in str(info.value)


def test_the_check_runs_on_the_first_batch_only(clip_model: nn.Module, tokenizer) -> None:
    adapter = get_adapter(clip_model)
    images = torch.randn(2, 3, 32, 32)
    adapter.encode_image(images)
    adapter.image_head.weight.mul_(2.0)
    adapter.encode_image(images)  # no second forward pass, no error


def test_families_are_named(case: Case) -> None:
    family = get_adapter(case.model).family
    assert family.split(".")[0] in ("open_clip", "transformers")
    assert type(case.model).__name__ in family


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.bfloat16, 3e-2)])
def test_outputs_are_never_half_precision(tokenizer, dtype: torch.dtype, rtol: float) -> None:
    model = tiny_clip().to(dtype)
    adapter = get_adapter(model)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    images = torch.randn(2, 3, 32, 32)  # float32 in, cast to the tower's dtype
    tokens = tokenizer(["a cat", "a dog"])
    for tower, inputs in (("image", images), ("text", tokens)):
        features = getattr(adapter, f"encode_{tower}")(inputs)
        head = getattr(adapter, f"{tower}_head")
        assert features.activations.dtype == features.embeddings.dtype == expected
        assert head.weight.dtype == adapter.logit_scale.dtype == expected
        own = _own_embedding(model, tower, inputs.to(dtype) if tower == "image" else inputs)
        recon = _reconstruct(head, features)
        assert torch.linalg.norm(recon - own.to(expected)) <= rtol * torch.linalg.norm(
            own.to(expected)
        )


def test_unsupported_model_names_the_supported_families() -> None:
    with pytest.raises(ValueError) as info:
        get_adapter(nn.Linear(3, 2))
    message = str(info.value)
    assert "torch.nn.modules.linear.Linear" in message
    for family in ("open_clip.CLIP", "open_clip.CoCa", "open_clip.CustomTextCLIP"):
        assert family in message
    assert "transformers.CLIPModel" in message and "transformers.SiglipModel" in message


def test_text_tower_without_projection_is_rejected() -> None:
    model = open_clip.model.CLIP(
        embed_dim=64, vision_cfg=TINY_VISION, text_cfg=dict(TINY_TEXT, proj_type="none")
    )
    with pytest.raises(ValueError, match="proj_type='none'.*Supported: TextTransformer"):
        get_adapter(model)


def test_timm_conv_classifier_is_rejected() -> None:
    with pytest.raises(ValueError, match="cannot find the last linear layer.*Supported"):
        get_adapter(_timm("test_convnext", "", None))  # 1x1 Conv2d head, not a Linear


def test_hf_siglip_without_vision_head_is_rejected() -> None:
    transformers = pytest.importorskip("transformers")
    vision = dict(_hf_vision(), vision_use_head=False)
    cfg = transformers.SiglipConfig(text_config=_hf_text_cfg(), vision_config=vision)
    with pytest.raises(ValueError, match="vision_use_head=False"):
        get_adapter(transformers.SiglipModel(cfg))


def test_an_adapter_passes_through(clip_model: nn.Module) -> None:
    adapter = get_adapter(clip_model)
    assert get_adapter(adapter) is adapter


class _ToyDualEncoder(nn.Module):
    def __init__(self, calls: int = 1) -> None:
        super().__init__()
        self.image_proj, self.text_proj = nn.Linear(4, 3), nn.Linear(5, 3, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor([2.0]))
        self.calls = calls

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.calls - 1):
            self.image_proj(x)
        return self.image_proj(x.tanh())

    def encode_text(self, x: torch.Tensor) -> torch.Tensor:
        return self.text_proj(x.cos())


def _toy_tower(name: str, path: str, linear: nn.Linear, encode: Callable) -> Tower:
    head = LinearHead.copy_of(path, linear.weight, linear.bias)
    return Tower(name, head, HookCapture(path, linear), encode, linear.weight)


class _ToyAdapter(DualEncoderAdapter):
    families = ("toy.DualEncoder",)

    def __init__(self, model: _ToyDualEncoder) -> None:
        super().__init__(
            model,
            family="toy.DualEncoder",
            image=_toy_tower("image", "image_proj", model.image_proj, model.encode_image),
            text=_toy_tower("text", "text_proj", model.text_proj, model.encode_text),
            logit_scale=model.logit_scale,
        )

    @classmethod
    def supports(cls, model: Any) -> bool:
        return isinstance(model, _ToyDualEncoder)


def test_registered_adapters_extend_get_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapters_base, "_ADAPTERS", list(adapters_base._ADAPTERS))
    with pytest.raises(ValueError, match="_ToyDualEncoder") as info:
        get_adapter(_ToyDualEncoder())
    assert "toy.DualEncoder" not in str(info.value)
    assert register_adapter(_ToyAdapter) is _ToyAdapter
    adapter = get_adapter(_ToyDualEncoder())
    assert isinstance(adapter, _ToyAdapter) and adapter.logit_scale.shape == ()
    x = torch.randn(6, 4)
    features = adapter.encode_image(x)
    torch.testing.assert_close(features.activations, x.tanh())
    torch.testing.assert_close(features.embeddings, adapter.model.encode_image(x).detach())
    with pytest.raises(ValueError, match="toy.DualEncoder"):
        get_adapter(nn.Linear(2, 2))


def test_a_head_called_twice_is_an_error() -> None:
    adapter = _ToyAdapter(_ToyDualEncoder(calls=2))
    with pytest.raises(RuntimeError, match="'image_proj' ran 2 times"):
        adapter.encode_image(torch.randn(3, 4))
