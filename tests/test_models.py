"""Embedding models on real photos: reference preprocessing, ONNX parity, loading paths, errors."""

from __future__ import annotations

import functools
import importlib.util
import io
import logging
import math
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.models import preprocess, registry, runtime

DATA = Path(__file__).parents[1].parent / "shared" / "data"
IMAGENET = DATA / "imagenet-dev"
UKBENCH = DATA / "nd-ukbench"
SMALL_CLIP = "ViT-S-32-alt"  # a small built-in open_clip architecture (256-d), random init in tmp

pytestmark = pytest.mark.skipif(not IMAGENET.is_dir(), reason=f"real photos missing: {IMAGENET}")


def photos(n: int, step: int = 1) -> list[Image.Image]:
    out = []
    for path in sorted(IMAGENET.glob("*.JPEG"))[: n * step : step]:
        with Image.open(path) as im:
            im.load()
            out.append(im)
    return out


@functools.cache
def format_zoo() -> list[Image.Image]:
    """Real photos in many formats, modes (RGB, L, P, RGBA) and sizes; unreadable ones left out."""
    out = []
    for path in sorted(p for p in UKBENCH.rglob("*") if p.is_file()):
        try:
            with Image.open(path) as im:
                im.load()
                out.append(im)
        except OSError:
            continue  # the set's deliberately corrupt/truncated files
    return out


@pytest.fixture(scope="module")
def effnet() -> registry.ModelSpec:
    return registry.resolve_model(registry.EFFNET)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def effnet_onnx(effnet: registry.ModelSpec, onnx_dir: Path) -> runtime.Embedder:
    return runtime.get_embedder(effnet, backend="onnx", cache_dir=onnx_dir, threads=2,
                               verify_images=photos(6, 40))


@pytest.fixture(scope="module")
def effnet_torch(effnet: registry.ModelSpec) -> runtime.Embedder:
    return runtime.get_embedder(effnet, backend="torch", threads=2)


@pytest.fixture(scope="module")
def small_clip_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lookalike.models.torch_compat import ensure_torchvision

    ensure_torchvision()
    import open_clip
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / f"{SMALL_CLIP}-random.pt"
    torch.save(open_clip.create_model(SMALL_CLIP).state_dict(), path)
    return path


# ----------------------------------------------------------------------------- model resolution


def test_effnet_spec(effnet: registry.ModelSpec) -> None:
    # The package names its file by the sha256 prefix too, so the version is the content hash.
    assert effnet.model_ver == "effnet-lite0@imagenet-57934424"
    assert (effnet.dim, effnet.supports_text, effnet.preprocess.size) == (1280, False, (224, 224))
    assert pickle.loads(pickle.dumps(effnet)) == effnet  # the driver ships specs to executors


def test_unknown_model_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"effnet-lite0.*clip-vit-b32.*open_clip:ARCH"):
        registry.resolve_model("resnet50")


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


def test_missing_clip_weights_say_how_to_provide_them(empty_hf_cache: Path) -> None:
    with pytest.raises(registry.WeightsNotFoundError) as err:
        registry.resolve_model(registry.CLIP_B32)
    text = str(err.value)
    for hint in (str(empty_hf_cache), "hf download", "embed.clip_checkpoint", '"effnet-lite0"'):
        assert hint in text
    with pytest.raises(registry.WeightsNotFoundError, match=r"nope\.safetensors does not exist"):
        registry.resolve_model(registry.CLIP_B32, clip_checkpoint=str(empty_hf_cache / "nope.safetensors"))


def test_auto_falls_back_to_effnet_with_one_info_line(empty_hf_cache: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lookalike.models"):
        spec = registry.resolve_model("auto", clip_checkpoint="")
    assert spec.name == registry.EFFNET
    lines = [r.getMessage() for r in caplog.records if r.name == "lookalike.models.registry"]
    assert len(lines) == 1 and "effnet-lite0" in lines[0] and "no CLIP ViT-B-32 weights" in lines[0]
    # A configured checkpoint that does not exist is an error, not a silent switch of model.
    with pytest.raises(registry.WeightsNotFoundError):
        registry.resolve_model("auto", clip_checkpoint=str(empty_hf_cache / "missing.pt"))


def test_auto_picks_clip_from_the_hf_cache(empty_hf_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An HF cache laid out as huggingface_hub writes it: blobs named by sha256, snapshot symlinks."""
    import hashlib

    _, repo, _ = registry.CLIP_B32_SOURCES[1]  # the OpenAI weights (QuickGELU)
    content = b"stand-in for open_clip_model.safetensors"
    sha = hashlib.sha256(content).hexdigest()
    root = empty_hf_cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "blobs" / sha).write_bytes(content)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)
    snapshot = root / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").symlink_to(root / "blobs" / sha)
    with caplog.at_level(logging.INFO, logger="lookalike.models"):
        spec = registry.resolve_model("auto")
    assert (spec.name, spec.quick_gelu) == (registry.CLIP_B32, True)
    assert spec.model_ver == f"clip-vit-b32@openai-{sha[:8]}"  # the blob name is the content hash
    assert spec.checkpoint.endswith("open_clip_model.safetensors")  # open_clip picks the loader by suffix
    assert "CLIP ViT-B-32 weights found" in caplog.text


def test_clip_b32_sources_match_open_clip(small_clip_ckpt: Path) -> None:
    import open_clip

    for tag, repo, quick_gelu in registry.CLIP_B32_SOURCES:
        cfg = open_clip.get_pretrained_cfg("ViT-B-32", tag)
        assert cfg["hf_hub"].rstrip("/") == repo
        assert bool(cfg.get("quick_gelu", False)) == quick_gelu


def test_auto_picks_clip_when_its_checkpoint_is_given(tmp_path: Path) -> None:
    ckpt = tmp_path / "clip.safetensors"
    ckpt.write_bytes(b"weights")  # resolution only hashes the file; loading is tested below
    spec = registry.resolve_model("auto", clip_checkpoint=str(ckpt))
    assert (spec.name, spec.arch, spec.dim, spec.supports_text) == (registry.CLIP_B32, "ViT-B-32", 512, True)
    assert spec.model_ver.startswith("clip-vit-b32@ckpt-")
    ckpt.write_bytes(b"other weights")
    assert registry.resolve_model("auto", clip_checkpoint=str(ckpt)).model_ver != spec.model_ver


# ----------------------------------------------------------------------------- preprocessing


def _tf_legacy_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Reference: tf.compat.v1.image.resize_bicubic (align_corners=False, half_pixel_centers=False)
    as a dense matrix: source x = i * n_in / n_out, Keys cubic a=-0.75 on the 4 neighbours,
    indices clamped to the edge, exact kernel values (TF tabulates them in 1/1024 steps)."""
    def kernel(d: float, a: float = -0.75) -> float:
        if d <= 1:
            return ((a + 2) * d - (a + 3)) * d * d + 1
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = i * n_in / n_out
        x0 = math.floor(x)
        for k in range(-1, 3):
            m[i, min(max(x0 + k, 0), n_in - 1)] += kernel(abs(x - (x0 + k)))
    return m


def _tf_efficientnet_reference(image: Image.Image) -> np.ndarray:
    """tensorflow/tpu efficientnet preprocess_for_eval + lite mean/std, written out independently."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w = rgb.shape[:2]
    crop = int(224 / (224 + 32) * min(h, w))
    top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
    rgb = rgb[top : top + crop, left : left + crop]
    my, mx = _tf_legacy_bicubic_matrix(crop, 224), _tf_legacy_bicubic_matrix(crop, 224)
    resized = np.stack([my @ rgb[:, :, c] @ mx.T for c in range(3)])
    return ((resized - 127.0) / 128.0).astype(np.float32)


def test_effnet_preprocessing_matches_tf_reference(effnet_onnx: runtime.Embedder) -> None:
    images = photos(4, 97) + format_zoo()[::6]
    ours = effnet_onnx.preprocess(images)
    ref = np.stack([_tf_efficientnet_reference(im) for im in images])
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 5e-3  # the kernel table's 1/1024 steps: < 0.7 grey levels
    cos = (effnet_onnx.embed_pixels(ours) * effnet_onnx.embed_pixels(ref)).sum(1)
    assert cos.min() >= 0.9999


def test_effnet_reference_transform_classifies_imagenet(effnet: registry.ModelSpec) -> None:
    """The transform is the one the weights were trained with: ImageNet top-1 on real photos."""
    import torch

    timm_dir = Path(importlib.util.find_spec("timm").origin).parent  # ships the ImageNet class order
    wnids = (timm_dir / "data" / "_info" / "imagenet_synsets.txt").read_text().split()
    class_of = {wnid: i for i, wnid in enumerate(wnids)}
    paths = sorted(IMAGENET.glob("*.JPEG"))[::16]  # 32 classes
    image_module, _ = runtime.load_torch_model(effnet, threads=2)
    state = torch.load(effnet.checkpoint, map_location="cpu", weights_only=True)
    pixels = np.stack([preprocess.preprocess_image(Image.open(p), effnet.preprocess) for p in paths])
    with torch.inference_mode():
        pooled, head_logits = image_module(torch.from_numpy(pixels))  # one forward: features and logits
        logits = pooled @ state["_fc.weight"].T + state["_fc.bias"]
    assert (head_logits - logits).abs().max().item() < 1e-4  # the head is the checkpoint's _fc, exactly
    truth = torch.tensor([class_of[p.name.split("_")[0]] for p in paths])
    assert (logits.argmax(1) == truth).float().mean().item() >= 0.8  # 89% on all 500


@pytest.mark.parametrize(("size", "resize_mode", "interpolation"), [
    ((224, 224), "shortest", "bicubic"),
    ((224, 192), "shortest", "bilinear"),
    ((224, 224), "longest", "bicubic"),
    ((240, 240), "squash", "bilinear"),
])
def test_open_clip_preprocessing_is_bit_identical(size: tuple[int, int], resize_mode: str,
                                                   interpolation: str) -> None:
    from lookalike.models.torch_compat import ensure_torchvision

    ensure_torchvision()
    import open_clip

    pp = registry.Preprocess("open_clip", size, registry.OPENAI_MEAN, registry.OPENAI_STD, interpolation,
                           resize_mode, fill_color=7)
    reference = open_clip.image_transform(size, is_train=False, mean=pp.mean, std=pp.std,
                                          resize_mode=resize_mode, interpolation=interpolation, fill_color=7)
    for image in photos(3, 150) + format_zoo():
        assert np.array_equal(preprocess.preprocess_image(image, pp), reference(image).numpy()), image


# ----------------------------------------------------------------------------- embedders


def test_get_embedder_loads_once(effnet: registry.ModelSpec, effnet_onnx: runtime.Embedder,
                                 onnx_dir: Path) -> None:
    assert runtime.get_embedder(effnet, backend="onnx", cache_dir=onnx_dir, threads=2) is effnet_onnx
    assert runtime.get_embedder(effnet, backend="auto", cache_dir=onnx_dir, threads=2) is effnet_onnx
    single = runtime.get_embedder(effnet, backend="onnx", cache_dir=onnx_dir, threads=1)
    assert single is not effnet_onnx and single.threads == 1


def test_onnx_matches_torch(effnet: registry.ModelSpec, effnet_onnx: runtime.Embedder,
                            effnet_torch: runtime.Embedder, onnx_dir: Path) -> None:
    import onnx

    images = photos(5, 33)  # batch 5 while the export was traced at batch 2: dynamic batch axis
    a, b = effnet_torch.embed_images(images), effnet_onnx.embed_images(images)
    assert a.shape == b.shape == (5, 1280) and a.dtype == b.dtype == np.float32
    assert np.allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)
    assert np.abs(a - b).max() < 1e-4
    meta = {p.key: p.value for p in onnx.load(runtime.onnx_path(effnet, onnx_dir)).metadata_props}
    assert meta["model_ver"] == effnet.model_ver and float(meta["verified_max_abs_diff"]) < 1e-4


def test_onnx_embedder_does_not_import_torch(effnet_onnx: runtime.Embedder, onnx_dir: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        from PIL import Image
        from lookalike.models import registry
        from lookalike.models import runtime
        from lookalike.models import preprocess
        spec = registry.resolve_model("effnet-lite0")
        embedder = runtime.get_embedder(spec, backend="auto", cache_dir={str(onnx_dir)!r}, threads=1)
        vectors = embedder.embed_images([Image.open({str(sorted(IMAGENET.glob("*.JPEG"))[0])!r})])
        assert embedder.backend == "onnx" and vectors.shape == (1, 1280)
        print(sorted(m for m in ("torch", "torchvision", "open_clip") if m in sys.modules))
    """)
    lib = str(Path(registry.__file__).parents[2])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": lib})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_resized_copy_is_far_closer_than_unrelated_photos(effnet_onnx: runtime.Embedder) -> None:
    originals = [im.convert("RGB") for im in photos(8, 60)]
    copies = []
    for im in originals:
        buf = io.BytesIO()
        im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=70)
        copies.append(Image.open(io.BytesIO(buf.getvalue())))
    a, b = effnet_onnx.embed_images(originals), effnet_onnx.embed_images(copies)
    to_copy = (a * b).sum(1)
    unrelated = a @ a.T
    np.fill_diagonal(unrelated, -1)
    assert to_copy.min() > 0.7
    assert (to_copy - unrelated.max(1)).min() > 0.3


def test_image_only_model_has_no_text(effnet_onnx: runtime.Embedder) -> None:
    with pytest.raises(ValueError, match=r"no text tower.*clip-vit-b32"):
        effnet_onnx.embed_text(["a dog on a beach"])


def test_torchvision_imports_after_compat_shim() -> None:
    code = textwrap.dedent("""
        from lookalike.models.torch_compat import ensure_torchvision
        ensure_torchvision()
        ensure_torchvision()
        import torch, torchvision
        from torchvision.transforms import functional
        print(torch.ops.torchvision.nms.default._schema)
    """)
    lib = str(Path(registry.__file__).parents[2])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": lib})
    assert done.returncode == 0, done.stderr
    assert "torchvision::nms" in done.stdout


# ----------------------------------------------------------------------------- open_clip checkpoints


def test_open_clip_local_checkpoint(small_clip_ckpt: Path, tmp_path: Path) -> None:
    import open_clip
    import torch

    spec = registry.resolve_model(f"open_clip:{SMALL_CLIP}:{small_clip_ckpt}")
    assert (spec.name, spec.dim, spec.supports_text) == (f"open_clip:{SMALL_CLIP}", 256, True)
    assert spec.model_ver.startswith(f"open_clip:{SMALL_CLIP}@ckpt-")
    torch_embedder = runtime.get_embedder(spec, backend="torch", threads=2)
    images, texts = photos(3, 111), ["a photo of a dog", "a red car", ""]
    # The ONNX export of a transformer tower (attention) is verified at export on these photos.
    onnx_embedder = runtime.get_embedder(spec, backend="onnx", cache_dir=tmp_path, threads=2,
                                        verify_images=images)

    # Reference: open_clip's own model, preprocess and tokenizer for that checkpoint.
    model, _, preprocess = open_clip.create_model_and_transforms(SMALL_CLIP, pretrained=str(small_clip_ckpt))
    pixels = torch.stack([preprocess(im) for im in images])
    with torch.inference_mode():
        ref_images = model.encode_image(pixels, normalize=True).numpy()
        ref_texts = model.encode_text(open_clip.get_tokenizer(SMALL_CLIP)(texts), normalize=True).numpy()
    assert np.array_equal(onnx_embedder.preprocess(images), pixels.numpy())
    assert np.abs(torch_embedder.embed_images(images) - ref_images).max() < 1e-5
    assert np.abs(onnx_embedder.embed_images(images) - ref_images).max() < 1e-4
    text_vectors = onnx_embedder.embed_text(texts)
    assert text_vectors.shape == (3, 256) and np.abs(text_vectors - ref_texts).max() < 1e-5


def test_corrupt_or_mismatched_checkpoint_names_the_file(small_clip_ckpt: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00not a checkpoint" * 64)
    spec = registry.resolve_model(registry.CLIP_B32, clip_checkpoint=str(broken))
    with pytest.raises(registry.CheckpointError, match=f"cannot load {broken} as open_clip ViT-B-32"):
        runtime.get_embedder(spec, backend="torch")
    other_arch = registry.resolve_model(f"open_clip:ViT-S-32:{small_clip_ckpt}")  # 384-d arch, 256-d weights
    with pytest.raises(registry.CheckpointError,
                       match=f"cannot load {small_clip_ckpt} as open_clip ViT-S-32"):
        runtime.get_embedder(other_arch, backend="torch")


# ----------------------------------------------------------------------------- labels


def test_onnx_export_carries_features_and_logits(effnet: registry.ModelSpec, effnet_onnx: runtime.Embedder,
                                                 effnet_torch: runtime.Embedder, onnx_dir: Path) -> None:
    """One graph, two outputs: the ONNX and torch backends give the same vectors and the same labels."""
    import onnx

    model = onnx.load(runtime.onnx_path(effnet, onnx_dir))
    assert [o.name for o in model.graph.output] == ["features", "logits"]
    assert {p.key: p.value for p in model.metadata_props}["outputs"] == "features,logits"
    assert runtime.export_is_current(effnet, onnx_dir)
    images = photos(12, 41)  # not a multiple of the batch: the last batch is short
    a, b = effnet_torch.label_images(images), effnet_onnx.label_images(images)
    assert b.labels.shape == b.scores.shape == (12, 5)
    assert b.labels.dtype == np.int16 and b.scores.dtype == np.float32
    assert np.abs(a.vectors - b.vectors).max() < 1e-4
    assert np.array_equal(a.labels[:, 0], b.labels[:, 0]) and np.abs(a.scores - b.scores).max() < 1e-4
    assert np.all(np.diff(b.scores, axis=1) <= 0) and np.all(b.scores.sum(1) <= 1 + 1e-5)
    # The vectors are those of embed_pixels: labels change nothing about them.
    assert np.array_equal(b.vectors, effnet_onnx.embed_images(images))
    # The labels are the checkpoint's classifier: its own ImageNet class of most of these photos.
    wnids = [p.name.split("_")[0] for p in sorted(IMAGENET.glob("*.JPEG"))[: 12 * 41 : 41]]
    from lookalike.labels import load

    right = [load().wnids[i] == w for i, w in zip(b.labels[:, 0], wnids, strict=True)]
    assert sum(right) >= 9, right
    empty = effnet_onnx.embed_labelled(effnet_onnx.preprocess([]))
    assert empty.vectors.shape == (0, 1280) and empty.labels.shape == (0, 5)


def test_features_only_export_is_exported_again(effnet: registry.ModelSpec, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """An export made before labels (features only, same model_ver, same file name) is not reused."""
    import onnx

    from lookalike.models.onnx_export import export_image_model

    wrapped, _ = runtime.load_torch_model(effnet, threads=2)
    pixels = np.stack([preprocess.preprocess_image(im, effnet.preprocess) for im in photos(4, 50)])
    path = runtime.onnx_path(effnet, tmp_path)
    export_image_model(wrapped.body, path, pixels, metadata={"model_ver": effnet.model_ver}, atol=1e-4)
    assert [o.name for o in onnx.load(path).graph.output] == ["features"]
    assert not runtime.export_is_current(effnet, tmp_path)  # what the driver's ensure_export checks
    with caplog.at_level(logging.INFO, logger="lookalike.models"):
        embedder = runtime.get_embedder(effnet, backend="onnx", cache_dir=tmp_path, threads=2,
                                        verify_images=photos(4, 50))
    assert "exported before labels" in caplog.text
    assert [o.name for o in onnx.load(path).graph.output] == ["features", "logits"]
    assert runtime.export_is_current(effnet, tmp_path)
    assert embedder.has_labels() and embedder.label_images(photos(2, 7)).labels.shape == (2, 5)


def test_clip_zero_shot_labels(small_clip_ckpt: Path, tmp_path: Path) -> None:
    """A CLIP model labels zero-shot: softmax(100 * cosine) against 'a photo of a {name}' text vectors
    of the same 1000 classes, made once per model_ver and kept beside the ONNX export."""
    import open_clip
    import torch

    from lookalike.labels import load

    spec = registry.resolve_model(f"open_clip:{SMALL_CLIP}:{small_clip_ckpt}")
    cache = tmp_path / "models"
    assert runtime.ensure_labels(spec, cache, threads=2)  # the driver's step
    text_file = runtime.label_text_path(spec, cache)
    assert text_file.parent == cache and text_file.name.startswith(spec.model_ver.replace(":", "_"))
    text = np.load(text_file)
    assert text.shape == (1000, spec.dim) and np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)
    mtime = text_file.stat().st_mtime_ns

    images = photos(5, 97)
    onnx_embedder = runtime.get_embedder(spec, backend="onnx", cache_dir=cache, threads=2,
                                        verify_images=images)
    torch_embedder = runtime.get_embedder(spec, backend="torch", cache_dir=cache, threads=2)
    a, b = torch_embedder.label_images(images), onnx_embedder.label_images(images)
    assert text_file.stat().st_mtime_ns == mtime  # read from the cache, not computed again
    assert b.labels.shape == b.scores.shape == (5, 5) and b.labels.dtype == np.int16
    assert np.array_equal(a.labels[:, 0], b.labels[:, 0]) and np.abs(a.scores - b.scores).max() < 1e-3

    # Reference: open_clip's own model, tokenizer and zero-shot recipe.
    model = open_clip.create_model(SMALL_CLIP, pretrained=str(small_clip_ckpt)).eval()
    h = load()
    prompts = [f"a photo of a {h.node_lemmas[wnid][0]}" for wnid in h.wnids]  # the plain lemma: 'crane'
    with torch.inference_mode():
        ref_text = model.encode_text(open_clip.get_tokenizer(SMALL_CLIP)(prompts), normalize=True).numpy()
        ref_images = model.encode_image(torch.from_numpy(torch_embedder.preprocess(images)),
                                        normalize=True).numpy()
    assert np.abs(text - ref_text).max() < 1e-5
    logits = 100 * ref_images @ ref_text.T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert np.array_equal(a.labels[:, 0], probs.argmax(1))
    assert np.abs(np.take_along_axis(probs, a.labels.astype(int), 1) - a.scores).max() < 1e-4


def test_clip_without_a_text_tower_gives_no_labels_said_once(small_clip_ckpt: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses

    spec = dataclasses.replace(registry.resolve_model(f"open_clip:{SMALL_CLIP}:{small_clip_ckpt}"),
                               model_ver="open_clip:test@no-text-tower")

    def no_tokenizer(*args: object) -> None:
        raise OSError("tokenizer files not found offline")

    monkeypatch.setattr(runtime, "_torch_text_encoder", no_tokenizer)
    stub = runtime.Embedder(spec, "stub", lambda px, logits: (np.ones((len(px), spec.dim)), None), threads=1,
                            batch_size=4, cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="lookalike.models"):
        assert not runtime.ensure_labels(spec, tmp_path)
        assert not stub.has_labels() and not stub.has_labels()
    lines = [r.getMessage() for r in caplog.records if "no labels" in r.getMessage()]
    assert len(lines) == 1 and "tokenizer files not found offline" in lines[0]
    assert not runtime.label_text_path(spec, tmp_path).exists()
    with pytest.raises(ValueError, match="gives no labels"):
        stub.embed_labelled(np.zeros((1, 3, 224, 224), np.float32))
    assert stub.embed_pixels(np.zeros((1, 3, 224, 224), np.float32)).shape == (1, spec.dim)
