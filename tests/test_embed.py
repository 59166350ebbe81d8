"""The embed stage's worker side on real photos: exact preprocessing, batches, errors, labels, task sizing."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import IMAGENET, UKBENCH
from PIL import Image

from lookalike.db.load import _vector_rows, copy_embeddings
from lookalike.labels import classes_under
from lookalike.labels import load as label_hierarchy
from lookalike.models import preprocess, registry, runtime, tf_preprocess
from lookalike.stages import schemas
from lookalike.stages.embed import (
    EmbedSettings,
    embed_batches,
    embed_tasks,
    embeddings_table,
    read_thumbnail,
    task_cpus,
    task_input,
    write_task_inputs,
)
from lookalike.stages.extract import ExtractSettings, extract_file

pytestmark = pytest.mark.skipif(not IMAGENET.is_dir(), reason=f"real photos missing: {IMAGENET}")


def real_images() -> list[Image.Image]:
    """imagenet-dev photos (many sizes and aspect ratios), nd-ukbench's formats and modes, odd shapes."""
    out = []
    paths = sorted(IMAGENET.glob("*.JPEG"))[::5] + sorted(p for p in UKBENCH.rglob("*") if p.is_file())
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                out.append(im)
        except OSError:
            continue  # nd-ukbench's deliberately broken files
    odd = [Image.new("RGB", (1, 1), (9, 99, 199)), Image.new("RGB", (7, 300)), Image.new("L", (300, 7), 80)]
    return out + odd


@pytest.fixture(scope="module")
def effnet() -> registry.ModelSpec:
    return registry.resolve_model(registry.EFFNET)


def _tf_resize_bicubic(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """TF's legacy ResizeBicubic written out with dense gathers: the float32 arithmetic of its kernel."""
    wy, iy = tf_preprocess.bicubic_taps(pixels.shape[0], height)
    wx, ix = tf_preprocess.bicubic_taps(pixels.shape[1], width)
    src = pixels.astype(np.float32)
    # Rows first, then columns, summing the 4 taps in TF's order.
    rows = (wy[0][:, None, None] * src[iy[0]] + wy[1][:, None, None] * src[iy[1]]
            + wy[2][:, None, None] * src[iy[2]] + wy[3][:, None, None] * src[iy[3]])
    return (wx[0][None, :, None] * rows[:, ix[0]] + wx[1][None, :, None] * rows[:, ix[1]]
            + wx[2][None, :, None] * rows[:, ix[2]] + wx[3][None, :, None] * rows[:, ix[3]])


def _tf_efficientnet_reference(image: Image.Image, pp: registry.Preprocess) -> np.ndarray:
    """The straightforward version of the transform: crop, TF resize, (x - mean) / std, CHW."""
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    crop = max(1, int(pp.size[0] / (pp.size[0] + tf_preprocess.CROP_PADDING) * min(h, w)))
    top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
    pixels = _tf_resize_bicubic(rgb[top : top + crop, left : left + crop], *pp.size)
    pixels = (pixels - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    return pixels.transpose(2, 0, 1)


def test_effnet_transform_is_bit_identical_to_tf_arithmetic(effnet: registry.ModelSpec) -> None:
    """The compiled EfficientNet transform is TF's float32 arithmetic exactly, not approximately,
    through every entry point: pixel_writer (the stage), preprocess_image, Embedder.preprocess."""
    images = real_images()
    assert len(images) > 100
    other_size = registry.Preprocess("tf-efficientnet", (240, 240), (127.0,) * 3, (128.0,) * 3)
    for pp in (effnet.preprocess, other_size):
        write = preprocess.pixel_writer(pp)
        out = np.full((3, *pp.size), np.nan, np.float32)
        for image in images:
            write(np.asarray(image.convert("RGB")), out)
            ref = _tf_efficientnet_reference(image, pp)
            assert np.array_equal(out, ref), (image.mode, image.size)
            assert np.array_equal(preprocess.preprocess_image(image, pp), ref), (image.mode, image.size)
    embedder = runtime.Embedder(effnet, "none", lambda px, logits: (px, None), threads=1, batch_size=8)
    batch = images[:20]
    assert np.array_equal(embedder.preprocess(batch),
                          np.stack([_tf_efficientnet_reference(im, effnet.preprocess) for im in batch]))


def test_thumbnails_decode_to_pillows_pixels(tmp_path: Path) -> None:
    """The stage decodes thumbnails with simplejpeg: exactly the pixels Pillow gives, so the model sees
    what the reference pipeline (PIL.Image.open) would; a thumbnail that is no JPEG goes to Pillow."""
    extract = ExtractSettings(str(tmp_path / "thumbs"))
    photos = sorted(IMAGENET.glob("*.JPEG"))[::10] + sorted(UKBENCH.rglob("*.png"))[:3]
    rows = [extract_file(str(p), extract) for p in photos]
    rows = [r for r in rows if r["error"] is None]
    assert len(rows) > 50
    for r in rows:
        got = read_thumbnail(r["sha256"], r["thumb"], r["path"], extract)
        with Image.open(Path(extract.thumbs_dir) / r["thumb"]) as im:
            assert np.array_equal(got, np.asarray(im.convert("RGB"))), r["path"]
    png = Path(extract.thumbs_dir) / "odd.png"
    Image.new("L", (30, 20), 77).save(png)
    assert np.array_equal(read_thumbnail("0" * 64, "odd.png", "/nonexistent", extract),
                          np.full((20, 30, 3), 77, np.uint8))


def test_embed_batches_vectors_and_errors(effnet: registry.ModelSpec, tmp_path: Path) -> None:
    extract = ExtractSettings(str(tmp_path / "thumbs"))
    photos = sorted(IMAGENET.glob("*.JPEG"))[:: 83][:6]
    features = [extract_file(str(p), extract) for p in photos]
    rows = pd.DataFrame({"sha256": [f["sha256"] for f in features], "thumb": [f["thumb"] for f in features],
                         "path": [f["path"] for f in features]})
    thumbs = [Image.open(Path(extract.thumbs_dir) / t).convert("RGB") for t in rows["thumb"]]
    (Path(extract.thumbs_dir) / rows["thumb"][1]).unlink()  # lost: re-derived from its original
    (Path(extract.thumbs_dir) / rows["thumb"][4]).write_bytes(b"\xff\xd8 not a jpeg")  # corrupt
    gone = pd.DataFrame({"sha256": ["0" * 64], "thumb": ["00/00/gone_512.jpg"], "path": ["/nonexistent.jpg"]})

    settings = EmbedSettings(effnet, "torch", str(tmp_path / "models"), batch_size=2, threads=1)
    # Input batches of different sizes, cut into model batches of 2 (one with a failure in it).
    out = pd.concat(embed_batches(iter([rows[:2], pd.concat([rows[2:], gone], ignore_index=True)]),
                                  settings, extract), ignore_index=True)

    assert len(out) == len(rows) + 1 and set(out["model_ver"]) == {effnet.model_ver}
    failed = out[out["error"].notna()].set_index("sha256")
    assert set(failed.index) == {rows["sha256"][4], "0" * 64} and set(failed["error"]) == {"embed"}
    assert "original failed" in failed.loc["0" * 64, "message"]
    ok = out[out["error"].isna()].set_index("sha256")
    assert (Path(extract.thumbs_dir) / rows["thumb"][1]).is_file()
    expected = runtime.get_embedder(effnet, backend="torch", threads=1).embed_images(
        [im for i, im in enumerate(thumbs) if i != 4])
    got = np.stack([np.frombuffer(ok.loc[sha, "vector"], np.float32) for i, sha in enumerate(rows["sha256"])
                    if i != 4])
    assert got.shape == (5, 1280) and got.dtype == np.float32
    assert (got * expected).sum(1).min() >= 0.9999  # the reference pipeline's vectors
    # Each image's top-5 labels beside its vector, from the same forward; none for a failure.
    assert failed["labels"].isna().all() and failed["label_scores"].isna().all()
    reference = runtime.get_embedder(effnet, backend="torch", threads=1).label_images(
        [im for i, im in enumerate(thumbs) if i != 4])
    for n, sha in enumerate(s for i, s in enumerate(rows["sha256"]) if i != 4):
        labels, scores = ok.loc[sha, "labels"], ok.loc[sha, "label_scores"]
        assert labels.dtype == np.int16 and scores.dtype == np.float32 and len(labels) == len(scores) == 5
        assert labels[0] == reference.labels[n, 0] and np.abs(scores - reference.scores[n]).max() < 1e-3

    # Read back from the stage's Parquet: list<float> again, nulls where an image failed.
    stage = pa.Table.from_pandas(out, schema=schemas.EMBEDDINGS, preserve_index=False)
    assert stage["labels"].null_count == 2 and stage["labels"].type == pa.list_(pa.int16())
    for table in (stage, stage.slice(1)):  # a sliced column: offsets not starting at 0
        vectors = embeddings_table(table)["vector"]
        assert vectors.type == pa.list_(pa.float32())
        for blob, vec in zip(table["vector"].to_pylist(), vectors.to_pylist(), strict=True):
            assert vec is None if blob is None else np.array_equal(np.asarray(vec, np.float32),
                                                                   np.frombuffer(blob, np.float32))
        # What the catalog load reads: numpy rows, None where the image failed.
        batches = embeddings_table(table).to_batches(max_chunksize=2)
        rows = [r for b in batches for r in _vector_rows(b["vector"])]
        for blob, vec in zip(table["vector"].to_pylist(), rows, strict=True):
            assert vec is None if blob is None else np.array_equal(vec, np.frombuffer(blob, np.float32))
    # The labels pass through as the schema types them, also from Spark's Parquet (list item 'element')
    # and from a stage output written before labels (no such columns: all null).
    spark_like = stage.set_column(stage.schema.get_field_index("labels"), "labels", stage["labels"].cast(
        pa.list_(pa.field("element", pa.int16()))))
    read = embeddings_table(spark_like)
    assert read.schema.field("labels").type.value_field.name == "item"
    assert read["labels"].to_pylist() == stage["labels"].to_pylist()
    old = embeddings_table(stage.drop_columns(["labels", "label_scores"]))
    assert old.schema.names == schemas.EMBEDDINGS.names and old["labels"].null_count == old.num_rows

    # The catalog load: the vectors (one row an image) and the labels (five an embedded image).
    class Copy:
        def __init__(self) -> None:
            self.rows: list[list[object]] = []

        def __enter__(self) -> Copy:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def set_types(self, types: list[str]) -> None:
            pass

        def write_row(self, row: list[object]) -> None:
            self.rows.append(row)

    class Cursor:
        def __init__(self) -> None:
            self.copies: dict[str, Copy] = {}

        def execute(self, sql: str, params: object = None) -> None:
            pass

        def copy(self, sql: str) -> Copy:
            return self.copies.setdefault(sql.split()[1], Copy())  # by staging table

    cursor = Cursor()
    copy_embeddings(cursor, read, "bytea", 1)  # type: ignore[arg-type]
    vectors, labels = cursor.copies["stage_emb"].rows, cursor.copies["stage_labels"].rows
    assert [r[0] for r in vectors] == stage["sha256"].to_pylist()
    assert [r[2] for r in vectors] == stage["vector"].to_pylist()
    pairs = zip(stage["sha256"].to_pylist(), stage["vector"].to_pylist(), strict=True)
    embedded = [sha for sha, vector in pairs if vector]
    assert [r[0] for r in labels] == [sha for sha in embedded for _ in range(5)]
    assert [r[2] for r in labels] == [1, 2, 3, 4, 5] * len(embedded)  # ranks


def embed_photos(tmp_path: Path, settings: EmbedSettings, files: list[str]) -> pd.DataFrame:
    """embed_batches' rows for the thumbnails of imagenet-dev `files`, in input order."""
    extract = ExtractSettings(str(tmp_path / "thumbs"))
    features = [extract_file(str(IMAGENET / f), extract) for f in files]
    rows = pd.DataFrame({k: [f[k] for f in features] for k in ("sha256", "thumb", "path")})
    out = pd.concat(embed_batches(iter([rows]), settings, extract), ignore_index=True)
    assert out["sha256"].tolist() == rows["sha256"].tolist() and out["error"].isna().all()
    return out


def test_labels_for_every_embedded_image(effnet: registry.ModelSpec, tmp_path: Path) -> None:
    """Real photos through the stage: every image gets 5 labels, and its top-1 label's coarse category
    (categories.csv) is mostly right, as the classifier is on the originals (test_labels)."""
    table = [r for r in csv.DictReader((IMAGENET / "categories.csv").open()) if r["category"] != "other"]
    picked = table[::31][:16]
    settings = EmbedSettings(effnet, "torch", str(tmp_path / "models"), batch_size=8, threads=2)
    out = embed_photos(tmp_path, settings, [r["file"] for r in picked])
    assert len(out) == 16
    assert all(len(labels) == 5 and len(scores) == 5 and np.all(np.diff(scores) <= 0)
               for labels, scores in zip(out["labels"], out["label_scores"], strict=True))
    top1 = [int(labels[0]) for labels in out["labels"]]
    right = [t in classes_under(r["category"]) for t, r in zip(top1, picked, strict=True)]
    names = label_hierarchy().names
    assert sum(right) >= 13, [(names[t], r["category"]) for t, r in zip(top1, picked, strict=True)]

    # labels=False (bench/embed.py's switch) skips the head: the same vectors, null labels.
    plain = embed_photos(tmp_path, dataclasses.replace(settings, labels=False), [r["file"] for r in picked])
    assert plain["labels"].isna().all() and plain["label_scores"].isna().all()
    for a, b in zip(plain["vector"], out["vector"], strict=True):
        assert np.array_equal(np.frombuffer(a, np.float32), np.frombuffer(b, np.float32))


def test_clip_model_labels_every_image_zero_shot(tmp_path: Path) -> None:
    """The CLIP path: a small open_clip model with random weights, built offline, gives 5 labels an image."""
    from lookalike.models.torch_compat import ensure_torchvision

    ensure_torchvision()
    import open_clip
    import torch

    torch.manual_seed(0)
    ckpt = tmp_path / "small-clip-random.pt"
    torch.save(open_clip.create_model("ViT-S-32-alt").state_dict(), ckpt)
    spec = registry.resolve_model(f"open_clip:ViT-S-32-alt:{ckpt}")
    models = tmp_path / "models"
    assert runtime.ensure_labels(spec, models, threads=2)  # the driver's step: the text vectors, once
    settings = EmbedSettings(spec, "torch", str(models), batch_size=4, threads=2)
    files = [p.name for p in sorted(IMAGENET.glob("*.JPEG"))[::100]]
    out = embed_photos(tmp_path, settings, files)
    assert len(out) == len(files) == 5
    for labels, scores in zip(out["labels"], out["label_scores"], strict=True):
        assert labels.dtype == np.int16 and len(labels) == len(set(labels.tolist())) == 5
        assert np.all((labels >= 0) & (labels < 1000)) and np.all(np.diff(scores) <= 0)
        assert 0 < scores.sum() <= 1 + 1e-5


@pytest.mark.parametrize(("rows", "cores", "batch", "tasks"), [
    (0, 2, 4, 1),
    (10, 64, 4, 3),           # never smaller than one model batch
    (20000, 2, 4, 2),         # a full manifest: one task per core
    (1500, 64, 4, 64),        # a large cluster: one task per core
])
def test_embed_tasks(rows: int, cores: int, batch: int, tasks: int) -> None:
    assert embed_tasks(rows, cores, batch) == tasks


def test_task_inputs_cover_every_row_once(tmp_path: Path) -> None:
    rows = pa.table({"sha256": [f"{i:064x}" for i in range(10)], "thumb": ["t"] * 10, "path": ["p"] * 10})
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "part-00007.parquet").write_bytes(b"a killed attempt's file")
    write_task_inputs(rows, tmp_path / "in", 3)
    files = [task_input(tmp_path / "in", task) for task in range(3)]
    assert sorted((tmp_path / "in").iterdir()) == files
    parts = [pq.read_table(f) for f in files]
    assert [p.num_rows for p in parts] == [3, 3, 4]
    assert pa.concat_tables(parts).equals(rows)
    write_task_inputs(rows.slice(0, 0), tmp_path / "in", 1)
    assert pq.read_table(task_input(tmp_path / "in", 0)).num_rows == 0


def test_task_cpus_outside_spark() -> None:
    assert task_cpus() == 1
