"""Labels in WordNet's hierarchy: category names, find WORD, the shipped file, and the real model's labels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from lookalike.labels import (
    UnknownWordError,
    classes_under,
    find_mask,
    load,
    name_category,
    senses,
    softmax,
    suggest,
    top_k,
    top_labels,
)
from lookalike.labels.hierarchy import nodes_for, normalise

IMAGENET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-dev"
DATA_FILE = Path(__file__).resolve().parents[1] / "lib" / "lookalike" / "labels" / "imagenet_hierarchy.json"


def idx(*names: str) -> list[int]:
    """Class indices by readable name (each name must be one class)."""
    h = load()
    out = []
    for name in names:
        hits = [i for i, n in enumerate(h.names) if n == name]
        assert len(hits) == 1, (name, hits)
        out.append(hits[0])
    return out


def test_shipped_file_is_small_and_in_classifier_order() -> None:
    h = load()
    assert DATA_FILE.stat().st_size < 1_000_000
    assert len(h.wnids) == 1000 and list(h.wnids) == sorted(h.wnids)  # sorted wnids = output index order
    assert h.wnids[0] == "n01440764" and h.names[0] == "tench"
    assert all(chain[-1] == "n00001740" for chain in h.chains)  # every chain ends at 'entity'
    assert "Princeton" in DATA_FILE.read_text()[:3000]  # the WordNet licence travels with the data


def test_forty_dog_breeds_are_dog() -> None:
    h = load()
    dogs = sorted(classes_under("dog"))
    assert len(dogs) >= 100
    # 40 breeds taken in turn from each kind of dog (hunting, working, toy, ...), as in a cluster of dogs
    kinds: dict[str, list[int]] = {}
    for i in dogs:
        chain = h.chains[i]
        kinds.setdefault(chain[chain.index("n02084071") - 1], []).append(i)
    breeds = [i for turn in range(len(dogs)) for group in kinds.values() if turn < len(group)
              for i in [group[turn]]][:40]
    assert len(set(breeds)) == 40
    assert name_category(breeds)[0] == "dog"
    # a cluster of hounds only is named at its own level, not 'dog'
    assert name_category(sorted(classes_under("hound"))[:10])[0] == "hound"


def test_cars_buses_and_trucks_are_vehicles() -> None:
    mix = idx("sports car", "convertible (car)", "cab", "school bus", "trolleybus", "minibus",
              "pickup", "trailer truck", "fire engine")
    name, labels = name_category(mix)
    # WordNet puts buses under 'public transport', cars and trucks under 'motor vehicle' (6 of 9 here)
    assert name in {"motor vehicle", "self-propelled vehicle", "wheeled vehicle", "vehicle", "conveyance"}
    assert len(labels) == 5 and abs(labels[0][1] - 1 / 9) < 1e-9


def test_all_goldfish_stay_goldfish() -> None:
    assert name_category(idx("goldfish") * 12)[0] == "goldfish"
    # a few stray labels below min_share do not lift the name
    assert name_category(idx("goldfish") * 9 + idx("tench", "pizza", "tabby"))[0] == "goldfish"


def test_unrelated_members_are_mixed() -> None:
    name, labels = name_category(idx("beagle", "sports car", "pizza", "daisy", "volcano", "tabby"))
    assert name.startswith("mixed: ") and name.count(",") == 2
    assert {n for n, _ in labels} <= {"beagle", "sports car", "pizza", "daisy", "volcano", "tabby"}


def test_name_from_probabilities_and_stored_top_k() -> None:
    rng = np.random.default_rng(0)
    dogs = sorted(classes_under("dog"))
    logits = rng.normal(0, 1, (20, 1000)).astype(np.float32)
    logits[np.arange(20), rng.choice(dogs, 20)] += 12  # each image sure of some breed
    probs = softmax(logits)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert name_category(probs)[0] == "dog"
    assert name_category(top_labels(probs, 5))[0] == "dog"


def test_top_labels_are_sorted() -> None:
    p = softmax(np.arange(1000, dtype=np.float32)[None, :] / 100)
    (labels,) = top_labels(p, 5)
    assert [lab.index for lab in labels] == [999, 998, 997, 996, 995]
    assert labels[0].name == load().names[999] and labels[0].prob > labels[1].prob
    i, q = top_k(np.vstack([p, p[:, ::-1]]), 3)
    assert i.tolist() == [[999, 998, 997], [0, 1, 2]] and q.shape == (2, 3)


def test_find_dog_finds_breeds_not_cats() -> None:
    dogs = classes_under("dog")
    assert set(idx("beagle", "golden retriever", "Chihuahua", "Siberian husky", "pug")) <= dogs
    assert not set(idx("tabby", "Persian cat", "Siamese cat", "tiger", "red fox")) & dogs
    assert classes_under("Dogs") == dogs == classes_under(" DOG ")  # plural and case tolerant
    assert classes_under("n02084071") == dogs  # a node id works too


def test_find_vehicle_finds_cars_boats_planes() -> None:
    vehicles = classes_under("vehicle")
    assert set(idx("sports car", "canoe", "airliner", "yawl", "tractor")) <= vehicles
    assert not set(idx("pizza", "beagle")) & vehicles
    assert classes_under("geese") == classes_under("goose")  # WordNet's irregular plurals
    assert classes_under("butterflies") == classes_under("butterfly")


def test_names_that_mean_different_things_read_differently() -> None:
    h = load()
    assert len(set(h.node_names.values())) == len(h.node_names)  # no two nodes share a name
    assert len({normalise(n) for n in h.node_names.values()}) == len(h.node_names)  # nor as find reads it
    assert {h.name("n02113186"), h.name("n02963159")} == {"Cardigan (corgi)", "cardigan (sweater)"}
    # Two ImageNet classes are 'crane' (the bird, the machine), two categories could be 'vessel'
    # (a ship, a container): each is qualified by the nearest ancestor that tells them apart.
    bird, machine = idx("crane (wading bird)", "crane (lifting device)")
    assert h.wnids[bird] == "n02012849" and h.wnids[machine] == "n03126707"
    assert {h.name("n04530566"), h.name("n04531098")} == {"vessel (craft)", "vessel (container)"}
    ships_and_boats = idx("container ship", "liner", "canoe", "speedboat", "schooner")
    assert name_category(ships_and_boats)[0] == "vessel (craft)"
    assert h.name("n02084071") == "dog"  # a name no other node has stays the plain lemma
    # find takes a name as shown (that sense only) as well as the plain word (every sense)
    assert classes_under("crane (Wading Bird)") == {bird}
    assert classes_under("crane") == {bird, machine}
    assert classes_under("vessel (craft)") < classes_under("vessel")
    # CLIP's zero-shot prompts stay on the plain lemma, so cached label text vectors stay valid
    from lookalike.models.runtime import zero_shot_prompts

    assert zero_shot_prompts()[bird] == zero_shot_prompts()[machine] == "a photo of a crane"


def test_find_mask_on_stored_top_k() -> None:
    beagle, husky, tabby = idx("beagle", "Siberian husky", "tabby")
    top_idx = np.array([[beagle, tabby], [tabby, husky], [tabby, beagle]])
    assert find_mask("dog", top_idx).tolist() == [True, False, False]
    # the second image is 55% dog over its top-k although its top-1 is a cat
    top_p = np.array([[0.9, 0.1], [0.45, 0.55], [0.8, 0.2]])
    assert find_mask("dog", top_idx, top_p).tolist() == [True, True, False]


def test_unknown_word_suggests_closest_names() -> None:
    with pytest.raises(UnknownWordError) as err:
        classes_under("dgo")
    assert "dog" in err.value.suggestions and "dog" in str(err.value)
    assert "golden retriever" in suggest("retriever") or "retriever" in suggest("retriever")
    assert suggest("zzzzqqq") == []


def test_real_model_top1_coarse_labels_mostly_right() -> None:
    from PIL import Image

    from lookalike.labels.classifier import features_and_logits
    from lookalike.models.registry import resolve_model

    rows = list(csv.DictReader((IMAGENET / "categories.csv").open()))[::25]  # 20 photos, all kinds
    rows = [r for r in rows if r["category"] != "other"]  # 'other' is not a WordNet node
    images = [Image.open(IMAGENET / r["file"]).convert("RGB") for r in rows]
    feats, logits = features_and_logits(resolve_model("effnet-lite0"), images, threads=2)
    assert feats.shape == (len(rows), 1280) and logits.shape == (len(rows), 1000)
    top1 = top_k(softmax(logits), 1)[0][:, 0]
    right = [int(t) in classes_under(r["category"]) for t, r in zip(top1, rows, strict=True)]
    assert sum(right) >= 0.8 * len(rows), list(zip([load().names[t] for t in top1], right, strict=True))


def test_every_meaning_of_a_word_can_be_searched_alone() -> None:
    # find tells a user which meanings a word has, and how to ask for one: each query must find its
    # node alone ('cat' is the cat's name and a lemma of big cat: the cat is asked for by its id).
    h = load()
    words = {lemma for lemmas in h.node_lemmas.values() for lemma in lemmas}
    ambiguous = [w for w in sorted(words) if len(nodes_for(w)) > 1]
    assert len(ambiguous) > 50 and "plant" in ambiguous and "cat" in ambiguous
    for word in ambiguous:
        meanings = senses(word)
        assert [name for name, _ in meanings] == [h.name(node) for node in nodes_for(word)]
        for (_, query), node in zip(meanings, nodes_for(word), strict=True):
            assert nodes_for(query) == (node,), (word, query)
    assert senses("plant") == [("plant (building complex)",) * 2, ("plant (organism)",) * 2]
    assert senses("cat") == [("cat", "n02121620"), ("big cat", "big cat")]
