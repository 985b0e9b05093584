"""Any timm or torchvision classification model by name: ``timm/<name>``, ``tv/<name>``.

``model.name: timm/resnet50`` builds ``timm.create_model("resnet50", num_classes=K,
in_chans=C)`` (timm is an optional extra: ``pip install 'selfkd[timm]'``); ``model.name:
tv/resnet34`` builds ``torchvision.models.get_model("resnet34", num_classes=K)`` (the first
convolution is replaced when ``in_channels != 3``). ``model.options``:

* ``pretrained: true`` — the library's own pretrained weights (timm: its hub; torchvision: the
  ``DEFAULT`` weights), downloaded by the library when online; a head of another class count
  is replaced by a fresh one (logged). Offline this is a one-line ModelError with the local
  route: ``pretrained: PATH`` (or ``weights: PATH``) loads a local file safely, a ``.safetensors``
  file or a ``torch.save``'d state dict read with ``weights_only=True``; a file for another
  architecture is refused naming the first parameter that differs, one whose only difference
  is the class count gets a new head (said in a warning);
* ``taps: {name: spec}`` — feature taps to add or override (module paths, see
  :mod:`selfkd.models.taps`);
* anything else is passed to ``timm.create_model`` / ``get_model`` (e.g. ``drop_rate``).

Feature taps for DRG, DSR, BYOT and ZF-LS are found automatically: ``stage1..N`` are timm's
``feature_info`` stages (the stride-2 stem left out) or, for torchvision, the last module at each
spatial resolution of a forward pass on one dummy image; ``features`` is the input of the global
pooling and ``pooled`` the input of the final classifier (the last ``nn.Linear`` with
``num_classes`` outputs, also exposed as ``model.classifier``). Transformers have no spatial
stages, so the methods that need them refuse such models with a one-line error.
The state-dict keys are the library's own, so its pretrained files load directly.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfkd.errors import ConfigError, ModelError

PREFIXES = {"timm": "timm", "tv": "torchvision"}
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)


def split_name(name: str) -> tuple[str, str] | None:
    """``("timm", "resnet50")`` for ``"timm/resnet50"``; None for a registry name."""
    kind, sep, arch = name.partition("/")
    if sep and kind in PREFIXES:
        return kind, arch
    return None


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ConfigError(
            "model names timm/<name> need timm: pip install 'selfkd[timm]' (or pip install timm)"
        ) from None
    return timm


def known_names(kind: str) -> list[str]:
    """Every architecture name the library offers (timm: without pretrained tags)."""
    if kind == "timm":
        return list(_timm().list_models())
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def check_name(name: str) -> str:
    """``name`` if the library knows it; ConfigError with close matches if not."""
    kind, arch = split_name(name) or ("", "")
    if not arch:
        raise ConfigError(f"model name {name!r} lacks the architecture: use {kind}/<name>")
    names = known_names(kind)
    base = arch.split(".", 1)[0] if kind == "timm" else arch  # timm: arch.pretrained_tag
    if base not in names:
        hits = difflib.get_close_matches(base, names, n=5, cutoff=0.6)
        hint = f" (did you mean: {', '.join(f'{kind}/{h}' for h in hits)}?)" if hits else ""
        lister = (
            "timm.list_models('*pattern*')"
            if kind == "timm"
            else "torchvision.models.list_models()"
        )
        raise ConfigError(
            f"unknown {PREFIXES[kind]} model {arch!r}{hint}; {lister} lists the {len(names)} names"
        )
    return name


# --- weights ------------------------------------------------------------------------------
def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file, without running any code it may carry."""
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist; fix model.options.weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals, corrupt archives, bad headers
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise ModelError(
            f"cannot load weights file {path} safely ({reason}); it must be a .safetensors "
            "file or a state dict of tensors saved with torch.save"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):  # common wrappers, ours included
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"weights file {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in data.items()}


def load_weights(model: nn.Module, path: str | Path, head: str | None, what: str) -> None:
    """Load a local weights file into ``model``; a head of another class count is replaced.

    ``head`` is the classifier's module path (its parameters may differ in shape: the
    class count). Any other missing, extra or differently shaped parameter is a ModelError.
    """
    path = Path(path).expanduser()
    state = _read_state_dict(path)
    ours = model.state_dict()
    prefix = f"{head}." if head else None

    def is_head(key: str) -> bool:
        return prefix is not None and key.startswith(prefix)

    missing = [k for k in ours if k not in state and not is_head(k)]
    extra = [k for k in state if k not in ours and not is_head(k)]
    if missing or extra:
        first = (
            f"{len(missing)} parameters of {what} are missing (e.g. {missing[0]!r})"
            if missing
            else f"it has {len(extra)} parameters {what} lacks (e.g. {extra[0]!r})"
        )
        raise ModelError(
            f"weights file {path} is for another architecture: {first}; use weights of the "
            "same model"
        )
    for key, value in state.items():
        if not is_head(key) and tuple(value.shape) != tuple(ours[key].shape):
            raise ModelError(
                f"weights file {path} is for another architecture: {key!r} has shape "
                f"{tuple(value.shape)} there and {tuple(ours[key].shape)} in {what}"
            )
    head_keys = [k for k in ours if is_head(k)]
    fits = all(k in state and state[k].shape == ours[k].shape for k in head_keys)
    if not fits:
        found = [tuple(state[k].shape) for k in head_keys if k in state]
        warnings.warn(
            f"{what}: the classifier in {path} has shape {found[0] if found else 'none'}, this "
            f"run's {tuple(ours[head_keys[0]].shape)} (another class count): the backbone is "
            "loaded, the classifier starts fresh",
            UserWarning,
            stacklevel=2,
        )
        state = {k: v for k, v in state.items() if not is_head(k)}
    model.load_state_dict(state, strict=fits)


def _pretrained_error(name: str, exc: BaseException) -> ModelError:
    reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:240]
    return ModelError(
        f"cannot get the pretrained weights of {name} ({reason}); they are downloaded by the "
        "library when online; offline, put the weights file on this machine and set "
        "model.options.pretrained: PATH (.safetensors or a torch state dict)"
    )


# --- building -----------------------------------------------------------------------------
def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Give the first Conv2d ``in_channels`` inputs (pretrained RGB filters averaged)."""
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            if conv.in_channels == in_channels:
                return
            new = nn.Conv2d(
                in_channels, conv.out_channels, conv.kernel_size, conv.stride,  # type: ignore[arg-type]
                conv.padding, conv.dilation, conv.groups, conv.bias is not None,  # type: ignore[arg-type]
            )  # fmt: skip
            with torch.no_grad():
                mean = conv.weight.mean(dim=1, keepdim=True)
                new.weight.copy_(mean.repeat(1, in_channels, 1, 1) * (3 / in_channels))
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)  # type: ignore[union-attr]
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, new)
            return


def _replace_head(model: nn.Module, path: str, num_classes: int) -> None:
    old = model.get_submodule(path)
    assert isinstance(old, nn.Linear)
    parent_name, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, nn.Linear(old.in_features, num_classes))


def _build_timm(arch: str, num_classes: int, in_channels: int, pretrained: bool, kw: dict):
    timm = _timm()
    try:
        return timm.create_model(
            arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, **kw
        )
    except TypeError as exc:
        raise ConfigError(f"model timm/{arch}: {exc}; check model.options") from None
    except Exception as exc:
        if pretrained:
            raise _pretrained_error(f"timm/{arch}", exc) from None
        raise


def _build_tv(arch: str, num_classes: int, in_channels: int, pretrained: bool, kw: dict):
    from torchvision.models import get_model

    try:
        if pretrained:
            try:
                model = get_model(arch, weights="DEFAULT", **kw)
            except Exception as exc:
                raise _pretrained_error(f"tv/{arch}", exc) from None
        else:
            model = get_model(arch, weights=None, num_classes=num_classes, **kw)
    except TypeError as exc:
        raise ConfigError(f"model tv/{arch}: {exc}; check model.options") from None
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


# --- taps ---------------------------------------------------------------------------------
def _trace(model: nn.Module, in_channels: int, size: tuple[int, int]) -> list[tuple]:
    """``(name, module, input shape, output shape)`` in completion order for one dummy image."""
    records: list[tuple] = []
    hooks = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod: nn.Module, args: Any, out: Any, name: str = name) -> None:
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            shape_in = tuple(first.shape) if first is not None else None
            shape_out = tuple(out.shape) if isinstance(out, torch.Tensor) else None
            records.append((name, mod, shape_in, shape_out))

        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    param = next(model.parameters(), None)
    x = torch.zeros(1, in_channels, *size, device=param.device if param is not None else "cpu")
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return records


def _traced(model: nn.Module, in_channels: int, size: tuple[int, int]) -> tuple[list, int]:
    """:func:`_trace` at 64×64 (cheap) or, for models that need it, at ``size``."""
    try:
        return _trace(model, in_channels, (64, 64)), 64
    except Exception:  # e.g. a ViT with a fixed input size
        return _trace(model, in_channels, size), size[0]


def find_taps(
    model: nn.Module, num_classes: int, in_channels: int, size: tuple[int, int], stages=None
) -> tuple[dict[str, str], str | None]:
    """``(taps, classifier path)`` of a library model, from one traced forward pass.

    ``stages``: module paths of the stages (timm's feature_info) instead of the resolution
    rule (at each spatial size below the stem, the outermost module that finishes last).
    Only stages with B×C×H×W outputs count; fewer than 2 give no stage taps.
    """
    records, side = _traced(model, in_channels, size)
    linears = [
        i
        for i, (_, m, _, _) in enumerate(records)
        if isinstance(m, nn.Linear) and m.out_features == num_classes
    ]
    head_at = linears[-1] if linears else len(records)
    head = records[head_at][0] if linears else None
    before = records[:head_at]
    maps = {n: o for n, _, _, o in before if o is not None and len(o) == 4 and o[2] > 1}
    if stages is None:
        levels: dict[int, tuple[int, str]] = {}
        for name, out in maps.items():
            depth = name.count(".")
            if out[2] <= side // 4 and (out[2] not in levels or depth <= levels[out[2]][0]):
                levels[out[2]] = (depth, name)
        stages = [levels[h][1] for h in sorted(levels, reverse=True)]
    stages = [s for s in stages if s in maps]
    taps: dict[str, str] = {}
    if len(stages) >= 2:
        taps.update({f"stage{i}": s for i, s in enumerate(stages, 1)})
    pools = [
        n
        for n, m, i, o in before
        if i is not None and len(i) == 4 and o is not None and o[-1] == 1
        and (isinstance(m, _POOLS) or "pool" in type(m).__name__.lower())
    ]  # fmt: skip
    if pools:
        taps["features"] = f"{pools[-1]}:input"
    elif len(stages) >= 2:
        taps["features"] = stages[-1]
    if head is not None:
        taps["pooled"] = f"{head}:input"
    return taps, head


_TAPPED: dict[type, type] = {}


def _tapped_class(base: type) -> type:
    """``base`` plus a ``classifier`` property (no new submodule: state-dict keys unchanged)."""
    if base not in _TAPPED:

        def classifier(self: nn.Module) -> nn.Module:
            module = self
            for part in self.selfkd_classifier_path.split("."):
                module = module._modules[part]  # type: ignore[assignment]
            return module

        _TAPPED[base] = type(
            base.__name__,
            (base,),
            {
                "classifier": property(classifier, doc="The final nn.Linear (selfkd)."),
                "__module__": base.__module__,
                "__qualname__": base.__qualname__,
            },
        )
    return _TAPPED[base]


def _check_taps(model: nn.Module, taps: Any, name: str) -> dict[str, str]:
    if not isinstance(taps, dict) or not all(isinstance(v, str) for v in taps.values()):
        raise ConfigError(
            f"model {name}: model.options.taps must map tap names to module paths, e.g. "
            "{stage2: layer2, features: 'global_pool:input'}"
        )
    for tap, spec in taps.items():
        path = spec.partition(":")[0]
        try:
            model.get_submodule(path)
        except AttributeError:
            children = ", ".join(n for n, _ in model.named_children())
            raise ConfigError(
                f"model {name}: model.options.taps.{tap} = {spec!r} names no module; top-level "
                f"modules: {children}"
            ) from None
    return {str(k): v for k, v in taps.items()}


def build_external(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    *,
    pretrained: bool | str = False,
    weights: str | None = None,
    taps: dict[str, str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``timm/<arch>`` or ``tv/<arch>`` with feature taps and a ``classifier``."""
    check_name(name)
    kind, arch = split_name(name)  # type: ignore[misc]
    if isinstance(pretrained, str):
        weights, pretrained = pretrained, False
    if not isinstance(pretrained, bool):
        raise ConfigError(f"model.options.pretrained must be true, false or a path: {pretrained!r}")
    if weights is not None and not isinstance(weights, str):
        raise ConfigError(f"model.options.weights must be a file path, got {weights!r}")
    build: Callable[..., nn.Module] = _build_timm if kind == "timm" else _build_tv
    model = build(arch, num_classes, in_channels, pretrained, kwargs)

    size: tuple[int, int] = (224, 224)
    stages = None
    head = None
    if kind == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if len(cfg.get("input_size", ())) == 3:
            size = tuple(cfg["input_size"][1:])  # type: ignore[assignment]
        info = getattr(model, "feature_info", None)
        if isinstance(info, list) and info and all("module" in i for i in info):
            deep = [i["module"] for i in info if i.get("reduction", 4) >= 4]
            stages = deep if len(deep) >= 2 else [i["module"] for i in info]
    found, head = find_taps(model, num_classes, in_channels, size, stages)
    if kind == "tv" and pretrained and head is None:
        # torchvision's weights fix 1000 classes: find that head, then give it num_classes
        _, head_1000 = find_taps(model, 1000, in_channels, size)
        if head_1000 is not None and num_classes != 1000:
            _replace_head(model, head_1000, num_classes)
            warnings.warn(
                f"model {name}: pretrained with 1000 classes; the classifier is new for "
                f"{num_classes} classes",
                UserWarning,
                stacklevel=2,
            )
        found, head = find_taps(model, num_classes, in_channels, size)
    if weights is not None:
        load_weights(model, weights, head, f"model {name}")
    taps_out = {**found, **_check_taps(model, taps or {}, name)}
    has_own = "classifier" in model._modules or hasattr(type(model), "classifier")
    if head is not None and not has_own:
        # e.g. timm/torchvision ResNets (fc): expose it as model.classifier (ZF-LS uses it);
        # a model whose own `classifier` is a Sequential head keeps it (no linear head to vote)
        model.selfkd_classifier_path = head
        model.__class__ = _tapped_class(type(model))
    model.taps = taps_out
    return model
