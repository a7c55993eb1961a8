"""Start from weights the user already has: a checkpoint file, or cached pretrained weights.

Why: pruning is usually applied to a trained model, so a run can begin from the user's own
state dict (:func:`load_init_weights`) or from ImageNet weights (:func:`load_pretrained`).
Nothing here downloads: pretrained weights are read from the torch hub cache (torchvision) or
the Hugging Face cache (timm), and a missing file is reported with the exact path to fill.
"""

from __future__ import annotations

import math
import os
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from ..core.errors import CheckpointError
from ..core.structure import AUX_HEADS
from .models import TIMM_PREFIX, TORCHVISION_PREFIX, shadows_torchvision

__all__ = [
    "STATE_DICT_KEYS",
    "describe_state_dict_mismatch",
    "load_init_weights",
    "load_pretrained",
    "read_state_dict",
    "torchvision_cache_path",
]

#: where training scripts (timm, Lightning, torchvision references, DeiT...) keep the weights
STATE_DICT_KEYS = (
    "state_dict",
    "model",
    "model_state_dict",
    "state_dict_ema",
    "ema",
    "module",
    "net",
    "weights",
)
_WRAPPERS = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile
_SHOWN = 10  # keys listed per kind of mismatch


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def describe_state_dict_mismatch(
    checkpoint: Mapping[str, Any], model_state: Mapping[str, Any]
) -> str | None:
    """None if ``checkpoint`` fits ``model_state`` key for key and shape for shape, else a
    readable list of the missing, unexpected and mis-shaped keys (10 of each, with counts).

    Missing BatchNorm ``num_batches_tracked`` counters are not a mismatch (old checkpoints lack
    them and they do not affect the outputs).
    """
    missing = [
        k for k in model_state if k not in checkpoint and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in checkpoint if k not in model_state]
    shaped = []
    for key, value in checkpoint.items():
        want = getattr(model_state.get(key), "shape", None)
        have = getattr(value, "shape", None)
        if key in model_state and want is not None and have != want:
            shaped.append(f"{key}: checkpoint {tuple(have or ())} vs model {tuple(want)}")
    parts = [
        f"{len(keys)} {kind} key(s): {_listing(keys)}"
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped))
        if keys
    ]
    return "; ".join(parts) or None


# --------------------------------------------------------------------------- reading files


def _why(exc: BaseException) -> str:
    """The first line of an exception's message (torch's run to paragraphs), or its type."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True; weights_only=False only for pickled Python objects.

    A whole pickled ``nn.Module`` (or a checkpoint that also holds e.g. an argparse Namespace)
    can only be read by running its pickle, which can execute code: pass files you trust.
    """
    corrupt = f"weights file {path} cannot be read"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc) and "Unsupported class" not in str(exc):
            raise CheckpointError(f"{corrupt}: the file is corrupt or not a PyTorch file") from exc
    except Exception as exc:  # zip, EOF, or unpickler errors (even IndexError) on a bad file
        raise CheckpointError(f"{corrupt} ({_why(exc)}); the file is corrupt or truncated") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ImportError) as exc:
        raise CheckpointError(
            f"{path} holds a pickled object whose class cannot be imported ({_why(exc)}); fix: "
            "make its module importable, or save model.state_dict() instead of the model"
        ) from exc
    except Exception as exc:  # any pickle failure: the file cannot be used
        raise CheckpointError(f"{corrupt} ({type(exc).__name__}: {_why(exc)})") from exc


def _as_state_dict(obj: Any) -> dict[str, Any] | None:
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if (
        isinstance(obj, Mapping)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        return dict(obj)
    return None


def read_state_dict(path: str | Path) -> tuple[dict[str, Any], str]:
    """(state dict, where it was found) from a ``.safetensors`` file or a ``torch.save`` file
    (``.pt``, ``.pth``, ``.bin``...) holding a state dict, a pickled module, or a checkpoint dict
    with the state dict under one of :data:`STATE_DICT_KEYS` (possibly nested once)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError as exc:
            raise CheckpointError(
                f"{path}: reading .safetensors needs the safetensors package "
                "(pip install safetensors)"
            ) from exc
        try:
            return load_file(str(path), device="cpu"), "safetensors"
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"weights file {path} cannot be read as safetensors ({_why(exc)}); the file is "
                "corrupt"
            ) from exc
    obj = _torch_load(path)
    found = _as_state_dict(obj)
    if found is not None:
        return found, "pickled module" if isinstance(obj, nn.Module) else "state dict"
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            found = _as_state_dict(inner)
            if found is not None:
                return found, key
            if isinstance(inner, Mapping):
                for key2 in STATE_DICT_KEYS:
                    found = _as_state_dict(inner.get(key2))
                    if found is not None:
                        return found, f"{key}/{key2}"
    keys = list(obj)[:20] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"{path} holds no state dict (found {keys}); expected tensors by name, a pickled "
        f"nn.Module, or a checkpoint dict with one under {', '.join(STATE_DICT_KEYS)}"
    )


def _strip(
    state: dict[str, Any], model_state: dict[str, Any]
) -> tuple[dict[str, Any], str, list[str]]:
    """``state`` with the key prefix that best matches ``model_state`` removed.

    Candidates: none; leading ``module.`` / ``_orig_mod.`` (DDP, torch.compile, in any order);
    each first component with the keys under it (Lightning's ``model.``, also beside other
    state such as a loss's buffers, a teacher or an EMA copy). One that fits exactly (every
    key, every shape) wins, else the one matching the most keys; ties go to the smallest
    change. Returns the state, the prefix and the other prefixes that fit exactly as well (an
    ambiguity: a model and its EMA copy both fit).
    """

    def unwrap(key: str) -> str:
        while key.startswith(_WRAPPERS):
            key = key.split(".", 1)[1]
        return key

    candidates = [("", state), ("module./_orig_mod.", {unwrap(k): v for k, v in state.items()})]
    for first in dict.fromkeys(k.split(".", 1)[0] for k in state if "." in k):
        inner = {k[len(first) + 1 :]: v for k, v in state.items() if k.startswith(first + ".")}
        candidates.append((first + ".", inner))

    def same(a: dict, b: dict) -> bool:  # the same tensors under the same names
        return a.keys() == b.keys() and all(a[k] is b[k] for k in a)

    ranked = [  # (fits exactly, model keys matched, prefix, state)
        (describe_state_dict_mismatch(c, model_state) is None, len(model_state.keys() & c.keys()),
         p, c) for p, c in candidates
    ]  # fmt: skip
    fits, _, prefix, best = max(ranked, key=lambda r: r[:2])  # the first on ties
    others = [p for fit, _, p, c in ranked if fits and fit and not same(c, best)]
    return best, prefix, others


def load_init_weights(
    model: nn.Module, path: str | Path, model_name: str | None = None,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Load the user's weights file into ``model``; every key and shape must match.

    Returns ``{"path", "source" (where in the file), "tensors", "stripped_prefix"}``; raises
    :class:`CheckpointError` naming the missing, unexpected and mis-shaped keys otherwise (and,
    for a ``model_name`` of ours that hides torchvision's, the name of torchvision's; the way
    to read grey images as RGB fits the run's ``dataset``: only image folders take --in-chans).
    """
    state, source = read_state_dict(path)
    model_state = model.state_dict()
    state, stripped, also = _strip(state, model_state)
    if also:
        raise CheckpointError(
            f"weights file {path} ({source}) holds more than one set of weights that fits the "
            f"model (under {', '.join(repr(p) for p in [stripped, *also])}); fix: save the one "
            "to start from on its own, e.g. torch.save(module.model.state_dict(), 'init.pt')"
        )
    problem = describe_state_dict_mismatch(state, model_state)
    if problem:
        also = ""
        if model_name is not None and shadows_torchvision(model_name):
            also = (f"; our {model_name!r} differs from torchvision's: for weights of "
                    f"torchvision's use --model {TORCHVISION_PREFIX}{model_name}")  # fmt: skip
        raise CheckpointError(
            f"weights file {path} ({source}) does not fit the model: {problem}; fix: build the "
            "model these weights were trained with (same model, num_classes, in_chans, "
            f"model_kwargs{_grey_as_rgb_hint(dataset)}{also})"
        )
    counters = {k: v for k, v in model_state.items() if k.endswith("num_batches_tracked")}
    model.load_state_dict({**counters, **state})
    return {"path": str(path), "source": source, "tensors": len(state), "stripped_prefix": stripped}


def _grey_as_rgb_hint(dataset: str | None) -> str:
    """How to feed weights trained on RGB copies of grey images: --in-chans exists for image
    folders only (the other data sets' channels are fixed, and they refuse it)."""
    from .data import DATASETS, FOLDER, dataset_spec

    if dataset == FOLDER:
        return "; for grey images read as RGB in training, --in-chans 3"
    if dataset is None or dataset not in DATASETS:
        return "; for grey images read as RGB in training, --dataset imagefolder --in-chans 3"
    if dataset_spec(dataset).in_chans != 1:
        return ""
    return (f"; {dataset!r} has fixed greyscale channels: for weights trained on its images "
            "read as RGB, save them as class folders and use --dataset imagefolder "
            "--in-chans 3")  # fmt: skip


# --------------------------------------------------------------------------- pretrained


def torchvision_cache_path(name: str) -> Path:
    """Where torchvision's DEFAULT weights of ``name`` live in the torch hub cache."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _timm_weights(model: nn.Module, cfg: Mapping[str, Any]) -> tuple[dict[str, Any], Path]:
    """timm's weights of ``model`` from the Hugging Face cache, through timm's own filter."""
    from huggingface_hub import constants, try_to_load_from_cache

    repo, _, revision = str(cfg["hf_hub_id"]).partition("@")
    cache = Path(constants.HF_HUB_CACHE)
    names = [cfg.get("hf_hub_filename") or "model.safetensors", "pytorch_model.bin"]
    for filename in names:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision or None)
        if isinstance(found, str):
            break
    else:
        folder = cache / f"models--{repo.replace('/', '--')}"
        raise CheckpointError(
            f"timm weights {repo} are not in the Hugging Face cache (nothing is downloaded): "
            f"expected {folder}/snapshots/<revision>/{names[0]} with {folder}/refs/main naming "
            f"the revision; fix: on a machine with internet run `hf download {repo} {names[0]}` "
            f"and copy its {folder.name} folder into {cache} (or set HF_HUB_CACHE)"
        )
    state, _ = read_state_dict(found)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:  # e.g. resamples a ViT's position embedding to the image size
        state = filter_fn(state, model)
    return state, Path(found)


def _fit_position_embedding(state: dict[str, Any], model: nn.Module) -> tuple[dict, list[str]]:
    """torchvision's ViT weights at the model's image size: their position embedding (made for
    224 px, 518 for vit_h_14) resampled to the model's patch grid with torchvision's own
    ``interpolate_embeddings`` (bicubic), as timm's filter does for its ViTs. Returns the
    state and the keys resampled."""
    from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

    key = "encoder.pos_embedding"
    if not isinstance(model, VisionTransformer) or key not in state:
        return state, []
    have, want = state[key].shape, model.encoder.pos_embedding.shape
    grid = math.isqrt(have[1] - 1) if len(have) == 3 and have[1] > 1 else 0
    if have == want or len(want) != 3 or have[::2] != want[::2] or grid**2 != have[1] - 1:
        return state, []  # the same, or not a resampling: the mismatch report names it
    return dict(interpolate_embeddings(model.image_size, model.patch_size, state)), [key]


def _names(value: Any) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value or ())


def load_pretrained(model_name: str, model: nn.Module) -> dict[str, Any]:
    """Load ImageNet weights into ``model`` (built by ``create_model(model_name, ...)``).

    torchvision models read ``torch.hub.get_dir()/checkpoints/<file of DEFAULT weights>``;
    timm models (the vision transformers) read the Hugging Face cache. When the data's
    num_classes or in_chans differ from the weights' (1000, 3), everything else is loaded and
    the classifier stays freshly initialised; a 1-channel stem gets the RGB kernels summed
    (what a grey image copied to RGB would see), other channel counts a fresh stem. A ViT
    built at another image size gets the position embedding resampled to its patch grid.
    Returns ``{"path", "tensors", "fresh" (keys left initialised), "adapted"}``.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("hf_hub_id"):
        state, path = _timm_weights(model, cfg)  # timm's filter resamples its embeddings
        stems, heads = _names(cfg.get("first_conv")), _names(cfg.get("classifier"))
        resampled = []
    else:
        name = model_name.removeprefix(TORCHVISION_PREFIX)
        if name not in torchvision.models.list_models(module=torchvision.models):
            what = ("timm names no Hugging Face weights for it" if
                    model_name.startswith(TIMM_PREFIX) else "--pretrained covers torchvision "
                    "classifiers and timm models with Hugging Face weights")  # fmt: skip
            raise CheckpointError(
                f"no pretrained weights known for model {model_name!r}: {what}; for your own "
                "weights use --init FILE"
            )
        path = torchvision_cache_path(name)
        if not path.is_file():
            url = torchvision.models.get_model_weights(name).DEFAULT.url
            raise CheckpointError(
                f"pretrained weights of {name} are not in the torch hub cache (nothing is "
                f"downloaded): expected {path}; fix: download {url} on a machine with internet "
                f"and copy it to {path} (or set TORCH_HOME)"
            )
        state, _ = read_state_dict(path)
        # the auxiliary classifiers of googlenet / inception_v3, which the zoo builds without
        children = dict(model.named_children())
        state = {k: v for k, v in state.items()
                 if k.split(".")[0] in children or k.split(".")[0] not in AUX_HEADS}  # fmt: skip
        state, resampled = _fit_position_embedding(state, model)
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        stems, heads = tuple(convs[:1]), tuple(linears[-1:])

    def under(key: str, names: tuple[str, ...]) -> bool:
        return any(key == n or key.startswith(n + ".") for n in names)

    def other_stem(value: torch.Tensor, target: torch.Tensor) -> bool:
        """Another kind of stem (kernel size, outputs), not the same one on other channels."""
        if value.ndim != target.ndim:
            return True
        return any(a != b for i, (a, b) in enumerate(zip(value.shape, target.shape, strict=True))
                   if i != 1)  # fmt: skip

    model_state = model.state_dict()
    loaded, fresh, adapted, misfit = {}, [], list(resampled), []
    for key, target in model_state.items():
        value = state.get(key)
        if value is not None and value.shape == target.shape:
            loaded[key] = value
        elif under(key, stems) or under(key, heads):
            grey = value is not None and value.ndim == 4 and target.shape[1] == 1
            if grey and under(key, stems) and value.shape[1] == 3 and key.endswith("weight"):
                loaded[key] = value.sum(1, keepdim=True)
                adapted.append(key)
            else:
                fresh.append(key)
            if value is not None and under(key, stems) and other_stem(value, target):
                misfit.append(f"{key}: weights {tuple(value.shape)} vs model "
                              f"{tuple(target.shape)}")  # fmt: skip
    edge = [k for k in {*state, *model_state} if under(k, stems) or under(k, heads)]
    problem = describe_state_dict_mismatch(
        {k: v for k, v in state.items() if k not in edge},
        {k: v for k, v in model_state.items() if k not in edge},
    )
    if misfit:  # only the input channels may differ: a fresh stem of another shape is not it
        stem = f"another stem ({', '.join(misfit)})"
        problem = f"{problem}; {stem}" if problem else stem
    if problem:
        hint = ""
        if shadows_torchvision(model_name):
            hint = (f" (ours differs from torchvision's; for that one use "
                    f"'{TORCHVISION_PREFIX}{model_name}')")  # fmt: skip
        raise CheckpointError(
            f"pretrained weights {path} do not fit model {model_name!r}{hint}: {problem}"
        )
    model.load_state_dict(loaded, strict=False)
    return {"path": str(path), "tensors": len(loaded), "fresh": fresh, "adapted": adapted}
