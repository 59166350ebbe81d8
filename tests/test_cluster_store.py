"""Categories in the catalog: a full re-clustering keeps the ids of the categories that persist."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from lookalike import Catalog, db
from lookalike.cluster.algorithm import ClusterConfig
from lookalike.cluster.names import name_by_analyst, name_new_members
from lookalike.cluster.space import space_name
from lookalike.cluster.store import assign_new, inherited_ids, space_key
from lookalike.config import Config
from lookalike.db.vector_io import vector_to_db
from lookalike.labels.hierarchy import UnknownWordError
from lookalike.labels.hierarchy import load as load_hierarchy
from lookalike.layout import Layout

MODEL = "synthetic@1"
DIM = 64


def blobs(rng: np.random.Generator, centres: np.ndarray, per: int) -> tuple[np.ndarray, np.ndarray]:
    """`per` unit vectors tightly around each centre, and which centre each came from."""
    which = np.repeat(np.arange(len(centres)), per)
    x = centres[which] + 0.05 * rng.standard_normal((len(which), DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), which


def add_images(conn: psycopg.Connection, first_id: int, vecs: np.ndarray, vector_type: str) -> np.ndarray:
    ids = np.arange(first_id, first_id + len(vecs), dtype=np.int64)
    with conn.transaction(), conn.cursor() as cur:
        for i, v in zip(ids.tolist(), vecs, strict=True):
            cur.execute("INSERT INTO images (id, file_sha256, path_original, width, height, format, bytes, "
                        "thumb_path) VALUES (%s, %s, 'x', 1, 1, 'JPEG', 1, 'x')", (i, f"{i:064x}"))
            cur.execute("INSERT INTO image_embeddings (image_id, model_ver, emb) VALUES (%s, %s, %s)",
                        (i, MODEL, vector_to_db(v, vector_type)))
    return ids


def categories(conn: psycopg.Connection) -> dict[int, int]:
    return dict(conn.execute("SELECT image_id, cluster_id FROM image_cluster WHERE model_ver = %s",
                             (MODEL,)).fetchall())


def test_a_refit_after_the_catalog_doubles_keeps_the_ids_of_persisting_categories(cfg: Config) -> None:
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((9, DIM))
    config = ClusterConfig.defaults(refit_growth=2.0)
    with db.connect(cfg) as conn:
        vector_type = db.ensure_schema(conn)
        first, which_first = blobs(rng, centres[:8], 30)
        ids = add_images(conn, 1, first, vector_type)
        with conn.transaction(), conn.cursor() as cur:
            fitted = assign_new(cur, MODEL, ids, first, config, vector_type, Layout(cfg.home).scratch)
        assert fitted.created == 8
        before = categories(conn)
        blob_id = {b: before[int(i)] for b, i in zip(which_first[::30], ids[::30], strict=True)}
        assert len(set(blob_id.values())) == 8
        # The catalog doubles: more of the same eight, and a ninth kind of picture.
        second, which_second = blobs(rng, centres, 30)
        new_ids = add_images(conn, 1 + len(ids), second, vector_type)
        with conn.transaction(), conn.cursor() as cur:
            counts = assign_new(cur, MODEL, new_ids, second, config, vector_type, Layout(cfg.home).scratch)
        assert counts.refits == 1 and counts.created == 1
        after = categories(conn)
        # Every image of the eight persisting categories is still in its category, by id.
        for i, b in zip(ids.tolist(), which_first.tolist(), strict=True):
            assert after[i] == blob_id[b]
        for i, b in zip(new_ids.tolist(), which_second.tolist(), strict=True):
            assert after[i] == blob_id[b] if b < 8 else after[i] not in blob_id.values()
        transitions = conn.execute("SELECT old_cluster_id, new_cluster_id FROM cluster_transitions")
        assert sorted(transitions.fetchall()) == sorted((c, c) for c in blob_id.values())


def test_inherited_ids_keep_the_id_on_the_larger_part_of_a_split_and_need_half() -> None:
    image_ids = np.arange(16)
    # Old 100 splits 7/3 into new 0 and 1; new 2 is half old 200 and half images without a category.
    labels = np.asarray([0] * 7 + [1] * 3 + [2] * 6)
    before = {i: 100 for i in range(10)} | {10: 200, 11: 200, 12: 200}
    assert inherited_ids(before, image_ids, labels) == {0: 100, 2: 200}
    before[12] = before[13] = 300  # now no old category gives new 2 half of its members
    assert inherited_ids(before, image_ids, labels) == {0: 100}
    assert inherited_ids({}, image_ids, labels) == {}


def add_labels(conn: psycopg.Connection, ids: np.ndarray, which: np.ndarray, kinds: list[list[str]]) -> None:
    """Each image's top label: one of its blob's kinds (by name), score 0.9, as the embed stage stores it."""
    names = list(load_hierarchy().names)
    with conn.transaction(), conn.cursor() as cur:
        for k, (i, b) in enumerate(zip(ids.tolist(), which.tolist(), strict=True)):
            label = kinds[b][k % len(kinds[b])]
            cur.execute("INSERT INTO image_labels (image_id, model_ver, rank, label, score, class_id) "
                        "VALUES (%s, %s, 1, %s, 0.9, %s)", (i, MODEL, label, names.index(label)))


def test_categories_are_named_by_their_labels_and_analysts_names_stay(cfg: Config) -> None:
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((3, DIM))
    kinds = [["golden retriever", "pug", "Siberian husky"], ["goldfish"],
             ["sports car", "school bus", "pickup"]]
    # Categories from the embeddings alone, one per blob: this test is about their names (with
    # labels in the clustering, identical-looking retrievers and pugs would be two categories;
    # test_categories_follow_the_labels_where_the_embeddings_look_alike is about that).
    config = ClusterConfig.defaults(refit_growth=2.0, label_weight=0.0)
    scratch = Layout(cfg.home).scratch
    with db.connect(cfg) as conn:
        vector_type = db.ensure_schema(conn)
        with conn.transaction():
            db.set_meta(conn, "active_model_ver", MODEL)
        vecs, which = blobs(rng, centres, 20)
        ids = add_images(conn, 1, vecs, vector_type)
        add_labels(conn, ids, which, kinds)
        with conn.transaction(), conn.cursor() as cur:
            assign_new(cur, MODEL, ids, vecs, config, vector_type, scratch)
            joined = name_new_members(cur, MODEL, ids)
        assert joined == {"dog": 20, "goldfish": 20, "motor vehicle": 20}
        of = categories(conn)
        cars = of[int(ids[which == 2][0])]
        with conn.transaction(), conn.cursor() as cur:
            name_by_analyst(cur, cars, "  the   fleet ")
        # The catalog doubles: a full re-clustering, then every category is named again...
        more, which_more = blobs(rng, centres, 20)
        more_ids = add_images(conn, 61, more, vector_type)
        add_labels(conn, more_ids, which_more, kinds)
        with conn.transaction(), conn.cursor() as cur:
            assert assign_new(cur, MODEL, more_ids, more, config, vector_type, scratch).refits == 1
            name_new_members(cur, MODEL, more_ids, everything=True)
        names = dict(conn.execute("SELECT id, name FROM clusters WHERE model_ver = %s", (MODEL,)).fetchall())
        # ...but the analyst's name stays on its category, which kept its id.
        assert names[cars] == "the fleet" and sorted(names.values()) == ["dog", "goldfish", "the fleet"]
        top = conn.execute("SELECT top_labels FROM clusters WHERE name = 'goldfish'").fetchone()[0]
        assert top == [["goldfish", 1.0]]
    with Catalog(config=cfg) as cat:
        dogs = cat.find("dogs", limit=None)
        every_dog = np.concatenate([ids[which == 0], more_ids[which_more == 0]])
        assert set(dogs["image_id"]) == set(every_dog.tolist())
        assert set(dogs["category"]) == {"dog"} and dogs["score"].is_monotonic_decreasing
        assert cat.find("vehicle", limit=5)["category"].tolist() == ["the fleet"] * 5
        with pytest.raises(UnknownWordError, match="closest names"):
            cat.find("dgo")
        cat.name_category(int(names_of(cat, "dog")), "puppies")
        assert "puppies" in set(cat.clusters()["name"])
        with pytest.raises(KeyError):
            cat.name_category(10**9, "nothing")


def names_of(cat: Catalog, name: str) -> int:
    return int(cat.sql("SELECT id FROM clusters WHERE name = %s", (name,))["id"][0])


def test_categories_follow_the_labels_where_the_embeddings_look_alike(cfg: Config) -> None:
    """Forty pictures that look alike (one tight blob of embeddings), twenty labelled dogs and twenty
    vehicles: on the embeddings alone they share categories; once labels count (the default), no
    category mixes them, and a catalog clustered the old way is clustered again at its next run."""
    rng = np.random.default_rng(5)
    kinds = [["golden retriever", "pug", "Siberian husky", "beagle"],
             ["sports car", "school bus", "pickup", "fire engine"]]
    scratch = Layout(cfg.home).scratch
    with db.connect(cfg) as conn:
        vector_type = db.ensure_schema(conn)
        vecs, _ = blobs(rng, rng.standard_normal((1, DIM)), 40)
        which = np.repeat([0, 1], 20)
        ids = add_images(conn, 1, vecs, vector_type)
        add_labels(conn, ids, which, kinds)

        def mixed() -> int:
            of = categories(conn)
            kinds_in: dict[int, set[int]] = {}
            for i, w in zip(ids.tolist(), which.tolist(), strict=True):
                kinds_in.setdefault(of[i], set()).add(w)
            return sum(len(k) > 1 for k in kinds_in.values())

        embeddings_alone = ClusterConfig.defaults(label_weight=0.0)
        with conn.transaction(), conn.cursor() as cur:
            assign_new(cur, MODEL, ids, vecs, embeddings_alone, vector_type, scratch)
        assert mixed() >= 1
        assert db.get_meta(conn, space_key(MODEL)) == "embedding"

        default = ClusterConfig.defaults()
        assert default.label_weight > 0
        one_more = add_images(conn, 41, vecs[:1], vector_type)
        add_labels(conn, one_more, which[:1], kinds)
        with conn.transaction(), conn.cursor() as cur:
            counts = assign_new(cur, MODEL, one_more, vecs[:1], default, vector_type, scratch)
        assert counts.refits == 1, "centroids of another space must not take new images"
        assert db.get_meta(conn, space_key(MODEL)) == space_name(default.label_weight) != "embedding"
        assert mixed() == 0
        assert categories(conn)[int(one_more[0])] == categories(conn)[int(ids[0])]  # a dog among dogs
