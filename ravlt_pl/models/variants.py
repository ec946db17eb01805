"""The published RAVLT-T/S/B/L hyper-parameters and their timm registration (``ravlt_t`` ...)."""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .checkpoint import checkpoint_filter_fn
from .ravlt import RAVLT

# RAVLT.md §1.3: projection 1024, mlp ratio 3.5, layer scale on in every stage.
VARIANTS: dict[str, dict] = {
    "ravlt_t": dict(embed_dims=[64, 128, 256, 512], depths=[2, 2, 6, 2], num_heads=[1, 2, 4, 8],
                    layer_init_values=[1.0, 1.0, 1.0, 1.0], drop_path_rate=0.10),
    "ravlt_s": dict(embed_dims=[64, 128, 320, 512], depths=[3, 5, 9, 3], num_heads=[1, 2, 5, 8],
                    layer_init_values=[1.0, 1.0, 1.0, 1.0], drop_path_rate=0.15),
    "ravlt_b": dict(embed_dims=[96, 192, 384, 512], depths=[4, 6, 12, 6], num_heads=[1, 2, 6, 8],
                    layer_init_values=[1.0, 1.0, 1e-6, 1e-6], drop_path_rate=0.40),
    "ravlt_l": dict(embed_dims=[96, 192, 448, 640], depths=[4, 7, 19, 8], num_heads=[1, 2, 7, 10],
                    layer_init_values=[1e-6] * 4, drop_path_rate=0.55),
}  # fmt: skip
COMMON = dict(mlp_ratios=3.5, layerscales=True, projection=1024, attention=["linear", "linear", "softmax", "softmax"])


def variant_of(embed_dims: list[int], depths: list[int]) -> str | None:
    """The published variant with these stage widths and depths (``None``: another shape)."""
    same = (n for n, v in VARIANTS.items() if v["embed_dims"] == list(embed_dims) and v["depths"] == list(depths))
    return next(same, None)


def variant_kwargs(name: str, **overrides) -> dict:
    """Constructor arguments of a published variant, with overrides (e.g. ``out_indices``)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown RAVLT variant {name!r}; choose one of {sorted(VARIANTS)}")
    return {**COMMON, **VARIANTS[name], **overrides}


#: The authors' released ImageNet-1k weights (DeiT-style ``{"model": ..., "model_ema": ...}``).
HF_HUB_ID = "aldjalkdf/RAVLT"


def _cfg(**kwargs) -> dict:
    return dict(
        url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.proj.0", classifier="head", license="apache-2.0", **kwargs,
    )  # fmt: skip


# ``custom_load``: timm hands the downloaded file (or ``pretrained_cfg_overlay=dict(file=...)``) to
# RAVLT.load_pretrained, which reads the release through ravlt_pl.models.checkpoint (DeiT dicts and
# the authors' names) instead of timm's plain state-dict loader.
default_cfgs = generate_default_cfgs({
    f"{name}.in1k": _cfg(hf_hub_id=HF_HUB_ID, hf_hub_filename=f"RAVLT_{name[-1].upper()}.pth", custom_load="hf")
    for name in VARIANTS
})  # fmt: skip


def _create(variant: str, pretrained: bool = False, **kwargs) -> RAVLT:
    if kwargs.get("features_only") and "feature_cls" not in kwargs:  # our dense form is the features model
        del kwargs["features_only"]
        kwargs["out_indices"] = tuple(kwargs.get("out_indices") or (0, 1, 2, 3))
    elif not kwargs.get("features_only"):  # (a feature_cls: timm wraps the classifier's forward_intermediates)
        kwargs.pop("out_indices", None)
    return build_model_with_cfg(
        RAVLT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **variant_kwargs(variant, **kwargs)
    )


@register_model
def ravlt_t(pretrained: bool = False, **kwargs) -> RAVLT:
    return _create("ravlt_t", pretrained, **kwargs)


@register_model
def ravlt_s(pretrained: bool = False, **kwargs) -> RAVLT:
    return _create("ravlt_s", pretrained, **kwargs)


@register_model
def ravlt_b(pretrained: bool = False, **kwargs) -> RAVLT:
    return _create("ravlt_b", pretrained, **kwargs)


@register_model
def ravlt_l(pretrained: bool = False, **kwargs) -> RAVLT:
    return _create("ravlt_l", pretrained, **kwargs)


def build_backbone(variant: str = "ravlt_s", overrides: dict | None = None, **kwargs) -> RAVLT:
    """A published variant with ``overrides`` (e.g. a tiny test model) and task arguments (``kwargs``).

    ``overrides`` come from configs (``backbone_overrides``); ``kwargs`` from the task code
    (``num_classes``, ``out_indices``, ``drop_path_rate``).
    """
    return RAVLT(**variant_kwargs(variant, **{**kwargs, **(overrides or {})}))
